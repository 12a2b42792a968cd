"""Local optimizer steps as a `LocalProgram`: the FedAvg / FedProx client and its parts.

`sgd_program` is `work` steps of any optax optimizer from a starting point,
optionally pulled towards an anchor (FedProx, Ditto); `fedavg_program` adds the
client's output. Other algorithms reuse `sgd_init`, `sgd_step` and `sgd_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.core._batching import LocalWork, batch_plan, work_steps
from fedjax_pers.core._client import (
    ClientData,
    ClientOutput,
    all_finite,
    full_loss,
    label_histogram,
    masked_mean_loss,
    tree_sq_norm,
)
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, Steps, run_steps

Params = Any


class SGDState(NamedTuple):
  """The carry of local optimizer steps.

  Attributes:
    w: Local model.
    opt_state: The client optimizer's state.
    loss_sum: Sum of the per-example losses of the batches seen, each measured
      before the step that used it.
    count: Real examples seen (int32).
  """

  w: Params
  opt_state: Any
  loss_sum: jax.Array
  count: jax.Array


def sgd_init(tx: optax.GradientTransformation, w: Params) -> SGDState:
  """The state before the first local step from `w`."""
  zero = jnp.zeros((), jax.tree.leaves(w)[0].dtype)
  return SGDState(w, tx.init(w), zero, jnp.zeros((), jnp.int32))


def sgd_step(model: Model, tx: optax.GradientTransformation, state: SGDState, x: jax.Array,
             y: jax.Array, mask: jax.Array, key: jax.Array, *,
             prox_mu: float | jax.Array | None = None, anchor: Params | None = None
             ) -> SGDState:
  """One optimizer step on the batch's real examples `b`, minimising

    f_b(w) = (1/|b|) Σ_{j∈b} ℓ(w; x_j, y_j) + (μ/2) ||w − anchor||²,

  the proximal term (FedProx, Li et al., MLSys 2020; Ditto's λ with the global
  model as anchor) present when `prox_mu` is not None. A model with batch
  normalisation (`Model.batch_stats`) normalises by the batch's real examples and
  leaves the step with their running statistics written into `w`.
  """

  bn = model.batch_stats

  def objective(w):
    if bn is None:
      mean, total = masked_mean_loss(model, w, x, y, mask, key)
      stats = None
    else:   # normalised by the real rows' statistics, whose running values it returns
      logits, stats = bn.train(w, x, mask, key)
      losses = jnp.where(mask, model.loss(logits, y), 0.0)
      total = jnp.sum(losses)
      mean = total / jnp.maximum(jnp.sum(mask), 1)
    if prox_mu is not None:
      mean = mean + 0.5 * prox_mu * tree_sq_norm(jax.tree.map(jnp.subtract, w, anchor))
    return mean, (total, stats)

  (_, (total, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.w)
  new = apply_grads(tx, state, grads, total, mask)
  return new if bn is None else new._replace(w=bn.put(new.w, stats))


def apply_grads(tx: optax.GradientTransformation, state: SGDState, grads: Params,
                total: jax.Array, mask: jax.Array) -> SGDState:
  """One step of `tx` on `grads`, adding the batch's loss sum `total` and real examples."""
  updates, opt_state = tx.update(grads, state.opt_state, state.w)
  return SGDState(optax.apply_updates(state.w, updates), opt_state,
                  state.loss_sum + total.astype(state.loss_sum.dtype),
                  state.count + jnp.sum(mask, dtype=jnp.int32))


def sgd_steps(key: jax.Array, client: ClientData, work: LocalWork, *, max_examples: int,
              min_examples: int):
  """`Steps` of `work` for one client: its batch plan and one PRNG key per step."""
  k_plan, k_train = jax.random.split(key)
  plan = batch_plan(k_plan, client.num_examples, work, max_examples=max_examples,
                    min_examples=min_examples, client_id=client.id)
  return Steps(plan.idx, plan.mask, jax.random.split(k_train, plan.idx.shape[0]))


