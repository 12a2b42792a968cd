"""Every personalization method on MNIST Dirichlet(0.1), on seen and unseen clients.

`python -m fedjax_pers.compare --config=configs/compare_personal.py --workdir=DIR`

The setting of `mnist_dirichlet_personal` (50 clients with Dirichlet(0.1) label
skew, a 784-200-10 MLP, 10 clients per round, 100 rounds) with 20% of the clients
(10) held out of training (`data.holdout_clients=0.2`). Seen clients are tested
with each method's own personalized models (fine-tuned for `finetune`, `fedbabu`,
Per-FedAvg, Reptile; personal for the others; IFCA's chosen cluster; pFedHN's
generated model); unseen clients personalize as a newcomer would: by the method's
own adaptation where it has one (IFCA picks a cluster, pFedHN fits an embedding),
then by the config's 10 fine-tuning steps. The first row, FedAvg without
fine-tuning, is the baseline the "better" columns count against.
"""

import ml_collections

from configs.mnist_dirichlet_personal import get_config as _personal


def get_config():
  c = _personal()
  c.data.holdout_clients = 0.2
  c.compare = ml_collections.ConfigDict()
  c.compare.target_accuracy = 0.8
  c.compare.strategies = (
      "fedavg: algorithm=fedavg, personalization.finetune_steps=0",
      "finetune: algorithm=finetune",
      "fedbabu: algorithm=fedbabu",
      # Per-FedAvg counts meta-steps: 8, the batches of the others' one epoch.
      "per_fedavg: algorithm=per_fedavg, client.local_epochs=None, client.local_steps=8",
      "reptile: algorithm=reptile",
      "ditto: algorithm=ditto",
      "apfl: algorithm=apfl",
      "fedper: algorithm=fedper",
      "fedrep: algorithm=fedrep",
      "lg_fedavg: algorithm=lg_fedavg",
      "pfedme: algorithm=pfedme",
      "fedrod: algorithm=fedrod",
      "fedala: algorithm=fedala",
      "ifca: algorithm=ifca",
      "pfedhn: algorithm=pfedhn",
  )
  return c
