"""Synthetic(α, β): the federated logistic data of the FedProx and pFedMe papers."""

from __future__ import annotations

import numpy as np

from fedjax_pers.core._data import FederatedData


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


def synthetic(
    alpha: float, beta: float, *, num_clients: int = 30, dim: int = 60,
    num_classes: int = 10, sample_scale: int = 1, iid: bool = False, seed: int = 0,
    test_fraction: float = 0.1,
) -> tuple[FederatedData, FederatedData]:
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

  Returns:
    `(train, test)` `FederatedData` with float32 features.
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
  rs = np.random.RandomState(seed)
  xs, ys = _generate(rs, alpha, beta, num_clients, dim, num_classes, sample_scale, iid)
  train_x, train_y, test_x, test_y = [], [], [], []
  for x, y in zip(xs, ys):
    order = rs.permutation(len(y))
    n_train = int((1 - test_fraction) * len(y))
    train_x.append(x[order[:n_train]])
    train_y.append(y[order[:n_train]])
    test_x.append(x[order[n_train:]])
    test_y.append(y[order[n_train:]])
  train = FederatedData.from_clients(train_x, train_y, num_classes=num_classes)
  test = FederatedData.from_clients(test_x, test_y, num_classes=num_classes)
  return train, test
