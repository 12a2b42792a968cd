"""IFCA, clustered federated learning (Ghosh, Chung, Yin & Ramchandran, "An Efficient
Framework for Clustered Federated Learning", NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work
from fedjax_pers.core._client import ClientData, full_loss
from fedjax_pers.core._cohort import safe_divide, weighted_sum, zero_nonfinite
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import client_output, sgd_init, sgd_program, sgd_steps

Params = Any


class Clusters(NamedTuple):
  """IFCA's per-client state: `cluster`, `[N]` int32, the cluster each client chose at its
  last round (−1 before its first)."""

  cluster: jax.Array


def choose(model: Model, models: Params, client: ClientData) -> jax.Array:
  """ĵ = argmin_j F_i(θ_j): the cluster model (stacked on the leading axis) of lowest mean
  loss over the client's examples (the paper's Algorithm 2, line 6)."""
  losses = jax.vmap(lambda p: full_loss(model, p, client))(models)
  return jnp.argmin(losses).astype(jnp.int32)


def assignments(model: Model, models: Params, data: FederatedData) -> jax.Array:
  """`[N]` int32: the cluster each client of `data` (padded rows) would choose now."""
  if data.cap is not None:
    raise ValueError("ifca reads padded client rows to choose clusters; got a capped store.")
  return jax.vmap(lambda x, y, n: choose(model, models, ClientData(x, y, n)))(
      data.x, data.y, data.num_examples)


def at(models: Params, j: jax.Array) -> Params:
  """Cluster `j`'s model."""
  return jax.tree.map(lambda a: a[j], models)


def cluster_mean(weighting: WeightFn, k: int) -> Aggregator:
  """Per cluster, the weighted mean of its clients' updates:

    Δ_j = Σ_{i ∈ C_j} p_i Δ_i / Σ_{i ∈ C_j} p_i   (0 for a cluster no client chose),

  with p = `weighting` over the cohort and C_j the clients that chose j (their
  `client_state`); a client's reported weight is its share within its cluster.
  """

  def apply(outputs, state, params):
    del params
    p, state = weighting.apply(outputs, state)
    u = jnp.where(outputs.finite, p, 0.0)
    chosen = outputs.client_state.cluster
    share = jnp.sum(jnp.where(chosen[:, None] == jnp.arange(k)[None, :], u[:, None], 0.0),
                    axis=0)                                     # [k]: Σ_{i ∈ C_j} p_i
    q = safe_divide(u, share[chosen])   # each client's weight within its cluster
    # Client i's update fills slot ĵ_i only, so slot j of the sum is Σ_{i ∈ C_j} q_i Δ_i.
    return weighted_sum(q, zero_nonfinite(outputs)), q, state

  return Aggregator(init=weighting.init, apply=apply, client_losses=weighting.client_losses)


def ifca(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    num_clusters: int,
    clients_per_round: int,
    weighting: WeightFn | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """IFCA with model averaging (the paper's Algorithm 2, "option II").

  The server keeps k models θ_1..θ_k (`ServerState.params`, stacked on a leading
  axis of size k, each drawn by its own initialisation). Each sampled client i
  picks ĵ = argmin_j F_i(θ_j) over its examples, trains θ_ĵ with `work` steps of
  `client_tx` and returns Δ_i = θ_i − θ_ĵ; the server averages the updates of
  each cluster (`cluster_mean`) and applies `server_tx` to all k models. With
  k = 1 it is FedAvg: the same weights bit for bit, the same model up to float
  rounding (XLA fuses the stacked arithmetic differently: ~1e-8 after 3 rounds).

  `adapt` picks each client's cluster the same way from its data (the
  personalized model, and a newcomer's); `serve` is the model of the cluster
  most clients chose at their last round (the one a client gets without
  choosing), reported as the global model. `client_states` is a `Clusters`.

  Args:
    model: The model of each cluster.
    client_tx, server_tx, work, clients_per_round, execution: As `fedavg`.
    num_clusters: k ≥ 1.
    weighting: A `WeightFn` for the means within clusters (default data size).

  Returns:
    The `FederatedAlgorithm`.
  """
  check_local_work(work)
  if not (isinstance(num_clusters, int) and not isinstance(num_clusters, bool)
          and num_clusters >= 1):
    raise ValueError(f"ifca: num_clusters must be an int >= 1; got {num_clusters!r}.")
  if weighting is not None and not isinstance(weighting, WeightFn):
    raise ValueError("ifca averages within clusters with a weight function (num_examples, "
                     f"uniform, ...); got {type(weighting).__name__}.")
  k = num_clusters
  aggregator = cluster_mean(num_examples() if weighting is None else weighting, k)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)
    sgd = sgd_program(model, client_tx, work, max_examples=data.max_examples,
                      min_examples=data.min_examples)

    def start(models, client, key):
      j = choose(model, models, client)
      return (sgd_init(client_tx, at(models, j)), j), sgd_steps(
          key, client, work, max_examples=data.max_examples, min_examples=data.min_examples)

    def step(models, carry, batch):
      s, j = carry
      return sgd.step(models, s, batch), j

    def finish(models, client, carry):
      s, j = carry
      out = client_output(model, at(models, j), client, s.w, s.loss_sum, s.count,
                          data.num_classes, client_losses=aggregator.client_losses)
      mine = jnp.arange(k) == j
      delta = jax.tree.map(
          lambda d: jnp.where(mine.reshape((k,) + (1,) * d.ndim), d[None], 0.0), out.delta)
      return out._replace(delta=delta, client_state=Clusters(j))

    return sgd._replace(start=start, step=step, finish=finish)

  stacked = model._replace(init=lambda key: jax.vmap(model.init)(jax.random.split(key, k)))
  alg = assemble(stacked, make_program, aggregator, server_tx,
                 clients_per_round=clients_per_round, execution=execution,
                 client_states=lambda params, n: Clusters(jnp.full((n,), -1, jnp.int32)))

  def adapt(state, data: FederatedData, key):
    del key
    return at(state.params, assignments(model, state.params, data))

  def serve(state):
    chosen = state.client_states.cluster
    counts = jnp.sum(chosen[:, None] == jnp.arange(k)[None, :], axis=0)
    return at(state.params, jnp.argmax(counts))

  return alg._replace(adapt=adapt, serve=serve)
