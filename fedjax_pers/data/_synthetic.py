"""Synthetic(α, β): the federated logistic data of the FedProx and pFedMe papers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fedjax_pers.core._data import FederatedData
from fedjax_pers.data._sink import federate
from fedjax_pers.data._store import HostStore


def synthetic_arrays(
    alpha: float, beta: float, *, num_clients: int = 30, dim: int = 60,
    num_classes: int = 10, sample_scale: int = 1, iid: bool = False, seed: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per-client `(xs, ys)` of Synthetic(α, β), draw for draw as the papers' script.

  With the legacy RNG seeded by `seed` (a fresh `RandomState(seed)` gives the same
  stream as `numpy.random.seed(seed)`), in order:
    n_k = (⌊lognormal(4, 2)⌋ + 50) · sample_scale for each client;
    u_k ~ N(0, α) (mean of W_k and of b_k); B_k ~ N(0, β);
    Σ = diag((j+1)^−1.2), j = 0..dim−1;
    v_k ~ N(B_k, 1)^dim (iid: v_k = B_k·1);
    iid only: one global W ~ N(0, 1)^{dim×C}, b ~ N(0, 1)^C;
    per client: W_k ~ N(u_k, 1)^{dim×C}, b_k ~ N(u_k, 1)^C (replaced by the global
    ones when iid), x ~ N(v_k, Σ) (n_k rows), y = argmax(x W_k + b_k).

  Returns:
    `(xs, ys)`: float64 `[n_k, dim]` and int64 `[n_k]` arrays per client.
  """
  rs = np.random.RandomState(seed)
  return _generate(rs, alpha, beta, num_clients, dim, num_classes, sample_scale, iid)


def _generate(rs, alpha, beta, num_clients, dim, num_classes, sample_scale, iid):
  sizes = (rs.lognormal(4, 2, num_clients).astype(int) + 50) * sample_scale
  mean_w = rs.normal(0, alpha, num_clients)
  mean_b = mean_w
  big_b = rs.normal(0, beta, num_clients)
  cov = np.diag(np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2))
  mean_x = np.zeros((num_clients, dim))
  for k in range(num_clients):
    mean_x[k] = np.ones(dim) * big_b[k] if iid else rs.normal(big_b[k], 1, dim)
  if iid:
    w_global = rs.normal(0, 1, (dim, num_classes))
    b_global = rs.normal(0, 1, num_classes)
  xs, ys = [], []
  for k in range(num_clients):
    w = rs.normal(mean_w[k], 1, (dim, num_classes))
    b = rs.normal(mean_b[k], 1, num_classes)
    if iid:
      w, b = w_global, b_global
    x = rs.multivariate_normal(mean_x[k], cov, sizes[k])
    xs.append(x)
    ys.append(np.argmax(x @ w + b, axis=1))
  return xs, ys


def _copy(rs: np.random.RandomState) -> np.random.RandomState:
  out = np.random.RandomState()
  out.set_state(rs.get_state())
  return out


def _skip(rs: np.random.RandomState, count: int, block: int = 1 << 22) -> None:
  """Advances `rs` past `count` Gaussian draws (legacy `normal`, `standard_normal` and
  `multivariate_normal` each take one per number drawn)."""
  while count > 0:
    rs.standard_normal(min(count, block))
    count -= block


def _split_clients(rs, alpha, beta, num_clients, dim, num_classes, sample_scale, iid,
                   test_fraction) -> Iterator[tuple[np.ndarray, ...]]:
  """`_generate` then each client's shuffle and split, yielded one client at a time.

  The script draws every client's data, then every client's shuffle, from one
  stream. To yield client k before drawing client k + 1 without changing a single
  number, three copies of the stream are positioned first (by skipping draws):
  one where the input means start, one where the clients' models and inputs start,
  one where the shuffles start. Memory is O(num_clients) scalars and one client.
  """
  sizes = (rs.lognormal(4, 2, num_clients).astype(int) + 50) * sample_scale
  mean_w = rs.normal(0, alpha, num_clients)
  big_b = rs.normal(0, beta, num_clients)
  means = _copy(rs)
  if not iid:
    _skip(rs, num_clients * dim)
  else:
    w_global = rs.normal(0, 1, (dim, num_classes))
    b_global = rs.normal(0, 1, num_classes)
  draws = _copy(rs)
  _skip(rs, int(np.sum(sizes, dtype=np.int64)) * dim
        + num_clients * (dim * num_classes + num_classes))
  shuffles = rs
  cov = np.diag(np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2))
  for k in range(num_clients):
    mean_x = np.ones(dim) * big_b[k] if iid else means.normal(big_b[k], 1, dim)
    w = draws.normal(mean_w[k], 1, (dim, num_classes))
    b = draws.normal(mean_w[k], 1, num_classes)
    if iid:
      w, b = w_global, b_global
    x = draws.multivariate_normal(mean_x, cov, sizes[k])
    y = np.argmax(x @ w + b, axis=1)
    order = shuffles.permutation(len(y))
    n_train = int((1 - test_fraction) * len(y))
    tr, te = order[:n_train], order[n_train:]
    yield x[tr], y[tr], x[te], y[te]


def synthetic(
    alpha: float, beta: float, *, num_clients: int = 30, dim: int = 60,
    num_classes: int = 10, sample_scale: int = 1, iid: bool = False, seed: int = 0,
    test_fraction: float = 0.1, store: str | None = None,
) -> tuple[FederatedData, FederatedData] | tuple[HostStore, HostStore]:
  """Synthetic(α, β) (Shamir et al. 2014; Li et al., FedProx, MLSys 2020).

  α controls how much the clients' models differ, β how much their inputs do.
  After generation, each client's examples are shuffled with the same random
  stream and split: the first ⌊(1 − test_fraction)·n_k⌋ train, the rest test.
  Papers' settings: FedProx Synthetic(0,0)/(0.5,0.5)/(1,1) with 30 clients,
  sample_scale 1; pFedMe Synthetic(0.5, 0.5) with 100 clients, sample_scale 5,
  seed 0.

  Args:
    alpha: Spread of the clients' true models (>= 0).
    beta: Spread of the clients' input means (>= 0).
    num_clients: Number of clients.
    dim: Feature dimension.
    num_classes: Number of classes.
    sample_scale: Multiplies every client's size.
    iid: One shared model and input mean law for all clients.
    seed: Seed of the legacy NumPy RNG.
    test_fraction: Fraction of each client's examples held out, in (0, 1).
    store: None, or a directory: write `store/train` and `store/test` (see
      `federate`) one chunk of clients at a time, never holding the population;
      the numbers are the same as in memory.

  Returns:
    `(train, test)` `FederatedData` with float32 features (`HostStore`s with
    `store`).
  """
  for name, v in (("alpha", alpha), ("beta", beta)):
    if not (np.isfinite(v) and v >= 0):
      raise ValueError(f"{name} must be finite and >= 0; got {v!r}.")
  for name, v in (("num_clients", num_clients), ("dim", dim), ("sample_scale", sample_scale)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int; got {v!r}.")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}.")
  source = dict(loader="synthetic", alpha=float(alpha), beta=float(beta),
                num_clients=int(num_clients), dim=int(dim), num_classes=int(num_classes),
                sample_scale=int(sample_scale), iid=bool(iid), seed=int(seed),
                test_fraction=float(test_fraction))
  clients = _split_clients(np.random.RandomState(seed), alpha, beta, num_clients, dim,
                           num_classes, sample_scale, iid, test_fraction)
  return federate(clients, num_classes=num_classes, store=store, source=source)
