"""q-FFL's fairness trade-off on Synthetic(1, 1), as in the q-FFL paper (Li et al., ICLR 2020).

`python -m fedjax_pers.compare --config=configs/compare_qffl.py --workdir=DIR`

q = 0 is FedAvg with uniform weights; larger q weights clients by loss^q, which
should lower the spread of per-client test accuracy (variance, worst 10%).
Clients are sampled with probability ∝ n_i, as q-FedAvg samples.
"""

import ml_collections

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 200
  c.eval_every = 10
  c.eval_train = False
  c.sampling = "num_examples"
  c.client.local_epochs = 1
  c.client.learning_rate = 0.1
  c.aggregation.weighting = "q_ffl"
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.7
  c.compare.strategies = (
      "q0: aggregation.q=0.0",
      "q1: aggregation.q=1.0",
      "q2: aggregation.q=2.0",
      "q5: aggregation.q=5.0",
  )
  return c
