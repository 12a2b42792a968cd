"""Partitioning a pooled data set over clients (NumPy, seeded), and per-client splits."""

from __future__ import annotations

import numpy as np

from fedjax_pers.data._sink import federate


def iid(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """A seeded random permutation cut into `num_clients` near-equal index arrays.

  Every example is used exactly once; sizes differ by at most one.
  """
  if not (isinstance(num_clients, int) and 1 <= num_clients <= num_examples):
    raise ValueError(f"num_clients must be an int in [1, {num_examples}]; got {num_clients!r}.")
  return np.array_split(np.random.default_rng(seed).permutation(num_examples), num_clients)


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, *, min_size: int = 1,
              seed: int = 0, max_tries: int = 1000) -> list[np.ndarray]:
  """Dirichlet label skew (Hsu, Qi & Brown, 2019): class c's examples are dealt to
  the clients in proportions p_c ~ Dir(α·1_N).

  Small α gives clients few classes each; α → ∞ approaches IID. The draw is
  repeated (same seeded stream) until every client has at least `min_size`
  examples. Every example is used exactly once.

  Args:
    labels: `[n]` int labels.
    num_clients: N.
    alpha: Concentration α > 0.
    min_size: Smallest allowed client.
    seed: Seed.
    max_tries: Draws before giving up.

  Returns:
    Per-client index arrays (sorted).
  """
  labels = np.asarray(labels)
  if not (isinstance(alpha, (int, float)) and alpha > 0):
    raise ValueError(f"alpha must be a number > 0; got {alpha!r}.")
  if not (isinstance(num_clients, int) and 1 <= num_clients * min_size <= len(labels)):
    raise ValueError(f"num_clients x min_size must be in [1, {len(labels)}]; got "
                     f"{num_clients!r} x {min_size!r}.")
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for idx in by_class:
      idx = rng.permutation(idx)
      cuts = (np.cumsum(rng.dirichlet(alpha * np.ones(num_clients))) * len(idx)).astype(int)
      for i, chunk in enumerate(np.split(idx, cuts[:-1])):
        parts[i].extend(chunk.tolist())
    if min(len(p) for p in parts) >= min_size:
      return [np.sort(np.asarray(p, np.int64)) for p in parts]
  raise ValueError(f"No Dirichlet({alpha}) draw gave every one of {num_clients} clients "
                   f"{min_size}+ examples in {max_tries} tries; lower min_size or raise alpha.")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, *,
           seed: int = 0) -> list[np.ndarray]:
  """Pathological label skew (McMahan et al., AISTATS 2017): examples sorted by label are
  cut into `num_clients · shards_per_client` equal shards, each client gets that many
  at random, so a client sees about `shards_per_client` classes.

  Every example is used exactly once.
  """
  labels = np.asarray(labels)
  total = num_clients * shards_per_client
  if not (isinstance(num_clients, int) and isinstance(shards_per_client, int)
          and 1 <= total <= len(labels)):
    raise ValueError(f"num_clients x shards_per_client must be in [1, {len(labels)}]; got "
                     f"{num_clients!r} x {shards_per_client!r}.")
  rng = np.random.default_rng(seed)
  order = np.lexsort((rng.permutation(len(labels)), labels))   # by label, ties shuffled
  pieces = np.array_split(order, total)
  deal = rng.permutation(total).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([pieces[j] for j in row])) for row in deal]


def quantity_skew(num_examples: int, num_clients: int, sigma: float = 1.0, *,
                  min_size: int = 1, seed: int = 0) -> list[np.ndarray]:
  """IID examples in lognormal sizes: n_i ∝ exp(N(0, σ²)), each at least `min_size`.

  Every example is used exactly once; σ = 0 gives near-equal clients.
  """
  if not (isinstance(num_clients, int) and 1 <= num_clients * min_size <= num_examples):
    raise ValueError(f"num_clients x min_size must be in [1, {num_examples}]; got "
                     f"{num_clients!r} x {min_size!r}.")
  if not sigma >= 0:
    raise ValueError(f"sigma must be >= 0; got {sigma!r}.")
  rng = np.random.default_rng(seed)
  share = rng.lognormal(0.0, sigma, num_clients)
  spare = num_examples - num_clients * min_size
  sizes = min_size + np.floor(share / share.sum() * spare).astype(int)
  sizes[np.argsort(-share)[:num_examples - sizes.sum()]] += 1       # hand out the remainder
  return np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])


def natural(keys) -> tuple[list, list[np.ndarray]]:
  """Groups examples by a natural key (a writer, a speaker), in order of first appearance.

  Returns:
    `(key values, per-client index arrays)`.
  """
  keys = np.asarray(keys)
  values, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  order = np.argsort(first)
  return [values[i].item() for i in order], [np.flatnonzero(inverse == i) for i in order]


