"""Gradients through whole federated rounds with respect to their hyperparameters.

A round is a pure, differentiable function of the server state, the data and
every number that configures it, so a held-out objective after T rounds,

  L(h) = ℓ_val(w_T(h)),   w_{t+1} = round_h(w_t),

has an exact gradient ∇_h L by reverse-mode differentiation through the T
rounds (each client's local steps, the aggregation weights and the server
optimizer included). The cohorts and batches are drawn from the state's key,
which `h` does not change, so L is a deterministic function of h.

Reverse mode needs the rounds' differentiable path: every client runs the
longest client's number of steps as a masked `lax.scan`
(`Execution(differentiable=True)`), because the default path stops each client
at its own last step with a `lax.while_loop`, which `jax.grad` cannot reverse.
`fedavg_with` asks for it; an algorithm built another way for `hypergradient`
must pass `execution=Execution(differentiable=True, ...)` itself.

Example (the server learning rate and per-client weight logits):

  build = lambda h: fedavg_with(model, work, h, clients_per_round=10)
  value, grads = hypergradient(build, RoundHyperparams.default(100), state, data,
                               held_out_loss(model, x_val, y_val), num_rounds=3)
  grads.server_lr, grads.weight_logits
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.aggregation._weights import logits
from fedjax_pers.algorithms._fedavg import fedavg
from fedjax_pers.core._batching import LocalWork
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution, as_execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, ServerState

Params = Any


class RoundHyperparams(NamedTuple):
  """The hyperparameters of a FedAvg/FedProx round that `fedavg_with` exposes.

  Attributes:
    client_lr: Clients' SGD learning rate η.
    server_lr: Server SGD learning rate η_s.
    weight_logits: `[num_clients]` θ: the sampled clients' aggregation weights
      are softmax(θ_{c_i}) over the cohort.
    prox_mu: FedProx's μ.
  """

  client_lr: jax.Array
  server_lr: jax.Array
  weight_logits: jax.Array
  prox_mu: jax.Array

  @classmethod
  def default(cls, num_clients: int, *, client_lr: float = 0.01, server_lr: float = 1.0,
              prox_mu: float = 0.0, dtype=jnp.float32) -> RoundHyperparams:
    """Uniform weights (θ = 0) and the given rates, as arrays of `dtype`."""
    f = lambda v: jnp.asarray(v, dtype)
    return cls(f(client_lr), f(server_lr), jnp.zeros((num_clients,), dtype), f(prox_mu))


def fedavg_with(model: Model, work: LocalWork, hyper: RoundHyperparams, *,
                clients_per_round: int, execution: Execution | None = None
                ) -> FederatedAlgorithm:
  """FedProx with SGD clients and server whose numbers all come from `hyper` (traceable).

  Clients minimise f_i(w) + (μ/2)||w − w_t||² by `work` steps of SGD(η); the
  server sets w_{t+1} = w_t + η_s Σ_i softmax(θ)_i Δ_i. The cohort runs by
  `execution` (strategy, chunks, mesh) on its differentiable path
  (`differentiable=True` is set here; `strategy='lanes'` is refused).
  """
  execution = dataclasses.replace(as_execution(execution), differentiable=True)
  return fedavg(model, optax.sgd(hyper.client_lr), optax.sgd(hyper.server_lr), work,
                clients_per_round=clients_per_round, weighting=logits(hyper.weight_logits),
                prox_mu=hyper.prox_mu, execution=execution)


def held_out_loss(model: Model, x: np.ndarray, y: np.ndarray) -> Callable[[Params], jax.Array]:
  """`objective(params)`: the mean loss of `params` on a held-out set `(x, y)`."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  return lambda params: jnp.mean(model.loss(model.apply(params, x), y))


def unrolled_objective(build: Callable[[Any], FederatedAlgorithm], hyper: Any,
                       state: ServerState, data: FederatedData,
                       objective: Callable[[Params], jax.Array], *, num_rounds: int = 1,
                       remat: bool = False) -> jax.Array:
  """`objective(w_T)` after `num_rounds` rounds of `build(hyper)` from `state`.

  Args:
    build: `build(hyper) -> FederatedAlgorithm`, called at trace time with the
      (traced) hyperparameters, e.g. `lambda h: fedavg_with(model, work, h, ...)`.
    hyper: Any pytree of hyperparameters.
    state: The starting `ServerState` (its key fixes cohorts and batches).
    data: Training data.
    objective: `objective(params) -> scalar`, e.g. `held_out_loss`.
    num_rounds: T, rounds unrolled under `lax.scan`.
    remat: Recompute each round in the backward pass (`jax.checkpoint`) and
      keep only the T round states, not every client's activations.

  Returns:
    The scalar objective.
  """
  if not (isinstance(num_rounds, int) and num_rounds >= 1):
    raise ValueError(f"num_rounds must be an int >= 1; got {num_rounds!r}.")
  if isinstance(hyper, RoundHyperparams) and jnp.shape(hyper.weight_logits) != (
      data.num_clients,):
    raise ValueError(f"hyper.weight_logits must have one logit per client, shape "
                     f"({data.num_clients},); got {jnp.shape(hyper.weight_logits)}.")
  alg = build(hyper)

  def body(s, _):
    return alg.round(s, data)[0], None

  if remat:
    body = jax.checkpoint(body)
  final, _ = jax.lax.scan(body, state, None, length=num_rounds)
  return objective(final.params)


def hypergradient(build: Callable[[Any], FederatedAlgorithm], hyper: Any, state: ServerState,
                  data: FederatedData, objective: Callable[[Params], jax.Array], *,
                  num_rounds: int = 1, remat: bool = False) -> tuple[jax.Array, Any]:
  """The held-out objective after `num_rounds` rounds and its gradient with respect to `hyper`.

  Arguments as `unrolled_objective`. To jit it, close over `build` and
  `objective` and pass the arrays: `jax.jit(lambda h, s, d: hypergradient(build, h,
  s, d, obj))` (closed-over data would be folded into the program as constants).

  Returns:
    `(value, grads)`, grads shaped like `hyper`.
  """
  return jax.value_and_grad(
      lambda h: unrolled_objective(build, h, state, data, objective, num_rounds=num_rounds,
                                   remat=remat))(hyper)
