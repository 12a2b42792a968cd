"""The federated round: sample, run the cohort, weight, aggregate, server step.

One call of `round` is a pure function of arrays, so `jax.jit(alg.round)`
compiles a whole round (sampling, every client's local training, aggregation
and the server optimizer) into one XLA program. What a client computes is its
algorithm's `LocalProgram`; how the cohort runs is an `Execution`
(`core/_cohort.py` runs it, `core/_source.py` gathers the clients' rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import width_classes
from fedjax_pers.core._client import ClientData
from fedjax_pers.core._cohort import balance_on_host, execute_cohort, pad_cohort, safe_divide
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution, Plan, as_execution, plan, replicated
from fedjax_pers.core._program import LocalProgram, capped
from fedjax_pers.core._sampling import (
    check_cohort,
    check_probs,
    poisson_cohort,
    poisson_present,
    sample_clients,
)
from fedjax_pers.core._source import cohort_source
from fedjax_pers.core._system import draw as draw_system
from fedjax_pers.core._system import straggling

Params = Any


class ServerState(NamedTuple):
  """Everything a round carries to the next.

  Attributes:
    params: Global model `w_t`.
    opt_state: Server optimizer state.
    weight_state: State of the aggregation weight function.
    client_states: Per-client state stacked over all clients (or `()`).
    round: Rounds completed, int32.
    rng: PRNG key of the next round.
    algorithm: The algorithm's own server state beyond the optimizer's and the
      aggregator's (SCAFFOLD's control variate c), `()` for most; a round
      built by `make_round` carries it unchanged.
  """

  params: Params
  opt_state: Any
  weight_state: Any
  client_states: Any
  round: jax.Array
  rng: jax.Array
  algorithm: Any = ()


class ClientWindow(NamedTuple):
  """The per-client state of one round's clients only: those of `data.window`, in
  window order (a host store keeps the population's; `data.HostClientStates`).

  `init` over windowed data starts every slot at a client's initial state; a
  round over windowed data reads and writes slot j for client `window[j]`.
  """

  states: Any


class RoundMetrics(NamedTuple):
  """What a round reports; per-client fields are over the sampled cohort.

  Attributes:
    train_loss: Example-weighted mean local training loss of finite clients.
    num_nonfinite: Clients whose update was NaN/Inf and was excluded.
    clients: `[k]` sampled client indices.
    weights: `[k]` aggregation weights.
    client_train_loss: `[k]` each client's mean local training loss.
    real_steps: Σ over the cohort of each client's steps that hold a real example.
    executed_steps: Client-steps the compiled round computed (padded steps or
      lane-steps; `executed_steps / real_steps` is the round's overhead).
    present: `[k]` bool: the slot's client took part (all True but under
      Poisson sampling, whose absent slots train nothing and weigh 0, and for
      clients that dropped out or straggled and were dropped: `System`).
    stragglers: `[k]` bool: the slot's client straggled (`System`).
  """

  train_loss: jax.Array
  num_nonfinite: jax.Array
  clients: jax.Array
  weights: jax.Array
  client_train_loss: jax.Array
  real_steps: jax.Array
  executed_steps: jax.Array
  present: jax.Array
  stragglers: jax.Array


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as two pure functions (and, if it personalizes, a third).

  Attributes:
    init: `init(key, data) -> ServerState`.
    round: `round(state, data) -> (state, RoundMetrics)`; jittable and
      differentiable.
    personal: Optional `personal(state) -> params` stacked over all clients:
      each client's personalized model (Ditto's v_k, ...), for evaluation.
    plan: Optional `plan(params, data) -> Plan`: how a round over `data` runs its
      cohort (the strategy `auto` picks, the lanes), for reports.
    sample: Optional `sample(rng, num_clients) -> (ids, next_rng)`: the cohort a
      round started from key `rng` trains and the key of the next round, as the
      round computes them (a host store's feed draws cohorts ahead with it).
    deal: Optional `deal(data) -> fn`, `fn(ids) -> (padded, perm)` on the host:
      how a round over `data`'s population on the execution's mesh deals cohort
      `ids`: the cohort padded as the round pads it (`pad_cohort`) and the
      permutation of it the devices run (`FederatedData.deal`); None where the
      round does not deal (one device, a differentiable plan).
    adapt: Optional `adapt(state, data, key) -> params` stacked over `data`'s
      clients: the algorithm's own adaptation of a client that never trained
      (IFCA's choice of cluster, pFedHN's fitted embedding) from its data
      (their train splits); None where a newcomer fine-tunes the global model.
    serve: Optional `serve(state) -> params`: the one model a client gets without
      adapting, evaluated as the global model, where `state.params` is not one
      (IFCA's k cluster models); None: `state.params`.
  """

  init: Callable[[jax.Array, FederatedData], ServerState]
  round: Callable[[ServerState, FederatedData], tuple[ServerState, RoundMetrics]]
  personal: Callable[[ServerState], Any] | None = None
  plan: Callable[[Params, FederatedData], Plan] | None = None
  sample: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]] | None = None
  deal: Callable[[FederatedData], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
                 | None] | None = None
  adapt: Callable[[ServerState, FederatedData, jax.Array], Any] | None = None
  serve: Callable[[ServerState], Params] | None = None


