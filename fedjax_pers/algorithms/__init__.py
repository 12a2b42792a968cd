"""Federated algorithms, each a factory returning `FederatedAlgorithm(init, round)`."""

from fedjax_pers.algorithms._fedavg import fedavg, fedprox

__all__ = ["fedavg", "fedprox"]
