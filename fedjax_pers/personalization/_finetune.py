"""Fine-tuning: every client adapts the global model on its own train split.

The baseline every personalization method is measured against, and the
evaluation protocol for any global model: client c runs K optimizer steps from
w on its train split and is evaluated on its test split, for all clients at
once inside one jitted function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import ClientData, local_train
from fedjax_pers.core._cohort import resolve_strategy
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._evaluate import ClientEval, worst_fraction_mean
from fedjax_pers.core._model import Model

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
  k_plan, k_train = jax.random.split(key)
  plan = batch_plan(k_plan, client.num_examples, work, max_examples=max_examples,
                    min_examples=min_examples)
  w, *_ = local_train(model, tx, params, client, plan, k_train,
                      guard_empty_steps=work.epochs is not None)
  return w


EVAL_BLOCK = 128   # rows a client's evaluation reads at a time


def _client_eval(model, params, x, y, n, blockwise=False):
  """Mean loss and accuracy of `params` on the first `n` of the rows `x, y`.

  `blockwise` (for clients run one at a time): rows are read in blocks of
  `EVAL_BLOCK` until the client's `n` are covered, so a client does not pay for
  its padding (Shakespeare's test split, 82% padding: 3x faster). Vmapped over
  many clients such a loop would run to the longest client's length in turn, so
  there all rows are evaluated at once.
  """
  m = y.shape[0]
  if not blockwise or m <= EVAL_BLOCK:
    logits = model.apply(params, x)
    valid = jnp.arange(m) < n
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(valid, model.loss(logits, y), 0.0)) / denom
    return loss, jnp.sum(jnp.where(valid, model.metrics(logits, y), 0.0)) / denom
  blocks = -(-m // EVAL_BLOCK)
  pad = blocks * EVAL_BLOCK - m
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  y = jnp.pad(y, [(0, pad)])
  size = EVAL_BLOCK

  def body(carry):
    i, loss_sum, acc_sum = carry
    xb = jax.lax.dynamic_slice_in_dim(x, i * size, size)
    yb = jax.lax.dynamic_slice_in_dim(y, i * size, size)
    logits = model.apply(params, xb)
    valid = i * size + jnp.arange(size) < n
    return (i + 1, loss_sum + jnp.sum(jnp.where(valid, model.loss(logits, yb), 0.0)),
            acc_sum + jnp.sum(jnp.where(valid, model.metrics(logits, yb), 0.0)))

  dtype = jax.eval_shape(lambda: model.loss(model.apply(params, x[:size]), y[:size])).dtype
  zero = jnp.zeros((), dtype)
  _, loss_sum, acc_sum = jax.lax.while_loop(lambda c: c[0] * size < n, body,
                                            (jnp.zeros((), jnp.int32), zero, zero))
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  return loss_sum / denom, acc_sum / denom


def default_chunk(params: Params, num_clients: int) -> int:
  """Clients evaluated together by default: all of them (`vmap`), or one at a time
  where the engine's `auto` strategy runs clients in turn (large models on CPU)."""
  return 1 if resolve_strategy("auto", params) == "scan" else num_clients


def _check_padded(data: FederatedData, name: str) -> None:
  if data.cap is not None:
    raise ValueError(f"{name} is a capped flat store (example_cap={data.cap}); personalized "
                     "evaluation tests every example of padded client rows: build it "
                     "without a cap.")


class PersonalizedEval(NamedTuple):
  """Per-client test results of the global and of the personalized models.

  Attributes:
    global_: `ClientEval` of the global model on each client's test split.
    personal: `ClientEval` of each client's personalized model.
  """

  global_: ClientEval
  personal: ClientEval


def personalize(model: Model, tx: optax.GradientTransformation, params: Params,
                train: FederatedData, test: FederatedData, key: jax.Array,
                work: LocalWork | None, *, client_chunk: int | None = None
                ) -> PersonalizedEval:
  """Fine-tunes the global model on every client's train split, evaluates on its test split.

  Client c's key is `fold_in(key, c)`. Clients run in chunks of
  `client_chunk` by `lax.map` (vmapped inside a chunk; default `default_chunk`:
  all at once, or one at a time for large models on CPU), which bounds the
  fine-tuned copies held at a time. Jittable.

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
    client_chunk: Clients per chunk.

  Returns:
    A `PersonalizedEval`.
  """
  if train.num_clients != test.num_clients:
    raise ValueError(f"train and test must hold the same clients; got {train.num_clients} "
                     f"and {test.num_clients}.")
  _check_padded(test, "test")
  if work is not None:
    check_local_work(work)
  chunk = client_chunk or default_chunk(params, train.num_clients)

  def train_rows(c, key_c):
    if train.cap is None:
      return ClientData(train.x[c], train.y[c], train.num_examples[c])
    x, y, n = train.cohort(c[None], jax.random.fold_in(key_c, 1))
    return ClientData(x[0], y[0], jnp.minimum(n[0], train.cap))

  def one(args):
    c, tx_, ty, tn = args
    g = _client_eval(model, params, tx_, ty, tn, chunk == 1)
    if work is None:
      return g, g
    key_c = jax.random.fold_in(key, c)
    w = finetune(model, tx, params, train_rows(c, key_c), key_c, work,
                 max_examples=train.max_examples, min_examples=train.min_examples)
    return g, _client_eval(model, w, tx_, ty, tn, chunk == 1)

  ids = jnp.arange(train.num_clients)
  (gl, ga), (pl, pa) = jax.lax.map(one, (ids, test.x, test.y, test.num_examples),
                                   batch_size=chunk)
  n = test.num_examples
  return PersonalizedEval(ClientEval(gl, ga, n), ClientEval(pl, pa, n))


def evaluate_personal(model: Model, personal: Params, params: Params, test: FederatedData,
                      *, client_chunk: int | None = None) -> PersonalizedEval:
  """Each client's own model (stacked over clients) and the global model on its test split.

  Args:
    model: The model.
    personal: Per-client parameters, leading axis `num_clients` (Ditto's v_k, ...).
    params: The global model.
    test: The clients' test splits.
    client_chunk: Clients per chunk (default `default_chunk`).

  Returns:
    A `PersonalizedEval`.
  """
  _check_padded(test, "test")
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(personal)}
  if sizes != {test.num_clients}:
    raise ValueError(f"personal params must be stacked over the {test.num_clients} clients; "
                     f"got leading sizes {sorted(sizes)}.")
  chunk = client_chunk or default_chunk(params, test.num_clients)

  def one(args):
    v, x, y, n = args
    return (_client_eval(model, params, x, y, n, chunk == 1),
            _client_eval(model, v, x, y, n, chunk == 1))

  (gl, ga), (pl, pa) = jax.lax.map(one, (personal, test.x, test.y, test.num_examples),
                                   batch_size=chunk)
  n = test.num_examples
  return PersonalizedEval(ClientEval(gl, ga, n), ClientEval(pl, pa, n))


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
