"""Client drift on a label-skewed federation: FedAvg, FedProx, SCAFFOLD, FedDyn, FedNova
and MOON on `mnist_dirichlet` (real MNIST, 100 clients, Dirichlet(0.1) labels, the
784-200-10 MLP, 10 clients per round, 5 local epochs of batch 10 at lr 0.05, 100 rounds).

`python -m fedjax_pers.compare --config=configs/compare_drift.py --workdir=DIR`

Each strategy aggregates as its paper does (`aggregation.weighting='default'`: data size
for FedAvg, FedProx, FedNova and MOON, uniform for SCAFFOLD and FedDyn). Under epochs the
clients' local steps differ with their data, which is what FedNova normalises.
"""

import ml_collections

from configs import mnist_dirichlet


def get_config():
  c = mnist_dirichlet.get_config()
  c.aggregation.weighting = "default"
  c.fedprox.mu = 0.01
  c.feddyn.alpha = 0.01
  c.moon.mu = 1.0
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.85
  c.compare.strategies = (
      "fedavg: algorithm=fedavg",
      "fedprox: algorithm=fedprox",
      "scaffold: algorithm=scaffold",
      "feddyn: algorithm=feddyn",
      "fednova: algorithm=fednova",
      "moon: algorithm=moon",
  )
  return c
