"""FedPer (personal head) in the pFedMe paper's synthetic setting, with its 60-20-10 MLP.

Synthetic(0.5, 0.5), 100 clients, sample scale 5; MLP 60-20-10 whose last layer
stays with each client; batch 20, R = 20 local steps at lr 0.005, 10 clients per
round, 600 rounds. `--config.algorithm=lg_fedavg` keeps the lower layer local
and shares the head instead.
"""

from configs.synthetic_finetune import get_config as _finetune


def get_config():
  c = _finetune()
  c.algorithm = "fedper"
  c.model.name = "mlp"
  c.model.hidden = (20,)
  c.personalization.finetune_steps = 0
  return c
