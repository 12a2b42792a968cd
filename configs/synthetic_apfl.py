"""APFL (Deng et al., 2020), α = 0.25, in the pFedMe paper's synthetic setting.

Synthetic(0.5, 0.5), 100 clients, sample scale 5, logistic regression, batch 20,
R = 20 local steps at lr 0.005 for both w and v_k, 10 clients per round, 600
rounds. Each client is evaluated with its mixture α v_k + (1 − α) w.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "apfl"
  c.apfl.alpha = 0.25
  c.personalization.finetune_steps = 0
  return c