def served(alg: FederatedAlgorithm, state: ServerState) -> Params:
  """The global model of `state`: `alg.serve(state)`, or `state.params`."""
  return state.params if alg.serve is None else alg.serve(state)


def population_counts(program: LocalProgram, data: FederatedData) -> np.ndarray | None:
  """Every client's steps under `program`, on the host (None if the sizes are unknown)."""
  if data.sizes is None:
    return None
  ids = np.arange(data.num_clients, dtype=np.int32)
  with jax.ensure_compile_time_eval():   # (a `num_steps` written with jax.numpy only)
    counts = program.num_steps(ClientData(None, None, data.sizes.astype(np.int32), id=ids))
    return np.broadcast_to(np.asarray(counts), ids.shape)


def cohort_plan(make_program: Callable[[FederatedData], LocalProgram],
                execution: Execution | None, clients_per_round: int
                ) -> Callable[[Params, FederatedData], Plan]:
  """`plan_of(params, data)`: how `execution` runs a round's cohort of the program."""
  execution = as_execution(execution)

  def plan_of(params, data: FederatedData) -> Plan:
    program = make_program(data)
    if data.cap is not None:
      program = capped(program, data.cap)
    cohort = clients_per_round + (-clients_per_round % execution.num_devices)
    return plan(execution, params, population_counts(program, data), cohort,
                size_classes=len(width_classes(data.max_examples, data.min_examples)))

  return plan_of


def make_sampler(clients_per_round: int, execution: Execution | None = None):
  """`sample(rng, num_clients) -> (ids, (next_rng, k_sample, k_clients))` of a round.

  The round's key splits into (next round, sampling, clients); the cohort is
  `sample_clients(k_sample, ...)` with the execution's sampling probabilities,
  or the `clients_per_round` slots of `poisson_cohort(k_sample, ...)`.
  """
  execution = as_execution(execution)
  # Kept on the host: a sampler built while a round is traced (an algorithm whose round
  # builds its inner round) must still check them, and a device array would be a tracer.
  probs = execution.sampling_probs
  probs = None if probs is None else np.asarray(probs, np.float32)
  rate = execution.poisson_rate

  def sample(rng: jax.Array, num_clients: int):
    if probs is not None:
      check_probs(probs, num_clients)
    rng, k_sample, k_clients = jax.random.split(rng, 3)
    if rate is not None:
      ids, _ = poisson_cohort(k_sample, num_clients, clients_per_round, rate)
    else:
      ids = sample_clients(k_sample, num_clients, clients_per_round,
                           probs=None if probs is None else jnp.asarray(probs))
    return ids, (rng, k_sample, k_clients)

  return sample


