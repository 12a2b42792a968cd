"""Weight functions: the interface, data size, uniform, and how to compose them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.core._client import ClientOutput
from fedjax_pers.core._cohort import normalize
from fedjax_pers.core._traced import traced


class WeightFn(NamedTuple):
  """How the sampled clients' updates are weighted in the mean `Σ_i w_i Δ_i`.

  Attributes:
    init: `init(num_clients) -> state`, the weight function's state.
    apply: `apply(outputs, state) -> (weights[k], state)` over the stacked
      `ClientOutput`s of a cohort; weights are non-negative and sum to one, and
      are zero for clients whose update is not finite.
    score: Optional `score(output) -> u` for one client. When set, the weights
      are `u_i / Σ u_j` and need no other client, so a cohort run by `lax.scan`
      can accumulate `Σ u_i Δ_i` without keeping every update.
    client_losses: Clients must report `loss_before` / `loss_after`.
  """

  init: Callable[[int], Any]
  apply: Callable[[ClientOutput, Any], tuple[jax.Array, Any]]
  score: Callable[[ClientOutput], jax.Array] | None = None
  client_losses: bool = False


def stateless(init_unused: int) -> tuple:
  """The state of a weight function that keeps none."""
  del init_unused
  return ()


def from_score(score: Callable[[ClientOutput], jax.Array], *,
               client_losses: bool = False) -> WeightFn:
  """A stateless `WeightFn` with weights proportional to a per-client score `u_i ≥ 0`."""

  def apply(outputs, state):
    return normalize(jax.vmap(score)(outputs), outputs.finite), state

  return WeightFn(init=stateless, apply=apply, score=score, client_losses=client_losses)


def masked_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """`softmax(logits)` over the entries with `keep`; zero elsewhere (or everywhere)."""
  z = jnp.where(keep, logits, -jnp.inf)
  top = jnp.max(z)
  e = jnp.where(keep, jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  return normalize(e, keep)


def num_examples() -> WeightFn:
  """FedAvg's weights by data size: `w_i = n_i / Σ_j n_j`.

  Example (three clients of 1000, 500 and 200 examples):
    >>> import jax.numpy as jnp
    >>> from fedjax_pers.core import ClientOutput
    >>> from fedjax_pers.core._cohort import weighted_sum
    >>> out = ClientOutput(
    ...     delta={'layer1': jnp.array([0.1, 0.0, 0.0]),
    ...            'layer2': jnp.array([0.2, 0.0, 0.0])},
    ...     num_examples=jnp.array([1000, 500, 200]), train_loss=None,
    ...     num_steps=None, label_hist=None, finite=jnp.array([True, True, True]))
    >>> w, _ = num_examples().apply(out, ())
    >>> [round(float(v), 6) for v in w]   # 1000/1700, 500/1700, 200/1700
    [0.588235, 0.294118, 0.117647]
    >>> agg = weighted_sum(w, out.delta)  # only the first client moved
    >>> round(float(agg['layer1']), 6), round(float(agg['layer2']), 6)
    (0.058824, 0.117647)
  """
  return from_score(lambda out: out.num_examples.astype(jnp.float32))


def uniform() -> WeightFn:
  """Equal weights `w_i = 1/k` over the `k` clients with a finite update."""
  return from_score(lambda out: jnp.ones((), jnp.float32))


def logits(theta: jax.Array) -> WeightFn:
  """Weights from per-client logits: `w_i = exp(θ_{c_i}) / Σ_j exp(θ_{c_j})` over the cohort.

  `theta` is `[num_clients]`, indexed by each sampled client's id; it may be a
  traced value, so the aggregation weights can be learned by differentiating
  through whole rounds (see `fedjax_pers.hypergrad`).
  """

  def init(num_clients):
    if jnp.shape(theta) != (num_clients,):
      raise ValueError(f"logits: theta must have one logit per client, shape ({num_clients},);"
                       f" got {jnp.shape(theta)}.")
    return ()

  def apply(outputs, state):
    return masked_softmax(theta[outputs.client_id], outputs.finite), state

  return WeightFn(init=init, apply=apply)


def product(*fns: WeightFn) -> WeightFn:
  """`w_i ∝ Π_f w_i^(f)`: the weight functions' weights multiplied, renormalised.

  The state is the tuple of the factors' states. Separable when every factor is.
  """
  if not fns or not all(isinstance(f, WeightFn) for f in fns):
    raise ValueError(f"product needs one or more WeightFn; got {fns!r}.")

  def apply(outputs, states):
    w, new = jnp.ones(outputs.finite.shape, jnp.float32), []
    for f, s in zip(fns, states):
      wf, s = f.apply(outputs, s)
      w, new = w * wf, new + [s]
    return normalize(w, outputs.finite), tuple(new)

  scores = [f.score for f in fns]
  score = None
  if all(s is not None for s in scores):
    score = lambda out: jnp.prod(jnp.stack([s(out) for s in scores]))
  return WeightFn(init=lambda n: tuple(f.init(n) for f in fns), apply=apply, score=score,
                  client_losses=any(f.client_losses for f in fns))


def power(fn: WeightFn, exponent: float) -> WeightFn:
  """`w_i ∝ (w_i^(fn))^p`: p > 1 sharpens, p < 1 flattens (p = 1/temperature)."""
  if not (traced(exponent) or isinstance(exponent, (int, float)) and exponent > 0):
    raise ValueError(f"exponent must be a number > 0; got {exponent!r}.")

  def apply(outputs, state):
    w, state = fn.apply(outputs, state)
    return normalize(w ** exponent, outputs.finite), state

  score = None if fn.score is None else (lambda out: fn.score(out) ** exponent)
  return fn._replace(apply=apply, score=score)


def floor(fn: WeightFn, fraction: float) -> WeightFn:
  """Mixes in the uniform weights: `w_i ← (1 − λ) w_i + λ / m` over the m finite clients.

  Every finite client then has at least `λ / m`, and the weights still sum to one.
  """
  if not (traced(fraction) or isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
    raise ValueError(f"fraction must be a number in [0, 1]; got {fraction!r}.")

  def apply(outputs, state):
    w, state = fn.apply(outputs, state)
    even = normalize(jnp.ones_like(w), outputs.finite)
    return normalize((1 - fraction) * w + fraction * even, outputs.finite), state

  return fn._replace(apply=apply, score=None)
