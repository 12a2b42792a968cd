"""Per-FedAvg (Fallah et al., NeurIPS 2020) in the pFedMe paper's synthetic setting.

Synthetic(0.5, 0.5), 100 clients, sample scale 5, seed 0, logistic regression;
10 clients per round, 600 rounds; each client takes τ = 20 local meta-steps on
batches of 20 with α = 0.005 (inner) and β = 0.005 (outer: FedAvg's client rate in
this setting; `--config.client.learning_rate=0.001` gives the pFedMe paper's rates
for Per-FedAvg, which learn more slowly). At every evaluation each client adapts the global
model with one SGD step of rate α on a batch of its train split and is tested on
its test split. `--config.algorithm=per_fedavg_fo` / `per_fedavg_hf` pick the
first-order and Hessian-free variants.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "per_fedavg"
  c.aggregation.weighting = "uniform"     # the paper's (1/rn) Σ w_i
  c.client.learning_rate = 0.005          # β, the outer step
  c.per_fedavg.inner_lr = 0.005           # α
  c.personalization.finetune_steps = 1
  c.personalization.learning_rate = 0.005
  return c
