"""FedProx, μ = 1, in the FedProx paper's setting (Li et al., MLSys 2020, Synthetic(1, 1)).

Same as `synthetic_fedavg.py` with the proximal term μ/2 ||w − w_t||².
"""

from configs.synthetic_fedavg import get_config as _fedavg


def get_config():
  c = _fedavg()
  c.algorithm = "fedprox"
  c.fedprox.mu = 1.0
  return c