def split_clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], *,
                  test_fraction: float, num_classes: int, seed: int = 0,
                  store: str | None = None, source: dict | None = None):
  """Each client's examples shuffled and split into train and test `FederatedData`.

  Client c keeps `n_c − ⌈test_fraction · n_c⌉` examples for training (at least
  one) and the rest for its test split (at least one). With `store`, the splits
  are written to `store/train` and `store/test` a chunk of clients at a time and
  returned as `HostStore`s (`federate`; `source` goes in their headers).
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
  small = [c for c, idx in enumerate(parts) if len(idx) < 2]
  if small:
    raise ValueError(f"every client needs at least 2 examples to split; client {small[0]} "
                     f"has {len(parts[small[0]])}.")
  rng = np.random.default_rng(seed)

  def clients():
    for idx in parts:
      idx = rng.permutation(idx)
      n_test = min(max(1, int(np.ceil(test_fraction * len(idx)))), len(idx) - 1)
      yield x[idx[n_test:]], y[idx[n_test:]], x[idx[:n_test]], y[idx[:n_test]]

  return federate(clients(), num_classes=num_classes, store=store, source=source)


PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
              min_size: int = 1) -> list[np.ndarray]:
  """Index arrays of `num_clients` clients over a pooled data set, by a named scheme.

  Args:
    labels: `[n]` int labels (only `dirichlet` and `shards` look at them).
    num_clients: Number of clients.
    scheme: `iid`, `dirichlet` (`alpha`, `min_size`), `shards`
      (`shards_per_client`) or `quantity_skew` (`sigma`, `min_size`).
    seed: Seed.
    alpha: Dirichlet concentration.
    shards_per_client: Label-sorted shards per client.
    sigma: Lognormal σ of the client sizes.
    min_size: Smallest client (dirichlet, quantity_skew).

  Returns:
    Per-client index arrays; every example is used exactly once.
  """
  labels = np.asarray(labels)
  if scheme == "iid":
    return iid(len(labels), num_clients, seed=seed)
  if scheme == "dirichlet":
    return dirichlet(labels, num_clients, alpha, min_size=min_size, seed=seed)
  if scheme == "shards":
    return shards(labels, num_clients, shards_per_client, seed=seed)
  if scheme == "quantity_skew":
    return quantity_skew(len(labels), num_clients, sigma, min_size=min_size, seed=seed)
  raise ValueError(f"Unknown partition {scheme!r}; expected one of {list(PARTITIONS)}.")


def from_arrays(x: np.ndarray, y: np.ndarray, client_ids, *, test_fraction: float = 0.2,
                seed: int = 0, num_classes: int | None = None, store: str | None = None):
  """Train and test `FederatedData` from pooled arrays with a client-id column.

  Examples are grouped by `client_ids` with `natural` (clients in order of first
  appearance), then each client's examples are shuffled and split as
  `split_clients` does.

  Args:
    x: `[n, ...]` features.
    y: `[n]` int labels.
    client_ids: `[n]` client of each example (any hashable NumPy dtype: ints, strings).
    test_fraction: Share of each client's examples in its test split.
    seed: Seed of the per-client shuffles.
    num_classes: Labels lie in `[0, num_classes)`; default `max(y) + 1`.
    store: None, or a directory to write the splits to as host stores, a chunk
      of clients at a time (`split_clients`).

  Returns:
    `(train, test)` (`HostStore`s with `store`); client c is the c-th distinct id
    in order of first appearance.

  Example:
    >>> x = np.arange(6, dtype=np.float32)[:, None]
    >>> train, test = from_arrays(x, np.zeros(6, int), ["b", "a", "b", "a", "b", "a"],
    ...                           test_fraction=0.4)
    >>> [int(n) for n in train.num_examples], [int(n) for n in test.num_examples]
    ([1, 1], [2, 2])
  """
  x, y, ids = np.asarray(x), np.asarray(y), np.asarray(client_ids)
  if not (x.ndim >= 1 and y.shape == (len(x),) and ids.shape == (len(x),)):
    raise ValueError(f"x [n, ...], y [n] and client_ids [n] must share n; got shapes "
                     f"{x.shape}, {y.shape}, {ids.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must hold integer labels; got dtype {y.dtype}.")
  if len(y) == 0:
    raise ValueError("x, y and client_ids are empty; from_arrays needs at least one example.")
  if y.min() < 0:
    raise ValueError(f"labels y must be >= 0; got a minimum of {int(y.min())}.")
  _, parts = natural(ids)
  small = [i for i, p in enumerate(parts) if len(p) < 2]
  if small:
    raise ValueError(f"every client needs at least 2 examples to split; client ids "
                     f"{[natural(ids)[0][i] for i in small[:5]]} have 1.")
  if num_classes is None:
    num_classes = int(y.max()) + 1
  return split_clients(x, y, parts, test_fraction=test_fraction, num_classes=num_classes,
                       seed=seed, store=store)
