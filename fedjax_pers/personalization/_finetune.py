"""Fine-tuning: every client adapts the global model on its own train split.

The baseline every personalization method is measured against, and the
evaluation protocol for any global model: client c runs K optimizer steps from
w on its train split and is evaluated on its test split, for all clients at
once inside one jitted function. Both run on the round's engine
(`core/_cohort.py`): fine-tuning as a local SGD program, the evaluation of each
client's own model as a program that reads its test rows a block at a time, so
that evaluating costs the clients' `Σ_c ⌈n_c / b⌉` blocks, not `N` times the
longest client.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.core._batching import LocalWork, check_local_work, width_classes
from fedjax_pers.core._client import ClientData
from fedjax_pers.core._cohort import CohortSource, execute_cohort, pad_cohort
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._evaluate import ClientEval, evaluate, worst_fraction_mean
from fedjax_pers.core._execution import Execution, as_execution, plan
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, Steps, capped
from fedjax_pers.core._round import population_counts
from fedjax_pers.core._sgd import local_train, sgd_program
from fedjax_pers.core._source import cohort_source

Params = Any


def finetune(model: Model, tx: optax.GradientTransformation, params: Params,
             client: ClientData, key: jax.Array, work: LocalWork, *, max_examples: int,
             min_examples: int = 1) -> Params:
  """`work` steps (or epochs) of `tx` from `params` on one client's data.

  Args:
    model: The model.
    tx: Fine-tuning optimizer.
    params: Starting point (the global model).
    client: The client's padded train data.
    key: PRNG key (batches, dropout).
    work: Local work; `LocalWork(b, steps=0)` is not allowed, so K = 0 is
      expressed by not calling this function (see `personalize`).
    max_examples: Padded length of the client rows (static).
    min_examples: Smallest client (static).

  Returns:
    The client's fine-tuned parameters.
  """
  return local_train(model, tx, params, client, key, work, max_examples=max_examples,
                     min_examples=min_examples).w


class EvalSums(NamedTuple):
  """A client's own model and its running loss and metric sums over its rows."""

  params: Params
  loss_sum: jax.Array
  hits: jax.Array


def eval_block(sizes: np.ndarray | None) -> int:
  """Rows an evaluation step reads: a power of two near a quarter of the mean
  client, in [16, 256] (few wasted rows per client, few steps)."""
  mean = 64.0 if sizes is None or not len(sizes) else float(np.mean(sizes))
  return int(np.clip(2 ** round(np.log2(max(mean / 4, 1.0))), 16, 256))


