"""Robust aggregation against scaled sign-flipping clients on IID Synthetic(0, 0).

`python -m fedjax_pers.compare --config=configs/compare_byzantine.py --workdir=DIR`

20% of the clients send −10 times their true update every round they are
sampled (see `aggregation.scaled_updates`). The first row runs FedAvg with the
same clients marked but sending their true update (scale 1: no attack), the
reference the robust aggregators should stay near; the others face the attack.
Accuracy is measured on the honest clients' test data in every row. Every run
sees the same data, cohorts and seeds.
"""

import ml_collections

from fedjax_pers.experiment.default_config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 100
  c.eval_every = 5
  c.eval_train = False
  c.client.local_epochs = 20
  c.data.iid = True
  c.data.alpha = 0.0
  c.data.beta = 0.0
  c.corruption.attack_fraction = 0.2
  c.corruption.attack_scale = -10.0
  c.aggregation.trim_beta = 0.3
  c.aggregation.byzantine_f = 2
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.8
  c.compare.strategies = (
      "no_attack: corruption.attack_scale=1.0",
      "mean: aggregation.weighting=num_examples",
      "median: aggregation.weighting=median",
      "trimmed_mean: aggregation.weighting=trimmed_mean",
      "krum: aggregation.weighting=krum",
      "multi_krum: aggregation.weighting=multi_krum",
      "clip_norm: aggregation.weighting=clip_norm",
  )
  return c
