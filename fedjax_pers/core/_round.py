"""The federated round: sample, run the cohort, weight, aggregate, server step.

One call of `round` is a pure function of arrays, so `jax.jit(alg.round)`
compiles a whole round (sampling, every client's local training, aggregation
and the server optimizer) into one XLA program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.core._client import ClientData, ClientOutput, ClientUpdate
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._sampling import check_cohort, check_probs, sample_clients

Params = Any
STRATEGIES = ("auto", "vmap", "chunked", "scan")
# On CPU, a cohort of models with at least this many parameters runs faster as a
# loop over clients than as batched matmuls (see benchmarks/round_throughput.py).
AUTO_SCAN_MIN_PARAMS = 20_000


class ServerState(NamedTuple):
  """Everything a round carries to the next.

  Attributes:
    params: Global model `w_t`.
    opt_state: Server optimizer state.
    weight_state: State of the aggregation weight function.
    client_states: Per-client state stacked over all clients (or `()`).
    round: Rounds completed, int32.
    rng: PRNG key of the next round.
  """

  params: Params
  opt_state: Any
  weight_state: Any
  client_states: Any
  round: jax.Array
  rng: jax.Array


class RoundMetrics(NamedTuple):
  """What a round reports; per-client fields are over the sampled cohort.

  Attributes:
    train_loss: Example-weighted mean local training loss of finite clients.
    num_nonfinite: Clients whose update was NaN/Inf and was excluded.
    clients: `[k]` sampled client indices.
    weights: `[k]` aggregation weights.
    client_train_loss: `[k]` each client's mean local training loss.
  """

  train_loss: jax.Array
  num_nonfinite: jax.Array
  clients: jax.Array
  weights: jax.Array
  client_train_loss: jax.Array


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as two pure functions.

  Attributes:
    init: `init(key, data) -> ServerState`.
    round: `round(state, data) -> (state, RoundMetrics)`; jittable and
      differentiable.
  """

  init: Callable[[jax.Array, FederatedData], ServerState]
  round: Callable[[ServerState, FederatedData], tuple[ServerState, RoundMetrics]]


def check_strategy(strategy: str, client_chunk: int | None) -> None:
  """Raises `ValueError` for an unknown cohort strategy or a bad chunk size."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")
  if strategy == "chunked" and (not isinstance(client_chunk, int) or client_chunk < 1):
    raise ValueError(
        f"strategy='chunked' needs client_chunk, a positive int; got {client_chunk!r}.")


def resolve_strategy(strategy: str, params: Params) -> str:
  """Picks a concrete strategy for `'auto'`.

  Accelerators: `vmap` (a cohort fills the device). CPU: `vmap` for small models,
  where batching many tiny matmuls wins by far; `scan` from
  `AUTO_SCAN_MIN_PARAMS` parameters on, where XLA:CPU's batched matmuls are
  slower than one client's plain matmuls run in turn.
  """
  if strategy != "auto":
    return strategy
  if jax.default_backend() != "cpu":
    return "vmap"
  size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  return "scan" if size >= AUTO_SCAN_MIN_PARAMS else "vmap"


def run_cohort(
    client_update: ClientUpdate, params: Params, clients: ClientData, keys: jax.Array,
    *, strategy: str, client_chunk: int | None = None,
) -> ClientOutput:
  """Runs `client_update` for every client of a cohort; outputs are stacked.

  Args:
    client_update: The one-client function.
    params: Global params broadcast to all clients.
    clients: Stacked `ClientData` of the cohort, leading axis `k`.
    keys: `[k]` PRNG keys.
    strategy: `vmap`, `chunked` (`lax.map` over chunks of `client_chunk`
      clients, vmapped inside a chunk) or `scan` (one client at a time).
    client_chunk: Chunk size for `chunked`.

  Returns:
    Stacked `ClientOutput`, leading axis `k`.
  """
  fn = lambda args: client_update(params, *args)
  if strategy == "vmap":
    return jax.vmap(fn)((clients, keys))
  if strategy == "chunked":
    return jax.lax.map(fn, (clients, keys), batch_size=client_chunk)
  if strategy == "scan":
    return jax.lax.map(fn, (clients, keys))
  raise ValueError(f"strategy must be one of {STRATEGIES[1:]}; got {strategy!r}.")


def weighted_sum(weights: jax.Array, deltas: Params) -> Params:
  """`Σ_i w_i Δ_i` over the leading axis of each leaf."""
  return jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=1), deltas)


def zero_nonfinite(outputs: ClientOutput) -> Params:
  """Stacked deltas with non-finite clients' updates replaced by zeros."""
  mask = lambda d: outputs.finite.reshape((-1,) + (1,) * (d.ndim - 1))
  return jax.tree.map(lambda d: jnp.where(mask(d), d, 0.0), outputs.delta)


