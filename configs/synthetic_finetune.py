"""FedAvg, then every client fine-tunes the global model: the pFedMe paper's synthetic setting.

pFedMe (Dinh et al., NeurIPS 2020), Synthetic(0.5, 0.5): 100 clients, sample scale 5,
seed 0, multinomial logistic regression; batch 20, R = 20 local steps, FedAvg lr 0.005,
10 clients per round, 600 rounds. At every evaluation each client takes K = 5 SGD steps
(lr 0.01, batch 20) from the global model on its train split and is tested on its test
split; `summary.json` reports both the global and the personalized figures.
"""

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.algorithm = "finetune"
  c.num_rounds = 600
  c.eval_every = 20
  c.eval_train = False
  c.data.alpha = 0.5
  c.data.beta = 0.5
  c.data.num_clients = 100
  c.data.sample_scale = 5
  c.data.test_fraction = 0.25
  c.client.learning_rate = 0.005
  c.client.batch_size = 20
  c.client.local_steps = 20
  c.personalization.finetune_steps = 5
  c.personalization.learning_rate = 0.01
  c.personalization.batch_size = 20
  return c
