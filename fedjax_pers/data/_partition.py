"""Partitioning a pooled data set over clients (NumPy, seeded), and per-client splits."""

from __future__ import annotations

import numpy as np

from fedjax_pers.core._data import FederatedData


def iid(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """A seeded random permutation cut into `num_clients` near-equal index arrays.

  Every example is used exactly once; sizes differ by at most one.
  """
  if not (isinstance(num_clients, int) and 1 <= num_clients <= num_examples):
    raise ValueError(f"num_clients must be an int in [1, {num_examples}]; got {num_clients!r}.")
  return np.array_split(np.random.default_rng(seed).permutation(num_examples), num_clients)


def split_clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], *,
                  test_fraction: float, num_classes: int, seed: int = 0
                  ) -> tuple[FederatedData, FederatedData]:
  """Each client's examples shuffled and split into train and test `FederatedData`.

  Client c keeps `n_c − ⌈test_fraction · n_c⌉` examples for training (at least
  one) and the rest for its test split (at least one).
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for idx in parts:
    if len(idx) < 2:
      raise ValueError(f"every client needs at least 2 examples to split; got {len(idx)}.")
    idx = rng.permutation(idx)
    n_test = min(max(1, int(np.ceil(test_fraction * len(idx)))), len(idx) - 1)
    train.append(idx[n_test:])
    test.append(idx[:n_test])
  build = lambda ids: FederatedData.from_clients([x[i] for i in ids], [y[i] for i in ids],
                                                 num_classes=num_classes)
  return build(train), build(test)
