"""APFL, adaptive personalized federated learning (Deng, Kamani & Mahdavi, 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator, check_no_client_losses
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import (
    ClientOutput,
    all_finite,
    label_histogram,
    masked_mean_loss,
    stack_clients,
)
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, ServerState, assemble


class APFLState(NamedTuple):
  """A client's own part: its model v_k and its mixing weight α_k (fixed unless learned)."""

  v: Any
  alpha: jax.Array


def mix(alpha, v, w):
  """The personalized model `α v + (1 − α) w`."""
  return jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)


def apfl(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    alpha: float,
    clients_per_round: int,
    alpha_lr: float | None = None,
    weighting: WeightFn | Aggregator | None = None,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> FederatedAlgorithm:
  """APFL: each client's model is the mixture v̄_k = α_k v_k + (1 − α_k) w.

  On every local batch of a sampled client, with learning-rate-η SGD
  (`client_tx`),

    w ← w − η ∇F(w),      v_k ← v_k − η ∇_v F(v̄_k) = v_k − η α_k ∇F(v̄_k),

  and, with `alpha_lr` = η_α (the paper's adaptive α, its Eq. 9),

    α_k ← Π_[0,1](α_k − η_α ∇_α F(v̄_k)),   ∇_α F(v̄_k) = ⟨v_k − w, ∇F(v̄_k)⟩,

  all gradients at the parameters before the step. The server averages the
  updates of w as FedAvg does; (v_k, α_k) stay with the client (an `APFLState`
  stacked in `ServerState.client_states`, starting at (w_0, `alpha`)). α = 0
  without `alpha_lr` is FedAvg.

  Args:
    model: The model.
    client_tx: Optimizer of both w and v_k on the client.
    server_tx, work: As `fedavg`.
    alpha: α in [0, 1]: every client's fixed weight, or its starting one.
    clients_per_round: Cohort size.
    alpha_lr: η_α > 0 to learn each client's α_k; None keeps α fixed.
    weighting, strategy, client_chunk, sampling_probs, mesh: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` gives each client's mixture.
  """
  check_local_work(work)
  if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
    raise ValueError(f"alpha (APFL's mixing weight) must be in [0, 1]; got {alpha!r}.")
  if alpha_lr is not None and not (isinstance(alpha_lr, (int, float)) and alpha_lr > 0):
    raise ValueError(f"alpha_lr (the step of APFL's adaptive α) must be a number > 0 or None; "
                     f"got {alpha_lr!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)
  check_no_client_losses(aggregator, "apfl")

  a_mix = (lambda a: alpha) if alpha_lr is None else (lambda a: a)

  def make_client(data: FederatedData):
    def client_update(params, client, key):
      k_plan, k_train = jax.random.split(key)
      plan = batch_plan(k_plan, client.num_examples, work, max_examples=data.max_examples,
                        min_examples=data.min_examples)
      step_keys = jax.random.split(k_train, plan.idx.shape[0])

      def loss(p, xb, yb, mb, k):
        return masked_mean_loss(model, p, xb, yb, mb, k)

      def step(carry, inputs):
        w, v, a, sw, sv, loss_sum, count, steps = carry
        idx, mb, k = inputs
        xb, yb = client.x[idx], client.y[idx]
        (_, total), gw = jax.value_and_grad(loss, has_aux=True)(w, xb, yb, mb, k)
        # A fixed α mixes as the Python number (bitwise the pre-adaptive results).
        g_mix = jax.grad(lambda p: loss(p, xb, yb, mb, k)[0])(mix(a_mix(a), v, w))
        uw, sw2 = client_tx.update(gw, sw, w)
        uv, sv2 = client_tx.update(jax.tree.map(lambda g: a_mix(a) * g, g_mix), sv, v)
        if alpha_lr is not None:
          g_alpha = sum(jnp.vdot(vi - wi, gi) for vi, wi, gi in zip(
              jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_mix)))
          a2 = jnp.clip(a - alpha_lr * g_alpha, 0.0, 1.0)
        else:
          a2 = a
        active = jnp.any(mb)
        keep = lambda new, old: jnp.where(active, new, old)
        w2 = jax.tree.map(keep, optax.apply_updates(w, uw), w)
        v2 = jax.tree.map(keep, optax.apply_updates(v, uv), v)
        sw2, sv2 = jax.tree.map(keep, sw2, sw), jax.tree.map(keep, sv2, sv)
        return (w2, v2, keep(a2, a), sw2, sv2, loss_sum + total,
                count + jnp.sum(mb, dtype=jnp.int32), steps + active), None

      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      izero = jnp.zeros((), jnp.int32)
      own = client.state
      init = (params, own.v, own.alpha, client_tx.init(params), client_tx.init(own.v),
              zero, izero, izero)
      (w, v, a, _, _, loss_sum, count, steps), _ = jax.lax.scan(
          step, init, (plan.idx, plan.mask, step_keys))
      delta = jax.tree.map(jnp.subtract, w, params)
      finite = all_finite((delta, v, a))
      hist = label_histogram(client, data.num_classes)
      return ClientOutput(delta=delta, num_examples=client.num_examples,
                          train_loss=loss_sum / jnp.maximum(count, 1), num_steps=steps,
                          label_hist=hist, finite=finite, client_state=APFLState(v, a))

    return client_update

  def personal(state: ServerState):
    own = state.client_states
    return jax.vmap(lambda v, a: mix(a_mix(a), v, state.params))(own.v, own.alpha)

  def client_states(params, n):
    dtype = jax.tree.leaves(params)[0].dtype
    return stack_clients(APFLState(params, jnp.asarray(alpha, dtype)), n)

  return assemble(
      model, make_client, aggregator, server_tx, clients_per_round=clients_per_round,
      strategy=strategy, client_chunk=client_chunk, sampling_probs=sampling_probs, mesh=mesh,
      client_states=client_states, personal=personal)
