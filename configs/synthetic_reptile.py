"""Reptile (Nichol et al., 2018) in the pFedMe paper's synthetic setting.

As `synthetic_finetune` (clients: 20 SGD steps of lr 0.005 on batches of 20),
with uniform weights and the server moving the initialization by ε = 1 of the
mean client displacement; every client adapts with 5 SGD steps before testing.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "reptile"
  c.aggregation.weighting = "uniform"
  c.reptile.outer_lr = 1.0
  return c