def make_round(
    make_program: Callable[[FederatedData], LocalProgram],
    aggregator: Aggregator,
    server_tx: optax.GradientTransformation,
    *,
    clients_per_round: int,
    execution: Execution | None = None,
    cohort: jax.Array | None = None,
) -> Callable[[ServerState, FederatedData], tuple[ServerState, RoundMetrics]]:
  """Builds the round of the FedAvg family around a one-client `LocalProgram`.

  Round t: sample a cohort S_t; each client i ∈ S_t trains from w_t and returns
  Δ_i; the aggregator combines them into Δ (for a weighting, Δ = Σ_i w_i Δ_i
  with w_i = 0 for non-finite Δ_i); the server treats g_t = −Δ as a gradient:
  (u, s) = server_tx.update(g_t, s, w_t), w_{t+1} = w_t + u. FedAvg is
  server_tx = sgd(1.0): w_{t+1} = w_t + Σ_i w_i Δ_i;
  momentum / adam / yogi / adagrad give FedAvgM / FedAdam / FedYogi / FedAdagrad
  (Reddi et al., ICLR 2021).

  Randomness: the state's key splits into (next round, sampling, clients), and
  client c's key is `fold_in(clients key, c)`, so a client's batches depend on
  its id, not on its position in the cohort, the strategy or the device.

  Args:
    make_program: `make_program(data) -> LocalProgram`, called at trace time
      with the round's data (for its static shapes).
    aggregator: An `Aggregator`, or a `WeightFn` for a weighted mean.
    server_tx: Server optimizer.
    clients_per_round: Cohort size `k`.
    execution: How the cohort runs and is sampled (default `Execution()`).
    cohort: Optional `[clients_per_round]` distinct client ids the round runs
      instead of sampling (an asynchronous server's arrivals: `fedbuff`); the
      keys split as in a sampled round.

  Returns:
    `round(state, data) -> (state, RoundMetrics)`.
  """
  if (not isinstance(clients_per_round, int) or isinstance(clients_per_round, bool)
      or clients_per_round < 1):
    raise ValueError(
        f"clients_per_round must be a positive int; got {clients_per_round!r}.")
  execution = as_execution(execution)
  aggregator = as_aggregator(aggregator)
  sample = make_sampler(clients_per_round, execution)
  mesh = execution.mesh
  plan_of = cohort_plan(make_program, execution, clients_per_round)

  def round_fn(state: ServerState, data: FederatedData):
    check_cohort(clients_per_round, data.num_clients)
    k = clients_per_round
    idx, (rng, k_sample, k_clients) = sample(state.rng, data.num_clients)
    if cohort is not None:
      idx = jnp.asarray(cohort, jnp.int32)
    if data.window is not None:   # gathered by a host feed, which drew `idx` ahead
      if data.window.shape != (k,):
        raise ValueError(f"data.window holds {data.window.shape} client ids; a round of "
                         f"clients_per_round={k} needs ({k},).")
      idx = data.window
    present = jnp.ones(k, bool)
    if execution.poisson_rate is not None:
      # Who of the slots took part, as the sampler drew them (a feed's window too).
      present = poisson_present(k_sample, idx, data.num_clients, execution.poisson_rate)
    system = execution.system
    straggler = jnp.zeros(k, bool)
    if system is not None and system.active:   # stragglers and dropouts of this cohort
      sys_draw = draw_system(jax.random.fold_in(k_sample, 2), k, system)
      straggler = sys_draw.straggler
      present = present & ~sys_draw.dropped
      if system.drop_stragglers:
        present = present & ~straggler
    padded, valid = pad_cohort(idx, execution.num_devices)
    valid = valid & jnp.concatenate([present, jnp.zeros(valid.shape[0] - k, bool)])
    if data.deal is not None and (data.window is None or data.x.shape[0] != padded.shape[0]):
      raise ValueError(f"data.deal needs a window and x rows for the {padded.shape[0]} padded "
                       f"clients of the round; got window "
                       f"{None if data.window is None else data.window.shape}, x rows "
                       f"{data.x.shape[0]}.")
    program = make_program(data)
    if data.cap is not None:
      program = capped(program, data.cap)
    if system is not None and system.straggler_fraction > 0 and not system.drop_stragglers:
      program = straggling(program, idx, sys_draw.share, system.levels, data.num_clients)
    how = plan_of(state.params, data)
    windowed = isinstance(state.client_states, ClientWindow)
    if windowed and data.window is None:
      raise ValueError("state.client_states is a ClientWindow (one cohort's states); the "
                       "round needs that cohort's gathered data (data.window set).")
    stacked = state.client_states.states if windowed else state.client_states
    personal = stacked if jax.tree.leaves(stacked) else None
    whole = (mesh is None and execution.sampling_probs is None
             and execution.poisson_rate is None and cohort is None
             and k == data.num_clients)
    source = cohort_source(data, personal, jax.random.fold_in(k_sample, 1), whole=whole,
                           windowed=windowed)
    result = execute_cohort(program, state.params, source, padded, valid, k_clients,
                            plan=how, mesh=mesh, score=aggregator.score)
    outputs = jax.tree.map(lambda a: a[:k], result.outputs)._replace(client_id=idx)
    nonfinite = jnp.sum(~outputs.finite & present).astype(jnp.int32)
    outputs = outputs._replace(finite=outputs.finite & present)   # absent slots weigh 0
    weight_state = state.weight_state
    if result.score_sum is not None:
      acc, total = result.score_sum
      agg = jax.tree.map(lambda a: safe_divide(a, total), acc)
      weights = safe_divide(result.scores[:k], total)
    else:
      agg, weights, weight_state = aggregator.apply(outputs, weight_state, state.params)
    client_states = state.client_states
    if outputs.client_state is not None:
      # Sampled clients with a finite update write their new state back; the
      # others keep theirs bit for bit. (A window's slot j is client idx[j].)
      def scatter(all_, new):
        ok = outputs.finite.reshape((-1,) + (1,) * (new.ndim - 1))
        if windowed:
          return jnp.where(ok, new, all_)
        return all_.at[idx].set(jnp.where(ok, new, all_[idx]))
      client_states = jax.tree.map(scatter, stacked, outputs.client_state)
      client_states = ClientWindow(client_states) if windowed else client_states
    pseudo_grad = jax.tree.map(jnp.negative, agg)
    updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.where(outputs.finite, outputs.num_examples, 0).astype(jnp.float32)
    metrics = RoundMetrics(
        train_loss=jnp.sum(n * jnp.where(outputs.finite, outputs.train_loss, 0.0))
        / jnp.maximum(jnp.sum(n), 1.0),
        num_nonfinite=nonfinite,
        clients=idx, weights=weights, client_train_loss=outputs.train_loss,
        real_steps=result.real_steps, executed_steps=result.executed_steps, present=present,
        stragglers=straggler)
    new_state = ServerState(
        params=params, opt_state=opt_state, weight_state=weight_state,
        client_states=client_states, round=state.round + 1, rng=rng,
        algorithm=state.algorithm)
    return new_state, metrics

  return round_fn