def scan_weighted_sum(
    client_update: ClientUpdate, params: Params, clients: ClientData, keys: jax.Array,
    score: Callable[[ClientOutput], jax.Array],
) -> tuple[Params, ClientOutput, jax.Array]:
  """Runs clients one at a time, accumulating `Σ u_i Δ_i` instead of stacking.

  Returns:
    `(Σ_i w_i Δ_i, outputs without delta, weights)` with `w_i = u_i / Σ u_j`
    over finite clients.
  """

  def body(carry, args):
    acc, total = carry
    out = client_update(params, *args)
    u = jnp.where(out.finite, score(out), 0.0)
    acc = jax.tree.map(lambda a, d: a + u * jnp.where(out.finite, d, 0.0), acc, out.delta)
    return (acc, total + u), (out._replace(delta=None), u)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (acc, total), (outputs, u) = jax.lax.scan(body, (zeros, jnp.zeros(())), (clients, keys))
  safe = jnp.where(total > 0, total, 1.0)
  agg = jax.tree.map(lambda a: jnp.where(total > 0, a / safe, 0.0), acc)
  return agg, outputs, jnp.where(total > 0, u / safe, 0.0)


def make_round(
    make_client: Callable[[FederatedData], ClientUpdate],
    weighting,
    server_tx: optax.GradientTransformation,
    *,
    clients_per_round: int,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
) -> Callable[[ServerState, FederatedData], tuple[ServerState, RoundMetrics]]:
  """Builds the round of the FedAvg family around a one-client update.

  Round t: sample a cohort S_t; each client i ∈ S_t trains from w_t and returns
  Δ_i; weights w_i come from `weighting` (zero for non-finite Δ_i); the server
  treats g_t = −Σ_i w_i Δ_i as a gradient: (u, s) = server_tx.update(g_t, s, w_t),
  w_{t+1} = w_t + u. FedAvg is server_tx = sgd(1.0): w_{t+1} = w_t + Σ_i w_i Δ_i;
  momentum / adam / yogi / adagrad give FedAvgM / FedAdam / FedYogi / FedAdagrad
  (Reddi et al., ICLR 2021).

  Args:
    make_client: `make_client(data) -> client_update`, called at trace time with
      the round's data (for its static shapes).
    weighting: A `WeightFn`.
    server_tx: Server optimizer.
    clients_per_round: Cohort size `k`.
    strategy: How the cohort runs (`auto`, `vmap`, `chunked`, `scan`).
    client_chunk: Chunk size for `chunked`.
    sampling_probs: Optional `[N]` client sampling weights.

  Returns:
    `round(state, data) -> (state, RoundMetrics)`.
  """
  check_strategy(strategy, client_chunk)
  probs = None if sampling_probs is None else jnp.asarray(sampling_probs, jnp.float32)

  def round_fn(state: ServerState, data: FederatedData):
    check_cohort(clients_per_round, data.num_clients)
    if probs is not None:
      check_probs(np.asarray(probs), data.num_clients)
    rng, k_sample, k_clients = jax.random.split(state.rng, 3)
    idx = sample_clients(k_sample, data.num_clients, clients_per_round, probs=probs)
    clients = ClientData(data.x, data.y, data.num_examples)
    if clients_per_round < data.num_clients or probs is not None:
      clients = jax.tree.map(lambda a: a[idx], clients)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(k_clients, idx)
    client_update = make_client(data)
    how = resolve_strategy(strategy, state.params)
    weight_state = state.weight_state
    if how == "scan" and weighting.score is not None:
      agg, outputs, weights = scan_weighted_sum(
          client_update, state.params, clients, keys, weighting.score)
    else:
      outputs = run_cohort(client_update, state.params, clients, keys,
                           strategy=how, client_chunk=client_chunk)
      weights, weight_state = weighting.apply(outputs, weight_state)
      weights = jnp.where(outputs.finite, weights, 0.0)
      total = jnp.sum(weights)
      weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
      agg = weighted_sum(weights, zero_nonfinite(outputs))
    pseudo_grad = jax.tree.map(jnp.negative, agg)
    updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.where(outputs.finite, outputs.num_examples, 0).astype(jnp.float32)
    metrics = RoundMetrics(
        train_loss=jnp.sum(n * jnp.where(outputs.finite, outputs.train_loss, 0.0))
        / jnp.maximum(jnp.sum(n), 1.0),
        num_nonfinite=jnp.sum(~outputs.finite).astype(jnp.int32),
        clients=idx, weights=weights, client_train_loss=outputs.train_loss)
    new_state = ServerState(
        params=params, opt_state=opt_state, weight_state=weight_state,
        client_states=state.client_states, round=state.round + 1, rng=rng)
    return new_state, metrics

  return round_fn
