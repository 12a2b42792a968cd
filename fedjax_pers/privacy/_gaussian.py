"""Client-level DP-FedAvg's server side: clipped updates, Gaussian noise, a fixed
denominator (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Algorithm 1).

Each client's whole update is clipped to L2 norm `C`,

    clip(Δ_i, C) = Δ_i · min(1, C / ‖Δ_i‖₂),

weighted by `w_i ∈ [0, 1]` (1, or `min(n_i / n_cap, 1)`: the paper's capped
data-size weights) and summed; the server adds `N(0, σ² I)`, `σ = z C` (one
client moves the sum by at most `max_i w_i · C ≤ C`), and divides by a fixed
`W` (the expected total weight of a cohort, `q Σ_k w_k`), never by the
realised sum, which would depend on who took part:

    Δ = (Σ_{i ∈ cohort} w_i clip(Δ_i, C) + N(0, (zC)² I)) / W.

The noise comes from a key kept in the aggregator's state (split every round),
so it is part of the checkpointed server state and a resumed run draws what an
uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._client import ClientOutput

Params = Any


def global_norms(deltas: Params) -> jax.Array:
  """`[k]` L2 norms of stacked updates (over every leaf of each client's update)."""
  leaves = jax.tree.leaves(deltas)
  sq = sum(jnp.sum(jnp.reshape(d, (d.shape[0], -1)).astype(jnp.float32) ** 2, axis=1)
           for d in leaves)
  return jnp.sqrt(sq)


def clip_updates(deltas: Params, clip_norm) -> tuple[Params, jax.Array]:
  """Stacked updates each scaled to L2 norm at most `clip_norm`; `(clipped, norms)`.

  An update of norm ≤ `clip_norm` is returned unchanged (scale exactly 1).
  """
  norms = global_norms(deltas)
  scale = jnp.where(norms > clip_norm, clip_norm / jnp.maximum(norms, 1e-30), 1.0)
  shaped = lambda d: scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
  return jax.tree.map(lambda d: d * shaped(d), deltas), norms


def capped_weights(num_examples: jax.Array, example_cap: int | None) -> jax.Array:
  """`w_i = min(n_i / n_cap, 1)`, or 1 for every client when `example_cap` is None."""
  n = jnp.asarray(num_examples, jnp.float32)
  if example_cap is None:
    return jnp.ones_like(n)
  return jnp.minimum(n / example_cap, 1.0)


def expected_weight(sizes: np.ndarray, example_cap: int | None, sampling_rate: float) -> float:
  """`W = q Σ_k w_k`: a cohort's expected total weight, the fixed denominator."""
  w = np.ones(len(sizes)) if example_cap is None else np.minimum(
      np.asarray(sizes, np.float64) / example_cap, 1.0)
  return float(sampling_rate * w.sum())


def dp_fedavg_aggregator(clip_norm: float, noise_multiplier: float, denominator: float,
                         key: jax.Array, *, example_cap: int | None = None) -> Aggregator:
  """The DP-FedAvg aggregate (module docstring) as the round's `Aggregator`.

  Args:
    clip_norm: `C` > 0.
    noise_multiplier: `z` ≥ 0 (0: clipping only, no privacy).
    denominator: `W` > 0, fixed (`expected_weight`).
    key: Key of the noise (the aggregator's state carries its successors).
    example_cap: `n_cap` for the capped data-size weights; None: `w_i = 1`.

  Returns:
    An `Aggregator` whose `weights` are `w_i / W` (zero for non-finite updates,
    which are left out; what a client sends does not change the noise).
  """
  _check_number("clip_norm", clip_norm, zero=False)
  _check_number("noise_multiplier", noise_multiplier, zero=True)
  _check_number("denominator", denominator, zero=False)
  if example_cap is not None and not (isinstance(example_cap, int) and example_cap >= 1):
    raise ValueError(f"example_cap must be None or an int >= 1; got {example_cap!r}.")
  sigma = float(noise_multiplier) * float(clip_norm)

  def apply(outputs: ClientOutput, key, params):
    del params
    w = jnp.where(outputs.finite, capped_weights(outputs.num_examples, example_cap), 0.0)
    finite = outputs.finite
    deltas = jax.tree.map(
        lambda d: jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0),
        outputs.delta)
    clipped, _ = clip_updates(deltas, clip_norm)
    key, k_noise = jax.random.split(key)
    leaves, tree = jax.tree.flatten(clipped)
    keys = jax.random.split(k_noise, len(leaves))
    noised = [jnp.tensordot(w.astype(d.dtype), d, axes=1)
              + sigma * jax.random.normal(k, d.shape[1:], d.dtype)
              for d, k in zip(leaves, keys)]
    delta = jax.tree.map(lambda s: s / denominator, jax.tree.unflatten(tree, noised))
    return delta, w / denominator, key

  return Aggregator(init=lambda num_clients: key, apply=apply)


def _check_number(name: str, v, *, zero: bool) -> None:
  """Raises `ValueError` unless `v` is a finite number > 0 (`zero`: >= 0)."""
  number = isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))
  if not (number and (v >= 0 if zero else v > 0)):
    raise ValueError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}; "
                     f"got {v!r}.")
