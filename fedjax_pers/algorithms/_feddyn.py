"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on
Dynamic Regularization", ICLR 2021)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, uniform
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work, work_steps
from fedjax_pers.core._client import masked_mean_loss
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, tree_where
from fedjax_pers.core._round import (
  FederatedAlgorithm,
  ServerState,
  assembled,
  cohort_state_change,
  make_init,
  make_round,
  zero_client_states,
)
from fedjax_pers.core._sgd import apply_grads, client_output, sgd_init, sgd_steps
from fedjax_pers.core._traced import traced

Params = Any


def feddyn(
    model: Model,
    client_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    alpha: float,
    clients_per_round: int,
    server_tx: optax.GradientTransformation | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedDyn (the paper's Algorithm 1).

  Client k keeps g_k = ∇L_k(θ_k) of its last local model (`client_states`,
  from 0); the server keeps h (`ServerState.algorithm`, from 0). A sampled
  client starts from θ^{t−1} and takes `work`'s steps of `client_tx` on

    L_k(θ) − ⟨g_k, θ⟩ + (α/2) ‖θ − θ^{t−1}‖²,

  then updates g_k ← g_k − α (θ_k − θ^{t−1}) (the first-order condition of
  that minimum) and sends Δ_k = θ_k − θ^{t−1}. The server sets

    h ← h − α (1/N) Σ_{k ∈ P_t} Δ_k,     θ^t = (θ^{t−1} + mean_k Δ_k) − h / α,

  the mean taken by `server_tx` on the aggregate (the default `sgd(1.0)` with
  `uniform` weights is the paper's) and `−h/α` added after it.

  Args:
    model: The model.
    client_tx: Client optimizer (the paper: SGD).
    work: Local epochs or steps, and the batch size.
    alpha: α > 0.
    clients_per_round: Cohort size.
    server_tx: Server optimizer on −Δ (default `optax.sgd(1.0)`).
    weighting: Aggregation of the Δ_k (default `uniform()`).
    execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; its state's `algorithm` is h.
  """
  check_local_work(work)
  if not (traced(alpha) or isinstance(alpha, (int, float)) and alpha > 0):
    raise ValueError(f"alpha (FedDyn's α) must be a number > 0; got {alpha!r}.")
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx
  aggregator = as_aggregator(uniform() if weighting is None else weighting)

  def make_program(data: FederatedData) -> LocalProgram:
    check_local_work(work, data.num_clients)

    def start(params, client, key):
      carry = (sgd_init(client_tx, params), client.state)
      return carry, sgd_steps(key, client, work, max_examples=data.max_examples,
                              min_examples=data.min_examples)

    def step(params, carry, batch):
      s, g_k = carry
      x, y, mask, key = batch
      (_, total), g = jax.value_and_grad(
          lambda w: masked_mean_loss(model, w, x, y, mask, key), has_aux=True)(s.w)
      g = jax.tree.map(lambda gi, gk, w, p: gi - gk + alpha * (w - p), g, g_k, s.w, params)
      new = apply_grads(client_tx, s, g, total, mask)
      return tree_where(jnp.any(mask), new, s), g_k

    def finish(params, client, carry):
      s, g_k = carry
      g_new = jax.tree.map(lambda gk, w, p: gk - alpha * (w - p), g_k, s.w, params)
      out = client_output(model, params, client, s.w, s.loss_sum, s.count, data.num_classes,
                          client_losses=aggregator.client_losses, also_finite=g_new)
      return out._replace(client_state=g_new)

    return LocalProgram(start, step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  inner = make_round(make_program, aggregator, server_tx, clients_per_round=clients_per_round,
                     execution=execution)

  def round_fn(state: ServerState, data: FederatedData):
    new, metrics = inner(state, data)
    # Σ_k (g_k⁺ − g_k) = −α Σ_{k∈P_t} Δ_k
    moved = cohort_state_change(state, new, metrics.clients)
    h = jax.tree.map(lambda hh, m: hh + m / data.num_clients, state.algorithm, moved)
    params = jax.tree.map(lambda p, hh: p - hh / alpha, new.params, h)
    return new._replace(params=params, algorithm=h), metrics

  init = make_init(model, server_tx, aggregator, clients_per_round=clients_per_round,
                   client_states=zero_client_states, execution=execution,
                   algorithm=lambda params: jax.tree.map(jnp.zeros_like, params))
  return assembled(init, round_fn, make_program, execution, clients_per_round)
