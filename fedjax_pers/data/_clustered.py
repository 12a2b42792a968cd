"""A Synthetic population drawn from k distinct generators: the test bed of clustered FL."""

from __future__ import annotations

from itertools import permutations

import numpy as np

from fedjax_pers.core._data import FederatedData
from fedjax_pers.data._partition import split_clients


def clustered_synthetic(num_groups: int, *, num_clients: int = 30, dim: int = 60,
                        num_classes: int = 10, min_examples: int = 50, seed: int = 0,
                        test_fraction: float = 0.1
                        ) -> tuple[FederatedData, FederatedData, np.ndarray]:
  """Clients whose labels come from one of `num_groups` logistic generators.

  Group g has W_g ~ N(0, 1)^{dim×C} and b_g ~ N(0, 1)^C; client c belongs to
  group `cluster_groups(num_clients, num_groups, seed)[c]`, draws
  n_c = ⌊lognormal(4, 1)⌋ + `min_examples` inputs x ~ N(0, I) (the same law for
  every client: with Synthetic(α, β)'s per-client input means a client would
  hold nearly one label and reveal little of its generator), and labels
  y = argmax(x W_g + b_g). The groups share inputs and differ in the map to
  labels, so no one model fits them all and a clustered
  method should recover the groups (IFCA, Ghosh et al., NeurIPS 2020).

  Returns:
    `(train, test, group)`: the splits (`split_clients`) and `[num_clients]` int group ids.
  """
  if not (isinstance(num_groups, int) and 1 <= num_groups <= num_clients):
    raise ValueError(f"num_groups must be an int in [1, num_clients={num_clients}]; got "
                     f"{num_groups!r}.")
  rs = np.random.RandomState(seed)
  models = [(rs.normal(size=(dim, num_classes)), rs.normal(size=num_classes))
            for _ in range(num_groups)]
  group = cluster_groups(num_clients, num_groups, seed)
  xs, ys = [], []
  for c in range(num_clients):
    n = int(rs.lognormal(4, 1)) + min_examples
    x = rs.normal(size=(n, dim))
    w, b = models[group[c]]
    xs.append(x.astype(np.float32))
    ys.append(np.argmax(x @ w + b, axis=1))
  offsets = np.cumsum([0] + [len(y) for y in ys])
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
  train, test = split_clients(np.concatenate(xs), np.concatenate(ys), parts,
                              test_fraction=test_fraction, num_classes=num_classes, seed=seed)
  return train, test, group


def cluster_groups(num_clients: int, num_groups: int, seed: int = 0) -> np.ndarray:
  """`[num_clients]` the group of each client of `clustered_synthetic`: sizes as equal as
  they can be, in a seeded order (its own stream, `seed + 1`)."""
  return np.random.RandomState(seed + 1).permutation(num_clients) % num_groups


def cluster_recovery(chosen: np.ndarray, group: np.ndarray) -> float:
  """The share of clients whose chosen cluster is their group's, under the best one-to-one
  map of clusters to groups (1.0: the groups recovered exactly, up to their names).
  Clients that never chose (−1) count as wrong."""
  chosen, group = np.asarray(chosen), np.asarray(group)
  k = int(max(chosen.max(), group.max())) + 1
  if k > 8:
    raise ValueError(f"cluster_recovery tries every map of up to 8 clusters; got {k}.")
  return max(float(np.mean(np.asarray(perm)[group] == chosen))
             for perm in permutations(range(k)))