def cohort_state_change(before: ServerState, after: ServerState, clients: jax.Array) -> Any:
  """`Σ_{i ∈ clients} (s_i⁺ − s_i)`: the cohort's total change of its per-client states
  (`clients`: the round's distinct ids, `RoundMetrics.clients`; the others keep theirs bit
  for bit). Gathered, not summed over the population (on CPU a column sum over `N` rows
  cost a SCAFFOLD round 3× its clients' work); a `ClientWindow` holds only the cohort's."""
  if isinstance(before.client_states, ClientWindow):
    return jax.tree.map(lambda a, b: jnp.sum(b - a, axis=0),
                        before.client_states.states, after.client_states.states)
  return jax.tree.map(lambda a, b: jnp.sum(b[clients] - a[clients], axis=0),
                      before.client_states, after.client_states)


def zero_client_states(params: Params, num_clients: int) -> Any:
  """Per-client states of `params`' shapes, all zero (control variates, gradients)."""
  return jax.tree.map(lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)


def place(state: ServerState, execution: Execution | None) -> ServerState:
  """`state` replicated over the execution's mesh, where a sharded round leaves it.

  A first round that received the state on one device would otherwise be
  compiled twice (once for that placement, once for the mesh's).
  """
  mesh = as_execution(execution).mesh
  return state if mesh is None else replicated(state, mesh)


