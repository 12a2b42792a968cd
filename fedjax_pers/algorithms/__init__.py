"""Federated algorithms, one short factory per file, each returning a `FederatedAlgorithm`."""

from fedjax_pers.algorithms._apfl import apfl
from fedjax_pers.algorithms._ditto import ditto
from fedjax_pers.algorithms._fedala import fedala
from fedjax_pers.algorithms._fedavg import fedavg, fedprox
from fedjax_pers.algorithms._fedbabu import fedbabu
from fedjax_pers.algorithms._fedbn import fedbn
from fedjax_pers.algorithms._fedbuff import fedbuff
from fedjax_pers.algorithms._feddyn import feddyn
from fedjax_pers.algorithms._fednova import fednova
from fedjax_pers.algorithms._fedper import fedper, fedrep, lg_fedavg
from fedjax_pers.algorithms._fedrod import fedrod
from fedjax_pers.algorithms._ifca import ifca
from fedjax_pers.algorithms._moon import moon
from fedjax_pers.algorithms._per_fedavg import per_fedavg
from fedjax_pers.algorithms._pfedhn import pfedhn
from fedjax_pers.algorithms._pfedme import pfedme
from fedjax_pers.algorithms._reptile import reptile
from fedjax_pers.algorithms._scaffold import scaffold

__all__ = [
    "apfl", "ditto", "fedala", "fedavg", "fedbabu", "fedbn", "fedbuff", "feddyn", "fednova",
    "fedper", "fedprox", "fedrep", "fedrod", "ifca", "lg_fedavg", "moon", "per_fedavg", "pfedhn",
    "pfedme", "reptile", "scaffold",
]