def eval_program(model: Model, max_examples: int, block: int) -> LocalProgram:
  """Evaluation of each client's own model (`client.state`) on its rows, `block` at a time.

  Step j reads rows `[j b, (j + 1) b)`; a client takes `⌈n / b⌉` steps; `finish`
  returns its `(mean loss, mean metric)` over its `n` real rows.
  """
  total = -(-max_examples // block)

  def start(params, client, key):
    del params, key
    pos = jnp.arange(total)[:, None] * block + jnp.arange(block)[None, :]
    mask = pos < client.num_examples
    rows = jax.ShapeDtypeStruct((1,) + client.x.shape[1:], client.x.dtype)
    labels = jax.ShapeDtypeStruct((1,), client.y.dtype)
    dtype = jax.eval_shape(lambda x, y: model.loss(model.apply(client.state, x), y), rows,
                           labels).dtype
    zero = jnp.zeros((), dtype)
    return (EvalSums(client.state, zero, zero),
            Steps(jnp.minimum(pos, max_examples - 1), mask))

  def step(params, c, batch):
    del params
    logits = model.apply(c.params, batch.x)
    keep = lambda v: jnp.sum(jnp.where(batch.mask, v, 0.0)).astype(c.loss_sum.dtype)
    return EvalSums(c.params, c.loss_sum + keep(model.loss(logits, batch.y)),
                    c.hits + keep(model.metrics(logits, batch.y)))

  def finish(params, client, c):
    denom = jnp.maximum(client.num_examples, 1).astype(jnp.float32)
    return c.loss_sum / denom, c.hits / denom

  def num_steps(client):
    return (client.num_examples + block - 1) // block

  return LocalProgram(start, step, finish, num_steps)


def _run_all(program: LocalProgram, params: Params, data: FederatedData, source: CohortSource,
             key: jax.Array, execution: Execution, *, shuffles: bool):
  """`program` on every client of `data` (one cohort of all of them); stacked outputs.
  `shuffles`: the program's plans shuffle the clients' examples (see `Plan`)."""
  execution = as_execution(execution)
  ids, valid = pad_cohort(jnp.arange(data.num_clients, dtype=jnp.int32), execution.num_devices)
  classes = len(width_classes(data.max_examples, data.min_examples)) if shuffles else 1
  how = plan(execution, params, population_counts(program, data), ids.shape[0],
             size_classes=classes)
  result = execute_cohort(program, params, source, ids, valid, key, plan=how,
                          mesh=execution.mesh)
  return jax.tree.map(lambda a: a[:data.num_clients], result.outputs)


def _evaluate_own(model: Model, own: Params, params: Params, test: FederatedData,
                  execution: Execution | None) -> ClientEval:
  """Each client's own model (stacked over clients) on its test rows."""
  block = eval_block(test.sizes)
  program = eval_program(model, test.max_examples, block)
  source = cohort_source(test, own, jax.random.key(0),
                         whole=as_execution(execution).mesh is None)
  loss, acc = _run_all(program, params, test, source, jax.random.key(0), execution,
                       shuffles=False)
  return ClientEval(loss, acc, test.num_examples)


class PersonalizedEval(NamedTuple):
  """Per-client test results of the global and of the personalized models.

  Attributes:
    global_: `ClientEval` of the global model on each client's test split.
    personal: `ClientEval` of each client's personalized model.
  """

  global_: ClientEval
  personal: ClientEval


def _check_padded(data: FederatedData, name: str) -> None:
  if data.cap is not None:
    raise ValueError(f"{name} is a capped flat store (example_cap={data.cap}); personalized "
                     "evaluation tests every example of padded client rows: build it "
                     "without a cap.")


def personalize(model: Model, tx: optax.GradientTransformation, params: Params,
                train: FederatedData, test: FederatedData, key: jax.Array,
                work: LocalWork | None, *, execution: Execution | None = None,
                starts: Params | None = None) -> PersonalizedEval:
  """Fine-tunes the global model on every client's train split, evaluates on its test split.

  Client c's key is `fold_in(key, c)`. Fine-tuning and the evaluation of the
  fine-tuned models run on the round's engine by `execution` (default
  `Execution()`: `auto`), the global model is evaluated by `evaluate`. Jittable.

  A capped `train` store (`FederatedData.with_cap`) is read as training reads
  it: a client larger than the cap fine-tunes on a fresh stratified sample of
  `cap` of its examples (`train.cohort`, key `fold_in(fold_in(key, c), 1)`);
  `test` must hold padded rows, so that every test example is evaluated.

  Args:
    model: The model.
    tx: Fine-tuning optimizer.
    params: The global model.
    train: Clients' train splits (fine-tuning data), padded or capped.
    test: The same clients' test splits.
    key: PRNG key.
    work: Fine-tuning work, or None for K = 0 (the personalized model is the
      global one).
    execution: How the clients run (strategy, lanes, chunks, mesh).
    starts: Optional per-client starting points stacked over the clients (an
      algorithm's own adaptation: IFCA's chosen cluster models), fine-tuned
      instead of `params`, which stays the global model tested beside them.

  Returns:
    A `PersonalizedEval`.
  """
  if train.num_clients != test.num_clients:
    raise ValueError(f"train and test must hold the same clients; got {train.num_clients} "
                     f"and {test.num_clients}.")
  _check_padded(test, "test")
  glob = evaluate(model, params, test)
  if work is None:
    return PersonalizedEval(glob, glob if starts is None else _evaluate_own(
        model, starts, params, test, execution))
  check_local_work(work, train.num_clients)
  program = sgd_program(model, tx, work, max_examples=train.max_examples,
                        min_examples=train.min_examples,
                        start_from=None if starts is None else lambda p, client: client.state)
  program = program._replace(finish=lambda params, client, state: state.w)
  if train.cap is None:
    source = cohort_source(train, starts, key, whole=as_execution(execution).mesh is None)
  else:
    program = capped(program, train.cap)

    def rows(ids):
      one = lambda c: train.cohort(c[None], jax.random.fold_in(jax.random.fold_in(key, c), 1))
      x, y, n = jax.vmap(one)(ids)
      own = None if starts is None else jax.tree.map(lambda a: a[ids], starts)
      return ClientData(x[:, 0], y[:, 0], n[:, 0], own, ids)

    source = CohortSource(rows, train.num_examples, None, lambda ids: rows(ids),
                          lambda table, client, idx: (client.x[idx], client.y[idx]))
  tuned = _run_all(program, params, train, source, key, execution, shuffles=True)
  return PersonalizedEval(glob, _evaluate_own(model, tuned, params, test, execution))


def evaluate_personal(model: Model, personal: Params, params: Params, test: FederatedData,
                      *, execution: Execution | None = None) -> PersonalizedEval:
  """Each client's own model (stacked over clients) and the global model on its test split.

  Args:
    model: The model.
    personal: Per-client parameters, leading axis `num_clients` (Ditto's v_k, ...).
    params: The global model.
    test: The clients' test splits.
    execution: How the clients' evaluations run (default `Execution()`).

  Returns:
    A `PersonalizedEval`.
  """
  _check_padded(test, "test")
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(personal)}
  if sizes != {test.num_clients}:
    raise ValueError(f"personal params must be stacked over the {test.num_clients} clients; "
                     f"got leading sizes {sorted(sizes)}.")
  return PersonalizedEval(evaluate(model, params, test),
                          _evaluate_own(model, personal, params, test, execution))


def summarize_personalization(ev: PersonalizedEval, prefix: str = "test") -> dict[str, Any]:
  """The personalization figures of a `PersonalizedEval`, as plain Python numbers.

  Returns keys `personalized_{prefix}_accuracy` (example-weighted),
  `mean_client_personalized_accuracy`, `worst10_client_personalized_accuracy`,
  `fraction_clients_improved` (personalized accuracy strictly above the global
  model's), `mean_client_gain` (mean over clients of the accuracy difference),
  `per_client_personalized_accuracy` and `per_client_gain`.
  """
  n = np.asarray(ev.personal.num_examples, np.float64)
  pers = np.asarray(ev.personal.accuracy, np.float64)
  gain = pers - np.asarray(ev.global_.accuracy, np.float64)
  return {
      f"personalized_{prefix}_accuracy": float(np.sum(n * pers) / np.sum(n)),
      f"personalized_{prefix}_loss": float(np.sum(n * np.asarray(ev.personal.loss)) / np.sum(n)),
      "mean_client_personalized_accuracy": float(pers.mean()),
      "worst10_client_personalized_accuracy": worst_fraction_mean(pers, 0.1),
      "fraction_clients_improved": float(np.mean(gain > 0)),
      "mean_client_gain": float(gain.mean()),
      "per_client_personalized_accuracy": [round(float(a), 6) for a in pers],
      "per_client_gain": [round(float(g), 6) for g in gain],
  }