def make_init(
    model,
    server_tx: optax.GradientTransformation,
    aggregator: Aggregator,
    *,
    clients_per_round: int,
    client_states: Callable[[Params, int], Any] | None = None,
    execution: Execution | None = None,
    algorithm: Callable[[Params], Any] | None = None,
) -> Callable[[jax.Array, FederatedData], ServerState]:
  """`init(key, data) -> ServerState` of the FedAvg family.

  The key splits into (model, rounds); the model's params start the server
  optimizer, `aggregator.init` the weight state, `client_states(params,
  num_clients)` the per-client state (default none: `()`) and
  `algorithm(params)` the algorithm's own server state (default `()`). With a mesh in
  `execution` the state is replicated over it (`place`). Over windowed data (a
  host store's cohort) the per-client state is a `ClientWindow` of the window's
  slots, not the population's.
  """

  def init(key: jax.Array, data: FederatedData) -> ServerState:
    check_cohort(clients_per_round, data.num_clients)
    k_model, k_rounds = jax.random.split(key)
    params = model.init(k_model)
    if client_states is None:
      states = ()
    elif data.window is not None:
      states = ClientWindow(client_states(params, data.window.shape[0]))
    else:
      states = client_states(params, data.num_clients)
    return place(ServerState(
        params=params, opt_state=server_tx.init(params),
        weight_state=aggregator.init(data.num_clients), client_states=states,
        round=jnp.zeros((), jnp.int32), rng=k_rounds,
        algorithm=() if algorithm is None else algorithm(params)), execution)

  return init


def assembled(init, round_fn, make_program: Callable[[FederatedData], LocalProgram],
              execution: Execution | None, clients_per_round: int,
              personal: Callable[[ServerState], Any] | None = None) -> FederatedAlgorithm:
  """A `FederatedAlgorithm` of `init` and `round_fn` whose cohort runs `make_program` as
  `make_round` does (its plan, sampler and dealer), for rounds built around `make_round`."""
  return FederatedAlgorithm(init=init, round=round_fn, personal=personal,
                            plan=cohort_plan(make_program, execution, clients_per_round),
                            sample=cohort_sampler(clients_per_round, execution),
                            deal=cohort_dealer(make_program, execution))


def assemble(
    model,
    make_program: Callable[[FederatedData], LocalProgram],
    aggregator: Aggregator,
    server_tx: optax.GradientTransformation,
    *,
    clients_per_round: int,
    execution: Execution | None = None,
    client_states: Callable[[Params, int], Any] | None = None,
    personal: Callable[[ServerState], Any] | None = None,
) -> FederatedAlgorithm:
  """The `FederatedAlgorithm` of a FedAvg-family client program: `make_init` + `make_round`.

  Arguments as `make_round` and `make_init`; `personal` as `FederatedAlgorithm`.
  """
  round_fn = make_round(
      make_program, aggregator, server_tx, clients_per_round=clients_per_round,
      execution=execution)
  init = make_init(model, server_tx, aggregator, clients_per_round=clients_per_round,
                   client_states=client_states, execution=execution)
  return assembled(init, round_fn, make_program, execution, clients_per_round, personal)


def cohort_sampler(clients_per_round: int, execution: Execution | None = None):
  """`FederatedAlgorithm.sample` of a round built by `make_round`."""
  sample = make_sampler(clients_per_round, execution)

  def next_cohort(rng: jax.Array, num_clients: int):
    ids, keys = sample(rng, num_clients)
    return ids, keys[0]

  return next_cohort


def cohort_dealer(make_program: Callable[[FederatedData], LocalProgram],
                  execution: Execution | None = None):
  """`FederatedAlgorithm.deal` of a round built by `make_round`: the deal `execute_cohort`
  would compute (`balance` of the padded cohort's steps), on the host."""
  execution = as_execution(execution)

  def deal(data: FederatedData):
    d = execution.num_devices
    if execution.mesh is None or d == 1 or execution.differentiable:
      return None
    program = make_program(data)
    if data.cap is not None:
      program = capped(program, data.cap)
    counts = population_counts(program, data)
    if counts is None:
      counts = np.zeros(data.num_clients, np.int64)

    def padded_and_perm(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      padded, valid = pad_cohort(np.asarray(ids), d)
      return padded, balance_on_host(np.where(valid, counts[padded], 0), d)

    return padded_and_perm

  return deal
