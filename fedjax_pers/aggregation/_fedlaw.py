"""Learned aggregation weights, FedLAW (Li et al., ICML 2023).

The server learns, every round, the weights of the average and a global
shrinking factor by gradient descent on a small proxy set, differentiating
straight through the aggregation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.aggregation._weights import masked_softmax
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._cohort import normalize, weighted_sum, zero_nonfinite
from fedjax_pers.core._model import Model

Params = Any


class FedLAWState(NamedTuple):
  """The last round's learned global shrinking factor γ (1 before the first round)."""

  gamma: jax.Array


def fedlaw_aggregate(params: Params, deltas: Params, finite: jax.Array,
                     theta: jax.Array, log_gamma: jax.Array) -> Params:
  """`w_g = γ Σ_i softmax(θ)_i w_i` with `w_i = w_t + Δ_i` and γ = exp(θ_γ).

  The softmax runs over the finite clients only, so `Σ_i λ_i w_i = w_t + Σ_i λ_i Δ_i`.
  """
  return shrunk(params, weighted_sum(masked_softmax(theta, finite), deltas), jnp.exp(log_gamma))


def shrunk(params: Params, mean: Params, gamma: jax.Array) -> Params:
  """FedLAW's aggregate `γ (w_t + Σ_i w_i Δ_i)` of the weighted mean update `mean`."""
  return jax.tree.map(lambda p, d: gamma * (p + d), params, mean)


def descend(loss, z, tx: optax.GradientTransformation, steps: int):
  """`steps` steps of `tx` on `loss` from `z`, from a fresh optimizer state (`lax.scan`)."""

  def step(carry, _):
    z, opt = carry
    updates, opt = tx.update(jax.grad(loss)(z), opt, z)
    return (optax.apply_updates(z, updates), opt), None

  (z, _), _ = jax.lax.scan(step, (z, tx.init(z)), None, length=steps)
  return z


def fedlaw_fit(objective: Callable[[Params], jax.Array], params: Params, outputs, *,
               steps: int, optimizer: optax.GradientTransformation
               ) -> tuple[jax.Array, jax.Array]:
  """FedLAW's fit of this round on `objective` (Li et al., ICML 2023): θ_i from
  log(n_i / N) and θ_γ = 0, `steps` steps of `optimizer` on
  `objective(γ (w_t + Σ_i softmax(θ)_i Δ_i))`, γ = exp(θ_γ). Returns `([k] λ, γ)`,
  λ = softmax(θ) over the clients with data (a client without data has no model of its
  own to weigh: log(n_i / N) would be −∞)."""
  keep = outputs.finite & (outputs.num_examples > 0)
  deltas = zero_nonfinite(outputs)
  n = normalize(outputs.num_examples.astype(jnp.float32), keep)
  z = (jnp.log(jnp.where(n > 0, n, 1.0)), jnp.zeros((), jnp.float32))
  loss = lambda z: objective(fedlaw_aggregate(params, deltas, keep, *z))
  theta, log_gamma = descend(loss, z, optimizer, steps)
  return masked_softmax(theta, keep), jnp.exp(log_gamma)


def fedlaw_objective(model: Model, params: Params, deltas: Params, finite: jax.Array,
                     theta: jax.Array, log_gamma: jax.Array, x: jax.Array,
                     y: jax.Array) -> jax.Array:
  """Mean proxy-set loss of the aggregate `fedlaw_aggregate(...)` (FedLAW's objective)."""
  w_g = fedlaw_aggregate(params, deltas, finite, theta, log_gamma)
  return jnp.mean(model.loss(model.apply(w_g, x), y))


def fedlaw(model: Model, proxy_x, proxy_y, *, steps: int = 100,
           optimizer: optax.GradientTransformation | None = None) -> Aggregator:
  """FedLAW: aggregation weights λ = softmax(θ) and shrinking γ = exp(θ_γ) learned on a proxy set.

  Each round starts from θ_i = log(n_i / Σ_j n_j) (the FedAvg weights) and
  θ_γ = 0 (γ = 1), then takes `steps` steps of `optimizer` (default Adam, lr
  0.05) on the proxy loss `fedlaw_objective`, with `jax.grad` through the
  aggregation. The new global model is `γ Σ_i λ_i w_i`; the reported weights
  are λ and the state keeps the learned γ.

  Args:
    model: The model (for the proxy loss).
    proxy_x: `[m, *feature_shape]` the server's proxy inputs.
    proxy_y: `[m]` int labels.
    steps: Optimizer steps per round (≥ 1).
    optimizer: Optax optimizer of (θ, θ_γ).

  Returns:
    The `Aggregator`.
  """
  proxy_x, proxy_y = np.asarray(proxy_x), np.asarray(proxy_y)
  if proxy_x.ndim < 1 or proxy_x.shape[0] == 0 or proxy_y.shape != proxy_x.shape[:1]:
    raise ValueError(
        "fedlaw needs a non-empty proxy set with proxy_y of shape [m] matching proxy_x's"
        f" first axis; got proxy_x {proxy_x.shape}, proxy_y {proxy_y.shape}.")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps must be a positive int; got {steps!r}.")
  tx = optax.adam(0.05) if optimizer is None else optimizer
  x, y = jnp.asarray(proxy_x), jnp.asarray(proxy_y, jnp.int32)
  objective = lambda w: jnp.mean(model.loss(model.apply(w, x), y))

  def apply(outputs, state, params):
    del state
    lam, gamma = fedlaw_fit(objective, params, outputs, steps=steps, optimizer=tx)
    new = shrunk(params, weighted_sum(lam, zero_nonfinite(outputs)), gamma)
    return jax.tree.map(jnp.subtract, new, params), lam, FedLAWState(gamma=gamma)

  init = lambda num_clients: FedLAWState(gamma=jnp.ones((), jnp.float32))
  return Aggregator(init=init, apply=apply)
