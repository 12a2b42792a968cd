"""Federated algorithms, one short factory per file, each returning a `FederatedAlgorithm`."""

from fedjax_pers.algorithms._ditto import ditto
from fedjax_pers.algorithms._fedavg import fedavg, fedprox
from fedjax_pers.algorithms._fedper import fedper, fedrep, lg_fedavg

__all__ = ["ditto", "fedavg", "fedper", "fedprox", "fedrep", "lg_fedavg"]
