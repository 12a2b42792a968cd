"""FedBuff (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022) on a simulated clock."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work, work_steps
from fedjax_pers.core._cohort import weighted_sum, zero_nonfinite
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram
from fedjax_pers.core._round import (
  FederatedAlgorithm,
  ServerState,
  assembled,
  make_init,
  make_round,
  place,
  zero_client_states,
)
from fedjax_pers.core._sgd import client_output, sgd_program
from fedjax_pers.core._traced import traced

Params = Any


class FedBuffState(NamedTuple):
  """The asynchronous server (`ServerState.algorithm`): who is in flight, since when.

  Attributes:
    in_flight: `[M]` client ids training now (distinct).
    version: `[M]` the server version each of them started from.
    finish: `[M]` the simulated time each will report.
    duration: `[N]` each client's time for one local training (fixed per client).
    clock: Simulated time of the last server step.
    steps: Server steps so far (the model's version).
  """

  in_flight: jax.Array
  version: jax.Array
  finish: jax.Array
  duration: jax.Array
  clock: jax.Array
  steps: jax.Array


def fedbuff(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    concurrency: int,
    buffer_size: int,
    staleness_exponent: float = 0.5,
    latency_spread: float = 1.0,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedBuff: M clients train at once; the server steps after every K reports.

  A client is dispatched with the current model x (its start model is kept in
  its `client_states` row until it reports) and reports `Δ_i = y_i − x_start`
  after `d_i` units of simulated time, `d_i ~ LogNormal(0, latency_spread)`
  drawn once per client (a slow device stays slow). One call of `round` is one
  server step: the K earliest of the M in flight report, with staleness
  `s_i` = server steps since their dispatch, and the server applies `server_tx`
  to `−(1/K) Σ_i (1 + s_i)^(−a) Δ_i` (their Algorithm 1, with the paper's
  polynomial staleness weights, `a = staleness_exponent`); the clock moves to
  the K-th report, and K clients not in flight are dispatched with the new
  model, uniformly at random. With `latency_spread = 0` and `K = M`, every
  round is synchronous FedAvg with uniform weights over its cohort.

  Args:
    model: The model.
    client_tx: Client optimizer.
    server_tx: Server optimizer (the paper: SGD at η_g).
    work: Local epochs or steps, and the batch size.
    concurrency: M, clients in flight (≤ N − K + K: at most N).
    buffer_size: K ≤ M, reports per server step.
    staleness_exponent: a ≥ 0 (0: no discount).
    latency_spread: σ ≥ 0 of the clients' log-durations.
    execution: As `fedavg` (its sampling options do not apply).

  Returns:
    The `FederatedAlgorithm`; `state.algorithm` is the `FedBuffState`.
  """
  check_local_work(work)
  for name, v in (("concurrency", concurrency), ("buffer_size", buffer_size)):
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
      raise ValueError(f"{name} must be an int >= 1; got {v!r}.")
  if buffer_size > concurrency:
    raise ValueError(f"buffer_size (K={buffer_size}) must be <= concurrency "
                     f"(M={concurrency}): the server waits for K of the M in flight.")
  for name, v in (("staleness_exponent", staleness_exponent),
                  ("latency_spread", latency_spread)):
    if not (traced(v) or isinstance(v, (int, float)) and v >= 0):
      raise ValueError(f"{name} must be a number >= 0; got {v!r}.")
  if execution is not None and (execution.sampling_probs is not None
                                or execution.poisson_rate is not None
                                or execution.system is not None):
    raise ValueError("fedbuff dispatches clients itself: execution.sampling_probs, "
                     "poisson_rate and system must be None.")
  k, m = buffer_size, concurrency

  def check_data(data: FederatedData) -> None:
    if m > data.num_clients:
      raise ValueError(f"concurrency (M={m}) must be <= the number of clients "
                       f"({data.num_clients}).")
    if data.window is not None:
      raise ValueError("fedbuff: who reports next depends on the server's simulated clock, so "
                       "a host feed cannot gather the cohort ahead (data.window is set); give "
                       "it the whole population's data (no data.store).")

  def make_program(data: FederatedData) -> LocalProgram:
    check_local_work(work, data.num_clients)
    inner = sgd_program(model, client_tx, work, max_examples=data.max_examples,
                        min_examples=data.min_examples,
                        start_from=lambda params, client: client.state)

    def finish(params, client, carry):   # Δ from the client's own start model
      out = client_output(model, client.state, client, carry.w, carry.loss_sum, carry.count,
                          data.num_classes)
      return out._replace(client_state=client.state)

    return LocalProgram(inner.start, inner.step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  def round_fn(state: ServerState, data: FederatedData):
    check_data(data)
    a = state.algorithm
    order = jnp.argsort(a.finish)          # the K earliest reports (stable: ties by slot)
    arrive, stay = order[:k], order[k:]
    ids = a.in_flight[arrive]
    discount = (1.0 + (a.steps - a.version[arrive]).astype(jnp.float32)) ** (
        -staleness_exponent)

    def apply(outputs, weight_state, params):
      del params
      w = jnp.where(outputs.finite, discount / k, 0.0)
      return weighted_sum(w, zero_nonfinite(outputs)), w, weight_state

    aggregator = Aggregator(init=lambda n: (), apply=apply)
    inner = make_round(make_program, aggregator, server_tx, clients_per_round=k,
                       execution=execution, cohort=ids)
    new, metrics = inner(state, data)
    clock = jnp.max(a.finish[arrive])
    # Dispatch K clients not in flight (Gumbel top-k over the others), with the new model.
    busy = jnp.zeros(data.num_clients, bool).at[a.in_flight[stay]].set(True)
    g = jax.random.gumbel(jax.random.fold_in(new.rng, 0xFB), (data.num_clients,))
    _, fresh = jax.lax.top_k(jnp.where(busy, -jnp.inf, g), k)
    fresh = fresh.astype(jnp.int32)
    states = jax.tree.map(lambda s, p: s.at[fresh].set(jnp.broadcast_to(p, (k,) + p.shape)),
                          new.client_states, new.params)
    steps = a.steps + 1
    algorithm = FedBuffState(
        in_flight=a.in_flight.at[arrive].set(fresh),
        version=a.version.at[arrive].set(steps),
        finish=a.finish.at[arrive].set(clock + a.duration[fresh]),
        duration=a.duration, clock=clock, steps=steps)
    return new._replace(client_states=states, algorithm=algorithm), metrics

  base_init = make_init(model, server_tx, Aggregator(init=lambda n: (), apply=None),
                        clients_per_round=k, client_states=zero_client_states,
                        execution=execution)

  def init(key: jax.Array, data: FederatedData) -> ServerState:
    check_data(data)
    state = base_init(key, data)
    k_lat, k_first = jax.random.split(jax.random.fold_in(key, 0xFB))
    duration = jnp.exp(latency_spread * jax.random.normal(k_lat, (data.num_clients,)))
    first = jax.random.permutation(k_first, data.num_clients)[:m].astype(jnp.int32)
    states = jax.tree.map(lambda s, p: s.at[first].set(jnp.broadcast_to(p, (m,) + p.shape)),
                          state.client_states, state.params)
    return place(state._replace(client_states=states, algorithm=FedBuffState(
        in_flight=first, version=jnp.zeros(m, jnp.int32), finish=duration[first],
        duration=duration, clock=jnp.zeros((), jnp.float32), steps=jnp.zeros((), jnp.int32))),
        execution)

  # No `sample`: the next cohort is the state's earliest reports, not a draw from a key.
  return assembled(init, round_fn, make_program, execution, k)._replace(sample=None)
