"""Robust aggregators, where the aggregate is not a weighted mean of all updates.

Coordinate-wise median and trimmed mean (Yin et al., ICML 2018), Krum and
multi-Krum (Blanchard et al., NeurIPS 2017), and norm clipping. All run on the
finite updates of the cohort only: non-finite updates are never part of an
aggregate, and `m` below counts the finite clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_pers.aggregation._quality import sq_norms
from fedjax_pers.aggregation._weights import WeightFn, num_examples, stateless
from fedjax_pers.core._aggregate import Aggregator, mean_aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, weighted_sum, zero_nonfinite
from fedjax_pers.core._traced import traced


def sort_clients(x: jax.Array) -> jax.Array:
  """`jnp.sort(x, axis=0)` by a bitonic sorting network, for arrays without NaN.

  Padded to a power of two with +inf, then log2(n)(log2(n)+1)/2 stages of
  elementwise min/max against a block-reversed copy. Every stage is one
  vectorised pass over all coordinates, which on CPU is 10-25x faster than
  XLA's comparison sort along a short axis (0.4 against 4.5 ms for 100 x 610).
  """
  shape = x.shape
  n0 = shape[0]
  n = 1 << max(n0 - 1, 0).bit_length()
  x = x.reshape(n0, -1)          # one coordinate axis: the block reversal stays cheap
  x = jnp.concatenate([x, jnp.full((n - n0, x.shape[1]), jnp.inf, x.dtype)])
  i = np.arange(n)
  k = 2
  while k <= n:
    j = k // 2
    while j >= 1:
      partner = x.reshape(n // (2 * j), 2, j, -1)[:, ::-1].reshape(x.shape)
      take_min = jnp.asarray(((i & j) == 0) == ((i & k) == 0))[:, None]
      x = jnp.where(take_min, jnp.minimum(x, partner), jnp.maximum(x, partner))
      j //= 2
    k *= 2
  return x[:n0].reshape(shape)


def _flat(outputs):
  """The cohort's updates as one `[k, P]` array (non-finite rows as +inf), and the
  function that turns a `[P]` vector back into the parameter tree."""
  _, unravel = ravel_pytree(jax.tree.map(lambda d: d[0], outputs.delta))
  flat = jax.vmap(lambda t: ravel_pytree(t)[0])(outputs.delta)
  return jnp.where(outputs.finite[:, None], flat, jnp.inf), unravel


def _rank_mean(outputs, lo, hi):
  """Per coordinate, the mean of the sorted finite values of ranks `lo ≤ r < hi`."""
  flat, unravel = _flat(outputs)
  ranked = sort_clients(flat)            # one sort of all coordinates at once
  r = jnp.arange(outputs.finite.shape[0])
  take = ((r >= lo) & (r < hi) & (r < jnp.sum(outputs.finite)))[:, None]
  total = jnp.sum(jnp.where(take, ranked, 0.0), axis=0)
  return unravel(safe_divide(total, jnp.sum(take).astype(total.dtype)))


def _even(outputs):
  return normalize(jnp.ones(outputs.finite.shape, jnp.float32), outputs.finite)


def median() -> Aggregator:
  """Coordinate-wise median of the finite updates (mean of the two middle values for even m).

  The reported weights are `1/m` (every finite client takes part).
  """

  def apply(outputs, state, params):
    del params
    m = jnp.sum(outputs.finite)
    lo = (m - 1) // 2
    return _rank_mean(outputs, lo, m - lo), _even(outputs), state

  return Aggregator(init=stateless, apply=apply)


def trimmed_mean(beta: float) -> Aggregator:
  """Coordinate-wise β-trimmed mean: drop the ⌊βm⌋ largest and smallest values, average the rest.

  Args:
    beta: Fraction trimmed at each end, in [0, 0.5).
  """
  if not (traced(beta) or isinstance(beta, (int, float)) and 0 <= beta < 0.5):
    raise ValueError(f"beta (trimmed fraction per side) must be in [0, 0.5); got {beta!r}.")

  def apply(outputs, state, params):
    del params
    k = outputs.finite.shape[0]
    if not traced(beta) and beta > 0 and int(beta * k) == 0:   # concrete β only
      raise ValueError(
          f"trimmed_mean(beta={beta}) trims floor(beta k) = 0 of the k={k} clients per round "
          f"at each end, so it would be the plain mean; use beta >= 1/k = {1 / k:.3g} or "
          "more clients per round.")
    m = jnp.sum(outputs.finite)
    b = jnp.floor(beta * m).astype(jnp.int32)
    return _rank_mean(outputs, b, m - b), _even(outputs), state

  return Aggregator(init=stateless, apply=apply)


def krum_scores(outputs, f: int) -> jax.Array:
  """`[k]` Krum scores: the sum of squared distances to the `m − f − 2` nearest other updates.

  Non-finite clients score +inf and are never neighbours. Distances are taken
  about the finite clients' mean, `‖a − b‖² = ‖a'‖² + ‖b'‖² − 2⟨a', b'⟩` with
  `a' = a − μ`: uncentred, a large common part of the updates cancels in float32
  and drowns their spread (and can change the pick).
  """
  deltas = zero_nonfinite(outputs)
  k = outputs.finite.shape[0]
  mu = weighted_sum(normalize(jnp.ones(k), outputs.finite), deltas)
  keep = lambda d: outputs.finite.reshape((-1,) + (1,) * (d.ndim - 1))
  deltas = jax.tree.map(lambda d, m: jnp.where(keep(d), d - m[None], 0.0), deltas, mu)
  sq = sq_norms(deltas)
  flat = [d.reshape(k, -1) for d in jax.tree.leaves(deltas)]
  gram = sum(d @ d.T for d in flat)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  pair = outputs.finite[:, None] & outputs.finite[None, :] & ~jnp.eye(k, dtype=bool)
  near = sort_clients(jnp.where(pair, dist, jnp.inf).T).T   # each row sorted
  m = jnp.sum(outputs.finite)
  take = jnp.arange(k)[None, :] < jnp.maximum(m - f - 2, 1)
  scores = jnp.sum(jnp.where(take, near, 0.0), axis=1)
  return jnp.where(outputs.finite, scores, jnp.inf)


def _check_f(f, name):
  if not (isinstance(f, int) and f >= 0):
    raise ValueError(f"{name}: f (Byzantine clients tolerated) must be an int >= 0; got {f!r}.")


def _check_cohort(k, f, name):
  if k < 2 * f + 3:
    raise ValueError(
        f"{name} with f={f} needs at least 2f + 3 = {2 * f + 3} clients per round; got {k}.")


def multi_krum(f: int, m: int | None = None) -> Aggregator:
  """Multi-Krum: the plain mean of the `m` updates with the lowest Krum scores.

  Args:
    f: Number of Byzantine clients to tolerate (the cohort needs k ≥ 2f + 3).
    m: How many updates to average (default: m_finite − f, with m_finite the
      number of finite updates in the cohort).
  """
  _check_f(f, "multi_krum")
  if m is not None and not (isinstance(m, int) and m >= 1):
    raise ValueError(f"multi_krum: m must be a positive int or None; got {m!r}.")

  def apply(outputs, state, params):
    del params
    k = outputs.finite.shape[0]
    _check_cohort(k, f, "multi_krum")
    if m is not None and m > k:
      raise ValueError(f"multi_krum: m={m} exceeds the k={k} clients per round, so it would "
                       "average them all.")
    keep = jnp.sum(outputs.finite) - f if m is None else m
    scores = krum_scores(outputs, f)
    rank = jnp.argsort(jnp.argsort(scores))
    w = normalize(jnp.ones((k,), jnp.float32), (rank < keep) & outputs.finite)
    return weighted_sum(w, zero_nonfinite(outputs)), w, state

  return Aggregator(init=stateless, apply=apply)


def krum(f: int) -> Aggregator:
  """Krum: the single update with the lowest Krum score (`multi_krum(f, m=1)`).

  Args:
    f: Number of Byzantine clients to tolerate (the cohort needs k ≥ 2f + 3).
  """
  _check_f(f, "krum")
  return multi_krum(f, m=1)


def clip_norm(max_norm: float, weighting: WeightFn | None = None) -> Aggregator:
  """Weighted mean of updates clipped to norm ≤ C: `Δ_i ← Δ_i · min(1, C / ||Δ_i||)`.

  Args:
    max_norm: C > 0.
    weighting: Weights of the mean (default `num_examples()`).
  """
  if not (traced(max_norm) or isinstance(max_norm, (int, float)) and max_norm > 0):
    raise ValueError(f"max_norm must be a number > 0; got {max_norm!r}.")
  mean = mean_aggregator(num_examples() if weighting is None else weighting)

  def apply(outputs, state, params):
    deltas = zero_nonfinite(outputs)
    norm = jnp.sqrt(sq_norms(deltas))
    scale = max_norm / jnp.maximum(norm, max_norm)
    clipped = jax.tree.map(
        lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype), deltas)
    return mean.apply(outputs._replace(delta=clipped), state, params)

  return mean._replace(apply=apply, score=None)
