"""Robust aggregators, where the aggregate is not a weighted mean of all updates.

Coordinate-wise median and trimmed mean (Yin et al., ICML 2018), Krum and
multi-Krum (Blanchard et al., NeurIPS 2017), and norm clipping. All run on the
finite updates of the cohort only: non-finite updates are never part of an
aggregate, and `m` below counts the finite clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pers.aggregation._quality import sq_norms
from fedjax_pers.aggregation._weights import WeightFn, num_examples, stateless
from fedjax_pers.core._aggregate import Aggregator, mean_aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, weighted_sum, zero_nonfinite


def _ranked(outputs):
  """Each leaf sorted along the client axis, non-finite clients (as +inf) last."""
  def sort(d):
    keep = outputs.finite.reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.sort(jnp.where(keep, d, jnp.inf), axis=0)
  return jax.tree.map(sort, outputs.delta)


def _rank_mean(outputs, lo, hi):
  """Per coordinate, the mean of the sorted finite values of ranks `lo ≤ r < hi`."""
  r = jnp.arange(outputs.finite.shape[0])
  take = (r >= lo) & (r < hi) & (r < jnp.sum(outputs.finite))

  def mean(s):
    sel = take.reshape((-1,) + (1,) * (s.ndim - 1))
    return safe_divide(jnp.sum(jnp.where(sel, s, 0.0), axis=0), jnp.sum(take).astype(s.dtype))
  return jax.tree.map(mean, _ranked(outputs))


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
  if not (isinstance(beta, (int, float)) and 0 <= beta < 0.5):
    raise ValueError(f"beta (trimmed fraction per side) must be in [0, 0.5); got {beta!r}.")

  def apply(outputs, state, params):
    del params
    m = jnp.sum(outputs.finite)
    b = jnp.floor(beta * m).astype(jnp.int32)
    return _rank_mean(outputs, b, m - b), _even(outputs), state

  return Aggregator(init=stateless, apply=apply)


def krum_scores(outputs, f: int) -> jax.Array:
  """`[k]` Krum scores: the sum of squared distances to the `m − f − 2` nearest other updates.

  Non-finite clients score +inf and are never neighbours.
  """
  deltas = zero_nonfinite(outputs)
  k = outputs.finite.shape[0]
  sq = sq_norms(deltas)
  flat = [d.reshape(k, -1) for d in jax.tree.leaves(deltas)]
  gram = sum(d @ d.T for d in flat)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  pair = outputs.finite[:, None] & outputs.finite[None, :] & ~jnp.eye(k, dtype=bool)
  near = jnp.sort(jnp.where(pair, dist, jnp.inf), axis=1)
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
  if not (isinstance(max_norm, (int, float)) and max_norm > 0):
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
