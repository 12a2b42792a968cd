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

The noise comes from a key kept in the aggregator's state (`DpState`, split
every round), so it is part of the checkpointed server state and a resumed run
draws what an uninterrupted one does.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, Algorithm 1): `C` follows the
γ-quantile of the update norms. Each round also releases the noised fraction of
cohort clients whose update was not clipped,

    b̃ = (Σ_{i ∈ cohort} 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) / m,      (m: expected cohort size)
    C ← C · exp(−η_C (b̃ − γ))                                 (geometric update),

and the update's noise multiplier drops to `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`, so
that the two Gaussian releases together are one Gaussian mechanism of
multiplier `z` (their Theorem 1; the count's bits, centred at ½, have
sensitivity ½): the accountant charges `z`, as for fixed clipping. `C` lives in
`DpState`, checkpointed with the key.

Local DP (`local=True`): each client adds `N(0, (zC)² I)` to its own clipped
update before it leaves the device, so the server (trusted with nothing) sees
only noised updates: `Δ = Σ_i w_i (clip(Δ_i, C) + N(0, (zC)² I)) / W`. Against
the server there is no amplification by sampling and a client's data may change
its update arbitrarily (sensitivity `2C`): each participation is a Gaussian
mechanism of multiplier `z / 2`, composed over every round (`local_epsilon`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._client import ClientOutput

Params = Any


class DpState(NamedTuple):
  """The DP aggregate's server state: the noise key and the current clip norm `C`."""

  key: jax.Array
  clip_norm: jax.Array


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """`z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`: the update's share of a total multiplier `z`.

  Raises `ValueError` unless `σ_b > z / 2` (below, the count alone would cost
  more than `z` allows). `z = 0` (no privacy) gives 0.
  """
  if noise_multiplier == 0:
    return 0.0
  rest = noise_multiplier ** -2 - (2.0 * count_stddev) ** -2 if count_stddev > 0 else -1.0
  if rest <= 0:
    raise ValueError(
        f"count_stddev must exceed noise_multiplier / 2 = {0.5 * noise_multiplier:.6g} "
        f"for adaptive clipping to fit in noise_multiplier={noise_multiplier!r}; got "
        f"{count_stddev!r}.")
  return rest ** -0.5


def adapt_clip_norm(clip_norm, norms, valid, count_noise, *, target_quantile: float,
                    learning_rate: float, expected_clients: float):
  """One geometric step of `C` towards the γ-quantile of `norms` (module docstring).

  `valid[k]` masks the clients that count; `count_noise` is the draw of
  `N(0, σ_b²)` (0 without privacy). Returns `(C_next, b̃)`.
  """
  unclipped = jnp.sum(jnp.where(valid & (norms <= clip_norm), 1.0, 0.0))
  frac = (unclipped + count_noise) / expected_clients
  return clip_norm * jnp.exp(-learning_rate * (frac - target_quantile)), frac


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
                         key: jax.Array, *, example_cap: int | None = None,
                         target_quantile: float | None = None,
                         clip_learning_rate: float = 0.2,
                         count_stddev: float | None = None,
                         expected_clients: float | None = None,
                         local: bool = False) -> Aggregator:
  """The DP-FedAvg aggregate (module docstring) as the round's `Aggregator`.

  Args:
    clip_norm: `C` > 0 (with `target_quantile`: its initial value).
    noise_multiplier: `z` ≥ 0 (0: clipping only, no privacy); with adaptive
      clipping, the total over the update and the count (module docstring).
    denominator: `W` > 0, fixed (`expected_weight`).
    key: Key of the noise (the aggregator's state carries its successors).
    example_cap: `n_cap` for the capped data-size weights; None: `w_i = 1`.
    target_quantile: γ in (0, 1) turns adaptive clipping on; None: fixed `C`.
    clip_learning_rate: η_C > 0 of the geometric update.
    count_stddev: σ_b ≥ 0 of the count's noise; must exceed `z / 2` when
      `z > 0`. Default: the paper's `m / 20`, or `z` where that is larger (the
      paper's cohorts were large and `z` near 1): `z_Δ ≤ 1.155 z`.
    expected_clients: `m` > 0, the expected cohort size (needed with γ).
    local: Local DP: each client noises its own clipped update (module
      docstring); the server adds nothing.

  Returns:
    An `Aggregator` with state `DpState` whose `weights` are `w_i / W` (zero for
    non-finite updates, which are left out; what a client sends does not change
    the noise).
  """
  _check_number("clip_norm", clip_norm, zero=False)
  _check_number("noise_multiplier", noise_multiplier, zero=True)
  _check_number("denominator", denominator, zero=False)
  if example_cap is not None and not (isinstance(example_cap, int) and example_cap >= 1):
    raise ValueError(f"example_cap must be None or an int >= 1; got {example_cap!r}.")
  z_update = float(noise_multiplier)
  if not isinstance(local, bool):
    raise ValueError(f"local must be a bool; got {local!r}.")
  if local and target_quantile is not None:
    raise ValueError("Adaptive clipping (target_quantile) under local DP is not built: the "
                     "count of unclipped clients would need each client's own noise.")
  if target_quantile is not None:
    if not (isinstance(target_quantile, (int, float)) and 0 < target_quantile < 1):
      raise ValueError(f"target_quantile must be a number in (0, 1) (or None: fixed "
                       f"clipping); got {target_quantile!r}.")
    _check_number("clip_learning_rate", clip_learning_rate, zero=False)
    _check_number("expected_clients", expected_clients, zero=False)
    if count_stddev is None:   # the paper's m / 20, raised to z where that is too little
      count_stddev = max(expected_clients / 20, float(noise_multiplier))
    _check_number("count_stddev", count_stddev, zero=True)
    z_update = update_noise_multiplier(float(noise_multiplier), float(count_stddev))

  def apply(outputs: ClientOutput, state: DpState, params):
    del params
    c = state.clip_norm
    w = jnp.where(outputs.finite, capped_weights(outputs.num_examples, example_cap), 0.0)
    finite = outputs.finite
    deltas = jax.tree.map(
        lambda d: jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0),
        outputs.delta)
    clipped, norms = clip_updates(deltas, c)
    key, k_noise = jax.random.split(state.key)
    leaves, tree = jax.tree.flatten(clipped)
    keys = jax.random.split(k_noise, len(leaves))
    if local:   # each client's own noise, then the weighted sum
      noised = [jnp.tensordot(w.astype(d.dtype), d + (z_update * c * jax.random.normal(
          k, d.shape, d.dtype)).astype(d.dtype), axes=1) for d, k in zip(leaves, keys)]
    else:
      noised = [jnp.tensordot(w.astype(d.dtype), d, axes=1)
                + (z_update * c * jax.random.normal(k, d.shape[1:], d.dtype)).astype(d.dtype)
                for d, k in zip(leaves, keys)]
    delta = jax.tree.map(lambda s: s / denominator, jax.tree.unflatten(tree, noised))
    if target_quantile is not None:
      count_noise = count_stddev * jax.random.normal(jax.random.fold_in(k_noise, 1), ())
      c, _ = adapt_clip_norm(c, norms, finite, count_noise, target_quantile=target_quantile,
                             learning_rate=clip_learning_rate,
                             expected_clients=expected_clients)
    return delta, w / denominator, DpState(key, c)

  return Aggregator(init=lambda num_clients: DpState(key, jnp.float32(clip_norm)),
                    apply=apply)


def _check_number(name: str, v, *, zero: bool) -> None:
  """Raises `ValueError` unless `v` is a finite number > 0 (`zero`: >= 0)."""
  number = isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))
  if not (number and (v >= 0 if zero else v > 0)):
    raise ValueError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}; "
                     f"got {v!r}.")
