"""Meta-learned initializations against FedAvg + fine-tuning, client by client.

`python -m fedjax_pers.compare --config=configs/compare_meta.py --workdir=DIR`

The pFedMe paper's synthetic setting of `synthetic_per_fedavg` (Synthetic(0.5, 0.5),
100 clients, 10 per round, 600 rounds, τ = 20 steps on batches of 20, α = β =
0.005). Every strategy is tested after one SGD step of rate 0.005 on each client's
train split, and each aggregates as its paper does (`aggregation.weighting =
'default'`: n_i for FedAvg, uniform for Per-FedAvg and Reptile). The table's last
column counts the clients on which a strategy beats FedAvg + fine-tuning.
"""

import ml_collections

from configs.synthetic_per_fedavg import get_config as _per_fedavg


def get_config():
  c = _per_fedavg()
  c.aggregation.weighting = "default"
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.75
  c.compare.strategies = (
      "fedavg_finetune: algorithm=finetune",
      "per_fedavg: algorithm=per_fedavg",
      "per_fedavg_hf: algorithm=per_fedavg_hf",
      "per_fedavg_fo: algorithm=per_fedavg_fo",
      "meta_sgd: algorithm=per_fedavg, per_fedavg.meta_sgd=True",
      "reptile: algorithm=reptile",
  )
  return c
