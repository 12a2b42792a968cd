"""APFL, adaptive personalized federated learning (Deng, Kamani & Mahdavi, 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator, check_no_client_losses
from fedjax_pers.core._batching import LocalWork, check_local_work, work_steps
from fedjax_pers.core._client import masked_mean_loss, stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram
from fedjax_pers.core._round import FederatedAlgorithm, ServerState, assemble
from fedjax_pers.core._sgd import client_output, sgd_steps
from fedjax_pers.core._traced import traced


class APFLState(NamedTuple):
  """A client's own part: its model v_k and its mixing weight α_k (fixed unless learned)."""

  v: Any
  alpha: jax.Array


class APFLCarry(NamedTuple):
  """An APFL client during local training."""

  w: Any
  v: Any
  alpha: jax.Array
  w_opt: Any
  v_opt: Any
  loss_sum: jax.Array
  count: jax.Array


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
    execution: Execution | None = None,
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
    weighting, execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` gives each client's mixture.
  """
  check_local_work(work)
  if not (traced(alpha) or isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
    raise ValueError(f"alpha (APFL's mixing weight) must be in [0, 1]; got {alpha!r}.")
  if alpha_lr is not None and not (traced(alpha_lr) or isinstance(alpha_lr, (int, float))
                                   and 0 < alpha_lr < float("inf")):
    raise ValueError(f"alpha_lr (the step of APFL's adaptive α) must be a finite number > 0 "
                     f"or None; got {alpha_lr!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)
  check_no_client_losses(aggregator, "apfl")

  a_mix = (lambda a: alpha) if alpha_lr is None else (lambda a: a)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)

    def start(params, client, key):
      own = client.state
      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      carry = APFLCarry(params, own.v, own.alpha, client_tx.init(params),
                        client_tx.init(own.v), zero, jnp.zeros((), jnp.int32))
      return carry, sgd_steps(key, client, work, max_examples=data.max_examples,
                              min_examples=data.min_examples)

    def step(params, c, batch):
      xb, yb, mb, k = batch
      loss = lambda p: masked_mean_loss(model, p, xb, yb, mb, k)
      (_, total), gw = jax.value_and_grad(loss, has_aux=True)(c.w)
      # A fixed α mixes as the Python number (bitwise the pre-adaptive results).
      a = a_mix(c.alpha)
      g_mix = jax.grad(lambda p: loss(p)[0])(mix(a, c.v, c.w))
      uw, w_opt = client_tx.update(gw, c.w_opt, c.w)
      uv, v_opt = client_tx.update(jax.tree.map(lambda g: a * g, g_mix), c.v_opt, c.v)
      alpha = c.alpha
      if alpha_lr is not None:
        g_alpha = sum(jnp.vdot(vi - wi, gi) for vi, wi, gi in zip(
            jax.tree.leaves(c.v), jax.tree.leaves(c.w), jax.tree.leaves(g_mix)))
        alpha = jnp.clip(alpha - alpha_lr * g_alpha, 0.0, 1.0)
      return APFLCarry(optax.apply_updates(c.w, uw), optax.apply_updates(c.v, uv), alpha,
                       w_opt, v_opt, c.loss_sum + total, c.count + jnp.sum(mb, dtype=jnp.int32))

    def finish(params, client, c):
      out = client_output(model, params, client, c.w, c.loss_sum, c.count, data.num_classes,
                          also_finite=(c.v, c.alpha))
      return out._replace(client_state=APFLState(c.v, c.alpha))

    return LocalProgram(start, step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  def personal(state: ServerState):
    own = state.client_states
    return jax.vmap(lambda v, a: mix(a_mix(a), v, state.params))(own.v, own.alpha)

  def client_states(params, n):
    dtype = jax.tree.leaves(params)[0].dtype
    return stack_clients(APFLState(params, jnp.asarray(alpha, dtype)), n)

  return assemble(
      model, make_program, aggregator, server_tx, clients_per_round=clients_per_round,
      execution=execution, client_states=client_states, personal=personal)
