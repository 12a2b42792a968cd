"""Personalization on real MNIST images with strong label skew: Dirichlet(0.1) over 50 clients.

The 10,000 MNIST test images in `data.data_dir` (`../shared/data/mnist`, or your
own IDX files) are dealt to 50 clients with Dirichlet(0.1) label proportions
(each client keeps 20% of its images as its test split); a 784-200-10 MLP;
FedAvg with one local epoch of batch 20 at lr 0.05, 10 clients per round, 100
rounds, then each client fine-tunes for 10 steps (lr 0.05). For the other methods,
which test their clients' own models instead of fine-tuning, add
`--config.algorithm=A --config.personalization.finetune_steps=0` with A one of
`fedper`, `fedrep`, `lg_fedavg`, `ditto` (λ = 1), `apfl` (α = 0.25) or `pfedme`
(R = 10, K = 5, η_p = 0.1, λ = 15, as the pFedMe paper's MNIST runs but with this
config's η = 0.05).
"""

from configs.mnist_dirichlet import get_config as _mnist_dirichlet


def get_config():
  c = _mnist_dirichlet()
  c.algorithm = "finetune"
  c.data.num_clients = 50
  c.data.min_client_examples = 20
  c.client.batch_size = 20
  c.client.local_epochs = 1
  c.personalization.finetune_steps = 10
  c.personalization.learning_rate = 0.05
  c.personalization.batch_size = 20
  c.ditto.lam = 1.0
  c.apfl.alpha = 0.25
  c.pfedme.local_rounds = 10      # R (one epoch is about 8 batches here)
  c.pfedme.personal_learning_rate = 0.1
  c.pfedme.lam = 15.0
  c.pfedme.inner_steps = 5
  return c
