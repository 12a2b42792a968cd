"""The FedProx paper's straggler experiment (Li et al., MLSys 2020, Figure 1) on
Synthetic(1, 1): 0%, 50% and 90% of each cohort straggle (a random number of local
epochs in [1, 20]); FedAvg drops them, FedProx keeps their partial work, with μ = 0 and
μ = 1.

`python -m fedjax_pers.compare --config=configs/compare_stragglers.py --workdir=DIR`

`synthetic_fedavg`'s setting otherwise: 30 clients, 10 per round, batch 10, 20 local epochs
at lr 0.01, 200 rounds, weights by data size.
"""

import ml_collections

from configs.synthetic_fedavg import get_config as _fedavg


def get_config():
  c = _fedavg()
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.7
  strategies = []
  for pct in (0, 50, 90):
    f = pct / 100
    strategies += [
        f"fedavg_{pct}: algorithm=fedavg, system.straggler_fraction={f}",
        f"fedprox_mu0_{pct}: algorithm=fedprox, fedprox.mu=0.0, system.straggler_fraction={f}",
        f"fedprox_mu1_{pct}: algorithm=fedprox, fedprox.mu=1.0, system.straggler_fraction={f}",
    ]
  c.compare.strategies = tuple(strategies)
  return c
