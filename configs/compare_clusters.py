"""IFCA against FedAvg on a population drawn from k = 3 distinct generators.

`python -m fedjax_pers.compare --config=configs/compare_clusters.py --workdir=DIR`

`data.name='clustered_synthetic'`: 30 clients, each labelling standard-normal
inputs with one of three logistic generators (10 per group), logistic regression,
10 clients per round, 20 local epochs of batch 10 at lr 0.05, 100 rounds. IFCA
with k = 3 should recover the groups (`cluster_recovery`, 1.0 = exactly) and beat
one global model, which cannot fit three labelings at once; fine-tuning FedAvg's
model (10 steps) is the personalized baseline.
"""

import ml_collections

from fedjax_pers.experiment.default_config import get_config as _default


def get_config():
  c = _default()
  c.data.name = "clustered_synthetic"
  c.data.clusters = 3
  c.data.num_clients = 30
  c.ifca.num_clusters = 3
  c.model.name = "logistic_regression"
  c.client.learning_rate = 0.05
  c.num_rounds = 100
  c.eval_every = 10
  c.personalization.learning_rate = 0.05
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.8
  c.compare.strategies = (
      "fedavg: algorithm=fedavg",
      "fedavg_finetune: algorithm=finetune, personalization.finetune_steps=10",
      "ifca_k3: algorithm=ifca",
      "ifca_k3_finetune: algorithm=ifca, personalization.finetune_steps=10",
  )
  return c
