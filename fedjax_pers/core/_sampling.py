"""Choosing each round's cohort of clients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_cohort(clients_per_round: int, num_clients: int) -> None:
  """Raises `ValueError` unless `1 <= clients_per_round <= num_clients`."""
  if not isinstance(clients_per_round, (int, np.integer)) or not (
      1 <= clients_per_round <= num_clients):
    raise ValueError(
        f"clients_per_round must be an int in [1, num_clients] = [1, {num_clients}]; "
        f"got {clients_per_round!r}.")


def check_probs(probs, num_clients: int) -> np.ndarray:
  """Validates client sampling probabilities; returns them normalised."""
  p = np.asarray(probs, np.float64)
  if p.shape != (num_clients,):
    raise ValueError(
        f"sampling probabilities must have shape (num_clients,) = ({num_clients},); "
        f"got shape {p.shape}.")
  if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(
        "sampling probabilities must be finite, non-negative and not all zero; "
        f"got min={p.min()}, sum={p.sum()}.")
  return p / p.sum()


def sample_clients(
    key: jax.Array, num_clients: int, clients_per_round: int, *,
    probs: jax.Array | None = None,
) -> jax.Array:
  """Samples a cohort without replacement.

  With `probs=None` every cohort of size `k` is equally likely; a cohort of all
  clients is returned in order (`arange`), so the engine can skip gathering.
  With `probs`, clients are drawn one by one with probability proportional to
  `probs` among those not yet drawn (Gumbel top-k).

  Args:
    key: PRNG key.
    num_clients: Population size `N` (static).
    clients_per_round: Cohort size `k` (static), `1 <= k <= N`.
    probs: Optional `[N]` non-negative sampling weights.

  Returns:
    `[k]` int32 client indices, distinct.
  """
  check_cohort(clients_per_round, num_clients)
  if probs is None:
    if clients_per_round == num_clients:
      return jnp.arange(num_clients, dtype=jnp.int32)
    return jax.random.choice(
        key, num_clients, (clients_per_round,), replace=False).astype(jnp.int32)
  return jax.random.choice(
      key, num_clients, (clients_per_round,), replace=False, p=probs).astype(jnp.int32)
