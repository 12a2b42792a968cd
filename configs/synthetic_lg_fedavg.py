"""LG-FedAvg (Liang et al., 2020): the lower layer stays with each client, the
head is averaged; pFedMe's synthetic setting with its 60-20-10 MLP (see
`synthetic_fedper.py`).
"""

from configs.synthetic_fedper import get_config as _fedper


def get_config():
  c = _fedper()
  c.algorithm = "lg_fedavg"
  return c
