"""FedAvg on Shakespeare by speaking role (LEAF's task), small enough for two CPU cores.

Every role of `data.path` (tiny Shakespeare, `../shared/data/shakespeare/
tinyshakespeare.txt.gz`) with at least 1,000 characters is a client (141 roles);
80 characters in, the next one out, one example every 8 positions (`data.stride`),
the last 20% of each role's text as its test split. Each round 10 roles train a
character LSTM (embedding 8, one layer of 128) for one epoch of batch 10 on a fresh
random 200 of their examples (`data.example_cap`; aggregation weights keep every
role's true size), SGD at lr 1.0. LEAF's setting is `model.rnn_layers=2`,
`model.rnn_hidden=256`, `data.stride=1` (and hours of CPU time).
"""

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 60
  c.clients_per_round = 10
  c.eval_every = 20
  c.eval_train = False
  c.data.name = "shakespeare"
  c.data.path = "../shared/data/shakespeare/tinyshakespeare.txt.gz"
  c.data.min_chars = 1000
  c.data.seq_len = 80
  c.data.stride = 8
  c.data.test_fraction = 0.2
  c.data.example_cap = 200
  c.model.name = "char_rnn"
  c.model.embed = 8
  c.model.rnn_hidden = 128
  c.model.rnn_layers = 1
  c.model.cell = "lstm"
  c.client.learning_rate = 1.0
  c.client.batch_size = 10
  c.client.local_epochs = 1
  return c
