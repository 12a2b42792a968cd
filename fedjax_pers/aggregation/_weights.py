"""Aggregation weight functions: the interface and the data-size family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.core._client import ClientOutput
from fedjax_pers.core._cohort import normalize


class WeightFn(NamedTuple):
  """How the sampled clients' updates are weighted.

  Attributes:
    init: `init(num_clients) -> state`, the weight function's state.
    apply: `apply(outputs, state) -> (weights[k], state)` over the stacked
      `ClientOutput`s of a cohort; weights are non-negative and sum to one, and
      are zero for clients whose update is not finite.
    score: Optional `score(output) -> u` for one client. When set, the weights
      are `u_i / Σ u_j` and need no other client, so a cohort run by `lax.scan`
      can accumulate `Σ u_i Δ_i` without keeping every update.
  """

  init: Callable[[int], Any]
  apply: Callable[[ClientOutput, Any], tuple[jax.Array, Any]]
  score: Callable[[ClientOutput], jax.Array] | None = None


def from_score(score: Callable[[ClientOutput], jax.Array]) -> WeightFn:
  """A stateless `WeightFn` with weights proportional to a per-client score."""

  def apply(outputs, state):
    return normalize(jax.vmap(score)(outputs), outputs.finite), state

  return WeightFn(init=lambda num_clients: (), apply=apply, score=score)


def num_examples() -> WeightFn:
  """FedAvg's weights by data size: `w_i = n_i / Σ_j n_j`.

  Example:
    >>> import jax.numpy as jnp
    >>> from fedjax_pers.core import ClientOutput
    >>> out = ClientOutput(delta=None, num_examples=jnp.array([1000, 500, 200]),
    ...     train_loss=None, num_steps=None, label_hist=None,
    ...     finite=jnp.array([True, True, True]))
    >>> w, _ = num_examples().apply(out, ())
    >>> [round(float(v), 6) for v in w]
    [0.588235, 0.294118, 0.117647]
  """
  return from_score(lambda out: out.num_examples.astype(jnp.float32))


def uniform() -> WeightFn:
  """Equal weights `w_i = 1/k` for the `k` sampled clients."""
  return from_score(lambda out: jnp.ones((), jnp.float32))
