"""Data sets as `FederatedData`: synthetic generators, files, partitioners, corruptions."""

from fedjax_pers.data._corrupt import choose_clients, holdout, shuffle_labels
from fedjax_pers.data._files import from_leaf, mnist_idx, read_idx, read_leaf, write_leaf
from fedjax_pers.data._partition import (
    dirichlet,
    iid,
    natural,
    quantity_skew,
    shards,
    split_clients,
)
from fedjax_pers.data._synthetic import synthetic, synthetic_arrays

__all__ = [
    "choose_clients",
    "dirichlet",
    "from_leaf",
    "holdout",
    "iid",
    "mnist_idx",
    "natural",
    "quantity_skew",
    "read_idx",
    "read_leaf",
    "shards",
    "shuffle_labels",
    "split_clients",
    "synthetic",
    "synthetic_arrays",
    "write_leaf",
]