def sgd_program(model: Model, tx: optax.GradientTransformation, work: LocalWork, *,
                max_examples: int, min_examples: int = 1,
                prox_mu: float | jax.Array | None = None, anchor: Params | None = None,
                start_from: Callable[[Params, ClientData], Params] | None = None):
  """`work` steps of `tx` as a `LocalProgram` whose carry is an `SGDState`.

  The steps start from `start_from(params, client)` (default the global
  params) and, with `prox_mu`, are pulled towards `anchor` (default the global
  params). `finish` returns the carry's `SGDState` wrapped in no output: callers
  compose it (`fedavg_program`, Ditto, fine-tuning).
  """
  def start(params, client, key):
    w = params if start_from is None else start_from(params, client)
    return sgd_init(tx, w), sgd_steps(key, client, work, max_examples=max_examples,
                                      min_examples=min_examples)

  def step(params, state, batch):
    return sgd_step(model, tx, state, batch.x, batch.y, batch.mask, batch.extra,
                    prox_mu=prox_mu, anchor=params if anchor is None else anchor)

  return LocalProgram(start=start, step=step, finish=lambda params, client, state: state,
                      num_steps=lambda client: work_steps(work, client.num_examples, client.id))


def client_output(model: Model, params: Params, client: ClientData, w: Params,
                  loss_sum: jax.Array, count: jax.Array, num_classes: int, *,
                  client_losses: bool = False, also_finite: Any = ()) -> ClientOutput:
  """The `ClientOutput` of a client whose local model is `w`: Δ = w − params.

  `also_finite`: more of the client's results (personal state) that must be
  finite for the update to count.
  """
  delta = jax.tree.map(jnp.subtract, w, params)
  losses = (full_loss(model, params, client), full_loss(model, w, client)
            ) if client_losses else (None, None)
  return ClientOutput(
      delta=delta, num_examples=client.num_examples,
      train_loss=loss_sum / jnp.maximum(count, 1), num_steps=jnp.zeros((), jnp.int32),
      label_hist=label_histogram(client, num_classes), finite=all_finite((delta, also_finite)),
      loss_before=losses[0], loss_after=losses[1])


def fedavg_program(
    model: Model,
    tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    num_classes: int,
    max_examples: int,
    min_examples: int = 1,
    prox_mu: float | jax.Array | None = None,
    client_losses: bool = False,
):
  """The FedAvg / FedProx client as a `LocalProgram`, written for one client.

  Each step minimises the batch loss plus FedProx's (μ/2)||w − w_t||² (see
  `sgd_step`); the client returns Δ = w − w_t.

  Args:
    model: The model.
    tx: Client optimizer.
    work: Local epochs or steps and the batch size.
    num_classes: Size of the label histogram.
    max_examples: Padded length of the client rows (static).
    min_examples: Smallest client (static; see `batch_plan`).
    prox_mu: FedProx's μ (None: plain FedAvg).
    client_losses: Also report `loss_before` and `loss_after` (see
      `ClientOutput`), for weightings and aggregators that use them.

  Returns:
    The `LocalProgram`.
  """
  sgd = sgd_program(model, tx, work, max_examples=max_examples, min_examples=min_examples,
                    prox_mu=prox_mu)

  def finish(params, client, state):
    return client_output(model, params, client, state.w, state.loss_sum, state.count,
                         num_classes, client_losses=client_losses)

  return sgd._replace(finish=finish)


def local_train(model: Model, tx: optax.GradientTransformation, params: Params,
                client: ClientData, key: jax.Array, work: LocalWork, *, max_examples: int,
                min_examples: int = 1, prox_mu: float | None = None) -> SGDState:
  """`work` steps of `tx` from `params` on one client's rows, as a masked `lax.scan`
  of the longest client's length (differentiable); returns the final `SGDState`."""
  program = sgd_program(model, tx, work, max_examples=max_examples, min_examples=min_examples,
                        prox_mu=prox_mu)
  state, steps = program.start(params, client, key)
  return run_steps(program, params, client, state, steps, program.num_steps(client),
                   differentiable=True)
