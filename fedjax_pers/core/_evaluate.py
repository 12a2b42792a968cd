"""Evaluation of a model on every client's data, and the per-client summaries."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model


class ClientEval(NamedTuple):
  """Per-client evaluation, `[num_clients]` each.

  Attributes:
    loss: Mean per-example loss over the client's real examples.
    accuracy: Mean per-example metric (accuracy).
    num_examples: Real examples per client.
  """

  loss: jax.Array
  accuracy: jax.Array
  num_examples: jax.Array


EVAL_BATCH = 1024   # examples a flat evaluation reads at a time


def evaluate(
    model: Model, params: Any, data: FederatedData, *, client_chunk: int | None = None
) -> ClientEval:
  """Loss and accuracy of `params` on every client, padding masked out.

  Every real example is visited once, `EVAL_BATCH` at a time, whatever the
  padding: the cost is `Σ_c n_c`, not `N · max_c n_c`. A padded store reads
  example j of client c at row `(c, j)`, a capped store (`FederatedData.with_cap`)
  at its flat position (ALL of its examples, not the per-round subsets). Data
  built by hand without `host_sizes` (whose total is then unknown at trace time)
  are evaluated over their padded rows, by `lax.map` in chunks of `client_chunk`
  clients (default all at once).
  Jittable; `data` is an argument, so one compilation serves every round.
  """
  if data.window is not None:
    raise ValueError("evaluate: data is one round's gathered cohort (window set); evaluate "
                     "a host store with fedjax_pers.data.evaluate_store.")
  if data.cap is None and data.sizes is None:
    return _evaluate_rows(model, params, data, client_chunk)
  n = data.num_examples
  total = data.y.shape[0] if data.cap is not None else int(data.sizes.sum())
  owner = jnp.repeat(jnp.arange(data.num_clients), n, total_repeat_length=total)
  if data.cap is None:
    starts = jnp.cumsum(n) - n
    row = lambda j, c: (data.x[c, j - starts[c]], data.y[c, j - starts[c]])
  else:
    row = lambda j, c: (data.x[j], data.y[j])

  def one(args):
    x, y = row(*args)
    logits = model.apply(params, x[None])
    return model.loss(logits, y[None])[0], model.metrics(logits, y[None])[0]

  loss, hits = jax.lax.map(one, (jnp.arange(total), owner),
                           batch_size=min(EVAL_BATCH, total))
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  per = lambda v: jax.ops.segment_sum(v, owner, num_segments=data.num_clients) / denom
  return ClientEval(loss=per(loss), accuracy=per(hits), num_examples=n)


def _evaluate_rows(model: Model, params: Any, data: FederatedData,
                   client_chunk: int | None) -> ClientEval:
  """`evaluate` over every padded row of a padded store (sizes unknown on the host)."""

  def one(args):
    x, y, n = args
    logits = model.apply(params, x)
    valid = jnp.arange(y.shape[0]) < n
    loss = jnp.sum(jnp.where(valid, model.loss(logits, y), 0.0))
    hits = jnp.sum(jnp.where(valid, model.metrics(logits, y), 0.0))
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    return loss / denom, hits / denom

  chunk = client_chunk or data.num_clients
  loss, acc = jax.lax.map(one, (data.x, data.y, data.num_examples), batch_size=chunk)
  return ClientEval(loss=loss, accuracy=acc, num_examples=data.num_examples)


def worst_fraction_mean(values: np.ndarray, fraction: float = 0.1) -> float:
  """Mean of the lowest `ceil(fraction · N)` values (at least one)."""
  values = np.sort(np.asarray(values, np.float64))
  k = max(1, math.ceil(fraction * len(values)))
  return float(values[:k].mean())


def summarize(ev: ClientEval, prefix: str = "test") -> dict[str, Any]:
  """Aggregates of a `ClientEval` as plain Python numbers.

  Returns keys `{prefix}_accuracy` and `{prefix}_loss` (example-weighted over all
  clients), `mean_client_{prefix}_accuracy`, `worst10_client_{prefix}_accuracy`
  (mean of the lowest 10% of clients), `variance_client_{prefix}_accuracy`
  (variance over clients, as q-FFL reports fairness) and
  `per_client_{prefix}_accuracy`.
  """
  n = np.asarray(ev.num_examples, np.float64)
  acc = np.asarray(ev.accuracy, np.float64)
  loss = np.asarray(ev.loss, np.float64)
  return {
      f"{prefix}_accuracy": float(np.sum(n * acc) / np.sum(n)),
      f"{prefix}_loss": float(np.sum(n * loss) / np.sum(n)),
      f"mean_client_{prefix}_accuracy": float(acc.mean()),
      f"worst10_client_{prefix}_accuracy": worst_fraction_mean(acc, 0.1),
      f"variance_client_{prefix}_accuracy": float(acc.var()),
      f"per_client_{prefix}_accuracy": [round(float(a), 6) for a in acc],
  }
