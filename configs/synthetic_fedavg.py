"""FedAvg in the FedProx paper's setting (Li et al., MLSys 2020, Synthetic(1, 1)).

30 clients, 10 per round, batch 10, 20 local epochs, SGD lr 0.01, 200 rounds,
weights by number of examples.
"""

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.algorithm = "fedavg"
  c.num_rounds = 200
  c.clients_per_round = 10
  c.eval_every = 10
  c.data.alpha, c.data.beta, c.data.num_clients = 1.0, 1.0, 30
  c.client.learning_rate = 0.01
  c.client.batch_size = 10
  c.client.local_epochs = 20
  c.aggregation.weighting = "num_examples"
  return c
