"""Data sets as `FederatedData`: synthetic generators (loaders come later)."""

from fedjax_pers.data._synthetic import synthetic, synthetic_arrays

__all__ = ["synthetic", "synthetic_arrays"]
