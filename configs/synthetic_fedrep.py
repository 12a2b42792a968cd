"""FedRep (Collins et al., ICML 2021): 10 head steps with the body frozen, then
R = 20 body steps with the head frozen; pFedMe's synthetic setting with its 60-20-10 MLP (see
`synthetic_fedper.py`).
"""

from configs.synthetic_fedper import get_config as _fedper


def get_config():
  c = _fedper()
  c.algorithm = "fedrep"
  return c
