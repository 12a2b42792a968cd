"""APFL, adaptive personalized federated learning (Deng, Kamani & Mahdavi, 2020)."""

from __future__ import annotations

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
    weighting: WeightFn | Aggregator | None = None,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> FederatedAlgorithm:
  """APFL with a fixed mixing weight α: each client's model is α v_k + (1 − α) w.

  On every local batch of a sampled client, with learning-rate-η SGD
  (`client_tx`),

    w ← w − η ∇F(w),      v_k ← v_k − η ∇_v F(α v_k + (1 − α) w)
                              = v_k − η α ∇F(α v_k + (1 − α) w),

  both gradients at the parameters before the step. The server averages the
  updates of w as FedAvg does; v_k stays with the client (stacked in
  `ServerState.client_states`, starting at w_0). α = 0 is FedAvg.

  Args:
    model: The model.
    client_tx: Optimizer of both w and v_k on the client.
    server_tx, work: As `fedavg`.
    alpha: α in [0, 1].
    clients_per_round: Cohort size.
    weighting, strategy, client_chunk, sampling_probs, mesh: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` gives each client's mixture.
  """
  check_local_work(work)
  if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
    raise ValueError(f"alpha (APFL's mixing weight) must be in [0, 1]; got {alpha!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)
  check_no_client_losses(aggregator, "apfl")

  def make_client(data: FederatedData):
    def client_update(params, client, key):
      k_plan, k_train = jax.random.split(key)
      plan = batch_plan(k_plan, client.num_examples, work, max_examples=data.max_examples,
                        min_examples=data.min_examples)
      step_keys = jax.random.split(k_train, plan.idx.shape[0])

      def loss(p, xb, yb, mb, k):
        return masked_mean_loss(model, p, xb, yb, mb, k)

      def step(carry, inputs):
        w, v, sw, sv, loss_sum, count, steps = carry
        idx, mb, k = inputs
        xb, yb = client.x[idx], client.y[idx]
        (_, total), gw = jax.value_and_grad(loss, has_aux=True)(w, xb, yb, mb, k)
        gv = jax.grad(lambda v_: loss(mix(alpha, v_, w), xb, yb, mb, k)[0])(v)
        uw, sw2 = client_tx.update(gw, sw, w)
        uv, sv2 = client_tx.update(gv, sv, v)
        active = jnp.any(mb)
        keep = lambda new, old: jnp.where(active, new, old)
        w2 = jax.tree.map(keep, optax.apply_updates(w, uw), w)
        v2 = jax.tree.map(keep, optax.apply_updates(v, uv), v)
        sw2, sv2 = jax.tree.map(keep, sw2, sw), jax.tree.map(keep, sv2, sv)
        return (w2, v2, sw2, sv2, loss_sum + total, count + jnp.sum(mb), steps + active), None

      zero = jnp.zeros((), jnp.float32)
      izero = jnp.zeros((), jnp.int32)
      init = (params, client.state, client_tx.init(params), client_tx.init(client.state),
              zero, izero, izero)
      (w, v, _, _, loss_sum, count, steps), _ = jax.lax.scan(
          step, init, (plan.idx, plan.mask, step_keys))
      delta = jax.tree.map(jnp.subtract, w, params)
      finite = all_finite((delta, v))
      hist = label_histogram(client, data.num_classes)
      return ClientOutput(delta=delta, num_examples=client.num_examples,
                          train_loss=loss_sum / jnp.maximum(count, 1), num_steps=steps,
                          label_hist=hist, finite=finite, client_state=v)

    return client_update

  def personal(state: ServerState):
    return jax.vmap(lambda v: mix(alpha, v, state.params))(state.client_states)

  return assemble(
      model, make_client, aggregator, server_tx, clients_per_round=clients_per_round,
      strategy=strategy, client_chunk=client_chunk, sampling_probs=sampling_probs, mesh=mesh,
      client_states=stack_clients, personal=personal)
