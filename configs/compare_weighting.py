"""Aggregation weightings side by side on IID Synthetic(0, 0) with 30% label-noise clients.

`python -m fedjax_pers.compare --config=configs/compare_weighting.py --workdir=DIR`

Every strategy sees the same data (30% of the clients train on shuffled labels,
see `data.shuffle_labels`; the test labels stay clean), the same cohorts and
seeds. The data are IID so that label noise is the only difference between
clients; `--config.data.iid=False --config.data.alpha=0.5 --config.data.beta=0.5`
gives the non-IID version. FedLAW's and the automated weighting's proxy set is
100 examples held out of the test splits for every strategy, so all are scored on
the same test data.
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
  c.data.proxy_examples = 100
  c.corruption.label_shuffle_fraction = 0.3
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.8
  c.compare.strategies = (
      "num_examples: aggregation.weighting=num_examples",
      "uniform: aggregation.weighting=uniform",
      "loss: aggregation.weighting=loss, aggregation.temperature=0.5",
      "loss_improvement: aggregation.weighting=loss_improvement",
      "cosine: aggregation.weighting=cosine",
      "fedadp: aggregation.weighting=fedadp",
      "label_divergence: aggregation.weighting=label_divergence",
      "fedlaw: aggregation.weighting=fedlaw",
      "auto: aggregation.weighting=auto",
  )
  return c
