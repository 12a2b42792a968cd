"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personalized models as Moreau envelopes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work, work_steps
from fedjax_pers.core._client import masked_mean_loss, stack_clients
from fedjax_pers.core._cohort import normalize, weighted_sum, zero_nonfinite
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution, as_execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram
from fedjax_pers.core._round import (
  FederatedAlgorithm,
  ServerState,
  cohort_plan,
  cohort_sampler,
  make_round,
  place,
)
from fedjax_pers.core._sampling import check_cohort, sample_clients
from fedjax_pers.core._sgd import client_output, sgd_steps
from fedjax_pers.core._traced import traced


class SampledState(NamedTuple):
  """The PRNG key that picks which clients' updates the server averages."""

  key: jax.Array


class PFedMeCarry(NamedTuple):
  """A pFedMe client during local training: θ, its local copy w of the global model, sums."""

  theta: Any
  w: Any
  loss_sum: jax.Array
  count: jax.Array


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
    execution: Execution | None = None,
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
    execution: How all clients' local work runs (see `fedavg`); every client
      trains, so its `sampling_probs` must be None.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` returns the θ_k.
  """
  check_local_work(work)
  if work.steps is None:
    raise ValueError(f"pfedme needs work=LocalWork(batch_size, steps=R); got {work!r}.")
  for name, v in (("learning_rate", learning_rate), ("personal_learning_rate",
                                                     personal_learning_rate), ("lam", lam)):
    if not (traced(v) or isinstance(v, (int, float)) and v > 0):
      raise ValueError(f"{name} must be a number > 0; got {v!r}.")
  if not (isinstance(inner_steps, int) and inner_steps >= 1):
    raise ValueError(f"inner_steps (K) must be an int >= 1; got {inner_steps!r}.")
  if not (traced(beta) or isinstance(beta, (int, float)) and 0 < beta < 2):
    raise ValueError(f"beta must be in (0, 2); got {beta!r}.")
  check_average(average)
  execution = as_execution(execution)
  if execution.sampling_probs is not None or execution.poisson_rate is not None:
    raise ValueError("pfedme: every client trains every round; execution.sampling_probs and "
                     "poisson_rate must be None (the averaged clients are drawn uniformly).")

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)

    def start(params, client, key):
      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      return (PFedMeCarry(params, params, zero, jnp.zeros((), jnp.int32)),
              sgd_steps(key, client, work, max_examples=data.max_examples,
                        min_examples=data.min_examples))

    def step(params, c, batch):
      xb, yb, mb, k = batch
      batch_loss = lambda t: masked_mean_loss(model, t, xb, yb, mb, k)

      def inner(t, _):
        g = jax.grad(lambda t_: batch_loss(t_)[0])(t)
        return jax.tree.map(lambda a, ga, b: a - personal_learning_rate * (ga + lam * (a - b)),
                            t, g, c.w), None

      total = batch_loss(c.theta)[1]
      theta, _ = jax.lax.scan(inner, c.theta, None, length=inner_steps)
      w = jax.tree.map(lambda a, b: a - learning_rate * lam * (a - b), c.w, theta)
      return PFedMeCarry(theta, w, c.loss_sum + total, c.count + jnp.sum(mb, dtype=jnp.int32))

    def finish(params, client, c):
      out = client_output(model, params, client, c.w, c.loss_sum, c.count, data.num_classes,
                          also_finite=c.theta)
      return out._replace(client_state=c.theta)

    return LocalProgram(start, step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  server_tx = optax.sgd(beta)

  def round_fn(state: ServerState, data: FederatedData):
    check_cohort(clients_per_round, data.num_clients)
    full = make_round(   # every client trains; `sampled_mean` picks whose w is averaged
        make_program, sampled_mean(clients_per_round, data.num_clients, average), server_tx,
        clients_per_round=data.num_clients, execution=execution)
    return full(state, data)

  def init(key: jax.Array, data: FederatedData) -> ServerState:
    check_cohort(clients_per_round, data.num_clients)
    k_model, k_rounds, k_agg = jax.random.split(key, 3)
    params = model.init(k_model)
    stacked = stack_clients(params, data.num_clients)
    return place(ServerState(
        params=params, opt_state=server_tx.init(params),
        weight_state=SampledState(k_agg), client_states=stacked,
        round=jnp.zeros((), jnp.int32), rng=k_rounds), execution)

  plan = lambda params, data: cohort_plan(make_program, execution, data.num_clients)(
      params, data)
  return FederatedAlgorithm(init=init, round=round_fn, personal=lambda s: s.client_states,
                            plan=plan, sample=lambda rng, n: cohort_sampler(n, execution)(rng, n))
