"""Simulated misbehaving clients, to test robust aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.core._aggregate import Aggregator, as_aggregator


def scaled_updates(aggregator, clients, scale: float) -> Aggregator:
  """Clients in `clients` send `scale · Δ_i` instead of their update Δ_i.

  With `scale = −10` this is the sign-flipping, scaled attack of the Byzantine-
  robustness literature. The wrapped aggregator sees the altered updates.

  Args:
    aggregator: An `Aggregator` or `WeightFn`.
    clients: `[N]` bool mask over the population, True for attackers.
    scale: Factor applied to the attackers' updates.

  Returns:
    The `Aggregator` (not streamable: it must see each update).
  """
  mask = np.asarray(clients)
  if mask.ndim != 1 or mask.dtype != bool:
    raise ValueError(f"clients must be a 1-D bool mask over the population; got {clients!r}.")
  inner = as_aggregator(aggregator)
  bad = jnp.asarray(mask)

  def apply(outputs, state, params):
    f = jnp.where(bad[outputs.client_id], scale, 1.0)
    scaled = jax.tree.map(
        lambda d: d * f.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype), outputs.delta)
    return inner.apply(outputs._replace(delta=scaled), state, params)

  def init(num_clients):
    if mask.shape[0] != num_clients:
      raise ValueError(
          f"clients must have one entry per client ({num_clients}); got {mask.shape[0]}.")
    return inner.init(num_clients)

  return inner._replace(init=init, apply=apply, score=None)
