"""Ditto (Li et al., ICML 2021) in the pFedMe paper's synthetic setting.

Synthetic(0.5, 0.5), 100 clients, sample scale 5, logistic regression, batch 20,
R = 20 local steps at lr 0.005 for the global model and 20 personal steps with
λ = 1 towards it, 10 clients per round, 600 rounds. Each client is evaluated with
its own personal model v_k.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "ditto"
  c.ditto.lam = 1.0
  c.personalization.finetune_steps = 0
  return c
