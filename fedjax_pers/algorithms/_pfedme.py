"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personalized models as Moreau envelopes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import (
    ClientOutput,
    all_finite,
    label_histogram,
    masked_mean_loss,
    stack_clients,
)
from fedjax_pers.core._cohort import normalize, weighted_sum, zero_nonfinite
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, ServerState, make_round
from fedjax_pers.core._sampling import check_cohort, sample_clients


class SampledState(NamedTuple):
  """The PRNG key that picks which clients' updates the server averages."""

  key: jax.Array


AVERAGES = ("uniform", "num_examples")


def check_average(average: str) -> None:
  """Raises `ValueError` unless `average` names one of pFedMe's server averages."""
  if average not in AVERAGES:
    raise ValueError(f"average must be one of {AVERAGES}; got {average!r}.")


def sampled_mean(clients_per_round: int, num_clients: int,
                 average: str = "uniform") -> Aggregator:
  """All clients train; the server averages the updates of `clients_per_round` of them.

  Each round draws the aggregated clients uniformly without replacement from
  its own key (kept in the state; `init` starts from key 0, `pfedme` seeds it
  from the run's key) and weights them equally (`average='uniform'`) or by
  data size (`'num_examples'`). The reported weights are zero for the clients
  not drawn.
  """
  check_average(average)

  def apply(outputs, state, params):
    del params
    key, sub = jax.random.split(state.key)
    chosen = sample_clients(sub, num_clients, clients_per_round)
    mask = jnp.zeros((num_clients,), bool).at[chosen].set(True)[outputs.client_id]
    size = outputs.num_examples.astype(jnp.float32)
    w = normalize(size if average == "num_examples" else jnp.ones_like(size),
                  mask & outputs.finite)
    return weighted_sum(w, zero_nonfinite(outputs)), w, SampledState(key)

  return Aggregator(init=lambda n: SampledState(jax.random.key(0)), apply=apply)


def pfedme(
    model: Model,
    work: LocalWork,
    *,
    learning_rate: float,
    personal_learning_rate: float,
    lam: float,
    inner_steps: int,
    beta: float = 1.0,
    clients_per_round: int,
    average: str = "uniform",
    strategy: str = "auto",
    client_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> FederatedAlgorithm:
  """pFedMe: each client keeps a personalized θ_k near its local copy w of the global model.

  In every round every client (as in the paper's code) starts from w = w_t,
  θ = w_t and runs R = `work.steps` local rounds; on each minibatch D it solves

    θ ← θ − η_p (∇f(θ; D) + λ (θ − w))     (K = `inner_steps` times),
    w ← w − η λ (w − θ).

  The server averages the local w of `clients_per_round` clients drawn
  uniformly, w̄ = (1/S) Σ w_i as the paper's Algorithm 1 (`average='uniform'`)
  or weighted by n_i as the authors' code (`'num_examples'`), and sets
  w_{t+1} = (1 − β) w_t + β w̄. θ_k is the
  client's personalized model (kept stacked in `ServerState.client_states`).

  Args:
    model: The model.
    work: `LocalWork(batch_size, steps=R)`.
    learning_rate: η.
    personal_learning_rate: η_p.
    lam: λ > 0.
    inner_steps: K ≥ 1.
    beta: β in (0, 2).
    clients_per_round: Clients whose updates are averaged.
    average: `uniform` (the paper) or `num_examples` (the authors' code).
    strategy, client_chunk, mesh: How all clients' local work runs (see `fedavg`).

  Returns:
    The `FederatedAlgorithm`; `personal(state)` returns the θ_k.
  """
  check_local_work(work)
  if work.steps is None:
    raise ValueError(f"pfedme needs work=LocalWork(batch_size, steps=R); got {work!r}.")
  for name, v in (("learning_rate", learning_rate), ("personal_learning_rate",
                                                     personal_learning_rate), ("lam", lam)):
    if not (isinstance(v, (int, float)) and v > 0):
      raise ValueError(f"{name} must be a number > 0; got {v!r}.")
  if not (isinstance(inner_steps, int) and inner_steps >= 1):
    raise ValueError(f"inner_steps (K) must be an int >= 1; got {inner_steps!r}.")
  if not (isinstance(beta, (int, float)) and 0 < beta < 2):
    raise ValueError(f"beta must be in (0, 2); got {beta!r}.")
  check_average(average)

  def make_client(data: FederatedData):
    def client_update(params, client, key):
      k_plan, k_train = jax.random.split(key)
      plan = batch_plan(k_plan, client.num_examples, work, max_examples=data.max_examples,
                        min_examples=data.min_examples)
      keys = jax.random.split(k_train, plan.idx.shape[0])

      def local_round(carry, inputs):
        theta, w, loss_sum, count = carry
        idx, mb, k = inputs
        xb, yb = client.x[idx], client.y[idx]
        batch_loss = lambda t: masked_mean_loss(model, t, xb, yb, mb, k)

        def inner(t, _):
          g = jax.grad(lambda t_: batch_loss(t_)[0])(t)
          return jax.tree.map(lambda a, ga, b: a - personal_learning_rate * (ga + lam * (a - b)),
                              t, g, w), None

        total = batch_loss(theta)[1]
        theta, _ = jax.lax.scan(inner, theta, None, length=inner_steps)
        w = jax.tree.map(lambda a, b: a - learning_rate * lam * (a - b), w, theta)
        return (theta, w, loss_sum + total, count + jnp.sum(mb, dtype=jnp.int32)), None

      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      (theta, w, loss_sum, count), _ = jax.lax.scan(
          local_round, (params, params, zero, jnp.zeros((), jnp.int32)),
          (plan.idx, plan.mask, keys))
      delta = jax.tree.map(jnp.subtract, w, params)
      finite = all_finite((delta, theta))
      hist = label_histogram(client, data.num_classes)
      return ClientOutput(delta=delta, num_examples=client.num_examples,
                          train_loss=loss_sum / jnp.maximum(count, 1),
                          num_steps=jnp.asarray(plan.idx.shape[0], jnp.int32),
                          label_hist=hist, finite=finite, client_state=theta)

    return client_update

  server_tx = optax.sgd(beta)

  def round_fn(state: ServerState, data: FederatedData):
    check_cohort(clients_per_round, data.num_clients)
    full = make_round(   # every client trains; `sampled_mean` picks whose w is averaged
        make_client, sampled_mean(clients_per_round, data.num_clients, average), server_tx,
        clients_per_round=data.num_clients, strategy=strategy, client_chunk=client_chunk,
        mesh=mesh)
    return full(state, data)

  def init(key: jax.Array, data: FederatedData) -> ServerState:
    check_cohort(clients_per_round, data.num_clients)
    k_model, k_rounds, k_agg = jax.random.split(key, 3)
    params = model.init(k_model)
    stacked = stack_clients(params, data.num_clients)
    return ServerState(
        params=params, opt_state=server_tx.init(params),
        weight_state=SampledState(k_agg), client_states=stacked,
        round=jnp.zeros((), jnp.int32), rng=k_rounds)

  return FederatedAlgorithm(init=init, round=round_fn, personal=lambda s: s.client_states)
