"""Ditto (Li, Hu, Beirami & Smith, ICML 2021): a global model and a personal one per client."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import (
  LocalWork,
  batch_plan,
  check_local_work,
  num_steps,
  work_steps,
)
from fedjax_pers.core._client import stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, Steps, array_module, pad_steps, tree_where
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import SGDState, client_output, sgd_init, sgd_step, sgd_steps
from fedjax_pers.core._traced import traced


class DittoCarry(NamedTuple):
  """A Ditto client during local training: the global model's steps and its own v_k's."""

  glob: SGDState
  own: SGDState


def _most(a, b):
  """The larger of two step counts (a Python int when both are)."""
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else (
      array_module(a, b).maximum(a, b))


def ditto(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    lam: float,
    clients_per_round: int,
    personal_tx: optax.GradientTransformation | None = None,
    personal_work: LocalWork | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """Ditto: FedAvg for the global model w, plus a personal model v_k per client.

  A sampled client k trains the global model as FedAvg does (`work`,
  `client_tx`) and, from its own v_k, takes the personal steps

    v_k ← v_k − η (∇F_k(v_k) + λ (v_k − w_t)),

  (`personal_work`, `personal_tx`; by default the same as the global ones) on
  minibatches of its data, step for step beside the global ones (the two
  sequences are independent: both start from the round's w_t or v_k). The v_k
  of all clients live stacked in
  `ServerState.client_states`, start at w_0, and change only in the rounds
  their client is sampled. λ = 0 gives local training alone; λ → ∞ pins v_k
  to the global model.

  Args:
    model: The model.
    client_tx: Optimizer of the global model's local training.
    server_tx: Server optimizer (`optax.sgd(1.0)`: FedAvg).
    work: Local work of the global part.
    lam: λ ≥ 0.
    clients_per_round: Cohort size.
    personal_tx: Optimizer of the personal steps (default `client_tx`).
    personal_work: Personal steps (default `work`).
    weighting: Aggregation of the global part (default data size).
    execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` returns the stacked v_k.
  """
  check_local_work(work)
  personal_work = work if personal_work is None else personal_work
  check_local_work(personal_work)
  if not (traced(lam) or isinstance(lam, (int, float)) and lam >= 0):
    raise ValueError(f"lam (Ditto's λ) must be a number >= 0; got {lam!r}.")
  personal_tx = client_tx if personal_tx is None else personal_tx
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)
    check_local_work(personal_work, data.num_clients)
    sizes = dict(max_examples=data.max_examples, min_examples=data.min_examples)
    total = max(num_steps(work, data.max_examples), num_steps(personal_work, data.max_examples))

    def start(params, client, key):
      k_global, k_plan, k_train = jax.random.split(key, 3)
      glob = sgd_steps(k_global, client, work, **sizes)
      plan = batch_plan(k_plan, client.num_examples, personal_work, client_id=client.id, **sizes)
      own = Steps(plan.idx, plan.mask, jax.random.split(k_train, plan.idx.shape[0]))
      glob, own = pad_steps(glob, total), pad_steps(own, total)
      carry = DittoCarry(sgd_init(client_tx, params), sgd_init(personal_tx, client.state))
      return carry, Steps((glob.idx, own.idx), (glob.mask, own.mask), (glob.extra, own.extra))

    def step(params, carry, batch):
      (gx, vx), (gy, vy), (gm, vm), (gk, vk) = batch
      glob = sgd_step(model, client_tx, carry.glob, gx, gy, gm, gk)
      own = sgd_step(model, personal_tx, carry.own, vx, vy, vm, vk, prox_mu=lam, anchor=params)
      return DittoCarry(tree_where(jnp.any(gm), glob, carry.glob),
                        tree_where(jnp.any(vm), own, carry.own))

    def finish(params, client, carry):
      g = carry.glob
      out = client_output(model, params, client, g.w, g.loss_sum, g.count, data.num_classes,
                          client_losses=aggregator.client_losses)
      return out._replace(client_state=carry.own.w)

    def count(client):
      return _most(work_steps(work, client.num_examples, client.id),
                   work_steps(personal_work, client.num_examples, client.id))

    return LocalProgram(start, step, finish, count)

  return assemble(
      model, make_program, aggregator, server_tx, clients_per_round=clients_per_round,
      execution=execution, client_states=stack_clients, personal=lambda s: s.client_states)
