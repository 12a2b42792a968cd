"""Weights by the clients' label distributions: divergence from the population, entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.aggregation._weights import WeightFn, masked_softmax, stateless
from fedjax_pers.core._cohort import safe_divide
from fedjax_pers.core._traced import traced


def _distributions(hist):
  """Rows of `[k, C]` label counts as probability vectors (zero rows stay zero)."""
  return safe_divide(hist, jnp.sum(hist, axis=-1, keepdims=True))


def _xlogy_ratio(p, q):
  """`p log(p / q)` with `0 log 0 = 0`."""
  ok = p > 0
  return jnp.where(ok, p * (jnp.log(jnp.where(ok, p, 1.0)) - jnp.log(jnp.where(ok, q, 1.0))),
                   0.0)


def label_kl(hist, population) -> jax.Array:
  """`[k]` KL(p_i ‖ q) of each client's label distribution p_i from q."""
  return jnp.sum(_xlogy_ratio(_distributions(hist), population[None, :]), axis=-1)


def label_divergence(temperature: float = 1.0, population=None) -> WeightFn:
  """`w_i ∝ n_i · exp(−τ · KL(p_i ‖ q))`: clients whose labels look like the population's.

  p_i is client i's label distribution (from `ClientOutput.label_hist`); q is
  `population` when given (for instance `data.label_distribution()` of the
  training population), else the cohort's pooled label distribution, which is
  what a server sees from the clients' reported histograms in the round.

  Args:
    temperature: τ ≥ 0 (0 gives data-size weights, whatever the labels).
    population: Optional `[C]` label distribution q (non-negative, sums to 1);
      with τ > 0 every label must have q > 0: a client holding a label of
      probability 0 would have KL = ∞ and no weight, so such a q is refused.
  """
  if not (traced(temperature) or isinstance(temperature, (int, float)) and temperature >= 0):
    raise ValueError(f"temperature must be a number >= 0; got {temperature!r}.")
  if population is not None:
    q = np.asarray(population, np.float64)
    if q.ndim != 1 or np.any(q < 0) or abs(q.sum() - 1) > 1e-4:
      raise ValueError(
          f"population must be a 1-D distribution (>= 0, summing to 1); got {population!r}.")
    if temperature > 0 and np.any(q == 0):
      raise ValueError(
          f"population gives probability 0 to labels {np.flatnonzero(q == 0).tolist()}: a "
          f"client holding one has KL(p_i ‖ q) = ∞ and weight 0 at temperature="
          f"{temperature!r}; smooth the population (mix in a little of the uniform) or use "
          "the cohort's own (population=None).")
    population = jnp.asarray(q, jnp.float32)
  if temperature == 0:   # exactly n_i: KL is never computed (0 · ∞ would be NaN)
    return WeightFn(init=stateless, apply=lambda o, s: (_sizes(o), s),
                    score=lambda out: out.num_examples.astype(jnp.float32))

  def apply(outputs, state):
    hist = jnp.where(outputs.finite[:, None], outputs.label_hist, 0.0)
    q = _distributions(jnp.sum(hist, axis=0)) if population is None else population
    kl = label_kl(hist, q)
    n = outputs.num_examples.astype(jnp.float32)
    keep = outputs.finite & (n > 0)
    return masked_softmax(jnp.log(jnp.where(keep, n, 1.0)) - temperature * kl, keep), state

  score = None
  if population is not None:   # separable: a scanned cohort can stream it
    score = lambda out: out.num_examples * jnp.exp(
        -temperature * label_kl(out.label_hist[None], population)[0])
  return WeightFn(init=stateless, apply=apply, score=score)


def _sizes(outputs) -> jax.Array:
  """`n_i / Σ n_j` over the finite clients with data."""
  n = outputs.num_examples.astype(jnp.float32)
  keep = outputs.finite & (n > 0)
  return masked_softmax(jnp.log(jnp.where(keep, n, 1.0)), keep)


def label_entropy(temperature: float = 1.0) -> WeightFn:
  """`w_i ∝ n_i · exp(τ · H(p_i) / log C)`: more weight to clients with more varied labels.

  H is the Shannon entropy of the client's label distribution, divided by its
  largest value log C so that τ means the same for any number of classes.

  Args:
    temperature: τ ≥ 0 (0 gives data-size weights).
  """
  if not (traced(temperature) or isinstance(temperature, (int, float)) and temperature >= 0):
    raise ValueError(f"temperature must be a number >= 0; got {temperature!r}.")

  def entropy(hist):
    p = _distributions(hist)
    return -jnp.sum(_xlogy_ratio(p, jnp.ones_like(p)), axis=-1) / np.log(max(p.shape[-1], 2))

  def apply(outputs, state):
    n = outputs.num_examples.astype(jnp.float32)
    keep = outputs.finite & (n > 0)
    logits = jnp.log(jnp.where(keep, n, 1.0)) + temperature * entropy(outputs.label_hist)
    return masked_softmax(logits, keep), state

  score = lambda out: out.num_examples * jnp.exp(temperature * entropy(out.label_hist))
  return WeightFn(init=stateless, apply=apply, score=score)
