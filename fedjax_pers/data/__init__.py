"""Data sets as `FederatedData`: synthetic generators, and corrupted populations."""

from fedjax_pers.data._corrupt import choose_clients, holdout, shuffle_labels
from fedjax_pers.data._synthetic import synthetic, synthetic_arrays

__all__ = ["choose_clients", "holdout", "shuffle_labels", "synthetic", "synthetic_arrays"]
