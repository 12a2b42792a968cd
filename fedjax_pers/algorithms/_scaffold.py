"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020): control variates
that correct the client drift of local steps."""

from __future__ import annotations

from typing import Any, NamedTuple

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
from fedjax_pers.core._sgd import client_output, sgd_steps
from fedjax_pers.core._traced import traced

Params = Any


class ScaffoldCarry(NamedTuple):
  """A SCAFFOLD client during local training: y, its own c_i, sums and its step count K."""

  y: Params
  c_i: Params
  loss_sum: jax.Array
  count: jax.Array
  steps: jax.Array


def scaffold(
    model: Model,
    work: LocalWork,
    *,
    learning_rate: float,
    clients_per_round: int,
    server_tx: optax.GradientTransformation | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """SCAFFOLD with option II control variates (the paper's Algorithm 1).

  The server keeps x and c (`ServerState.algorithm`), each client its c_i
  (`ServerState.client_states`), all starting at 0. A sampled client runs K_i
  local steps (`work`; K_i its real steps) from y = x,

    y ← y − η_l (g_i(y) − c_i + c),

  then c_i⁺ = c_i − c + (x − y) / (K_i η_l), and sends Δy = y − x and
  Δc_i = c_i⁺ − c_i. The server moves x by the aggregate of the Δy (`server_tx`
  on −Δ: the default `sgd(1.0)` with `uniform` weights is the paper's
  x ← x + η_g mean Δy at η_g = 1; `optax.sgd(η_g)` for another η_g) and
  c ← c + (1/N) Σ_{i ∈ S} Δc_i, i.e. |S|/N times the mean Δc_i.

  Args:
    model: The model.
    work: Local epochs or steps, and the batch size.
    learning_rate: η_l > 0 (plain SGD: the control variate's formula assumes it).
    clients_per_round: Cohort size |S|.
    server_tx: Server optimizer on −Δ (default `optax.sgd(1.0)`).
    weighting: Aggregation of the Δy (default `uniform()`, the paper's mean).
    execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; its state's `algorithm` is c.
  """
  check_local_work(work)
  if not (traced(learning_rate) or isinstance(learning_rate, (int, float)) and learning_rate > 0):
    raise ValueError(f"learning_rate (SCAFFOLD's η_l) must be a number > 0; got "
                     f"{learning_rate!r}.")
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx
  aggregator = as_aggregator(uniform() if weighting is None else weighting)
  eta = learning_rate

  def program(data: FederatedData, c: Params) -> LocalProgram:
    check_local_work(work, data.num_clients)

    def start(params, client, key):
      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      carry = ScaffoldCarry(params, client.state, zero, jnp.zeros((), jnp.int32),
                            jnp.zeros((), jnp.int32))
      return carry, sgd_steps(key, client, work, max_examples=data.max_examples,
                              min_examples=data.min_examples)

    def step(params, carry, batch):
      x, y, mask, key = batch
      (_, total), g = jax.value_and_grad(
          lambda w: masked_mean_loss(model, w, x, y, mask, key), has_aux=True)(carry.y)
      new_y = jax.tree.map(lambda w, gi, ci, cc: w - eta * (gi - ci + cc), carry.y, g,
                           carry.c_i, c)
      real = jnp.any(mask)
      return ScaffoldCarry(tree_where(real, new_y, carry.y), carry.c_i,
                           carry.loss_sum + total.astype(carry.loss_sum.dtype),
                           carry.count + jnp.sum(mask, dtype=jnp.int32),
                           carry.steps + real.astype(jnp.int32))

    def finish(params, client, carry):
      k = jnp.maximum(carry.steps, 1).astype(jax.tree.leaves(params)[0].dtype)
      c_new = jax.tree.map(lambda ci, cc, x, y: jnp.where(
          carry.steps > 0, ci - cc + (x - y) / (k * eta), ci), carry.c_i, c, params, carry.y)
      out = client_output(model, params, client, carry.y, carry.loss_sum, carry.count,
                          data.num_classes, client_losses=aggregator.client_losses,
                          also_finite=c_new)
      return out._replace(client_state=c_new)

    return LocalProgram(start, step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  def round_fn(state: ServerState, data: FederatedData):
    c = state.algorithm
    inner = make_round(lambda d: program(d, c), aggregator, server_tx,
                       clients_per_round=clients_per_round, execution=execution)
    new, metrics = inner(state, data)
    moved = cohort_state_change(state, new, metrics.clients)   # Σ_{i∈S} Δc_i
    c = jax.tree.map(lambda cc, m: cc + m / data.num_clients, c, moved)
    return new._replace(algorithm=c), metrics

  init = make_init(model, server_tx, aggregator, clients_per_round=clients_per_round,
                   client_states=zero_client_states, execution=execution,
                   algorithm=lambda params: jax.tree.map(jnp.zeros_like, params))
  return assembled(init, round_fn, lambda d: program(d, None), execution, clients_per_round)
