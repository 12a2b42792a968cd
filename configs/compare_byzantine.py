"""Robust aggregation against scaled sign-flipping clients, on real MNIST images (IID).

`python -m fedjax_pers.compare --config=configs/compare_byzantine.py --workdir=DIR`

The 10,000 MNIST test images in `data.data_dir` (IDX files; `../shared/data/mnist`
here, or point it at your own copy) are split IID over 30 clients, each keeping
10% as its test split; a 784-200-10 MLP trains for one local epoch per round.
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
  c.data.name = "mnist_idx"
  c.data.data_dir = "../shared/data/mnist"
  c.data.images = "t10k-images-idx3-ubyte.gz"
  c.data.labels = "t10k-labels-idx1-ubyte.gz"
  c.data.num_clients = 30
  c.model.name = "mlp"
  c.model.hidden = (200,)
  c.client.learning_rate = 0.05
  c.client.batch_size = 20
  c.client.local_epochs = 1
  c.corruption.attack_fraction = 0.2
  c.corruption.attack_scale = -10.0
  c.aggregation.trim_beta = 0.3
  c.aggregation.byzantine_f = 2
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.85
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
