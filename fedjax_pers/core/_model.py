"""The `Model` interface: four pure functions over plain parameter pytrees."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

Params = Any
PRNGKey = jax.Array


class BatchStats(NamedTuple):
  """The running statistics of a model with batch normalisation, kept inside its params.

  The statistics are leaves of the params pytree (beside each normalisation
  layer's scale and bias), so that aggregation, personal layers and checkpoints
  treat them as any other leaf; they get no gradient (a training pass normalises
  with the batch's own statistics), and every local step writes their new
  running values back (`core._sgd.sgd_step`).

  Attributes:
    train: `train(params, x, mask, key=None) -> (logits, stats)`: the training
      pass, normalising by the statistics of the batch's real rows (`mask`), and
      the updated running statistics.
    put: `put(params, stats) -> params` with the statistics replaced.
  """

  train: Callable[..., tuple[jax.Array, Any]]
  put: Callable[[Any, Any], Any]


class Model(NamedTuple):
  """A model as pure functions; params are plain pytrees.

  Attributes:
    init: `init(key) -> params`.
    apply: `apply(params, x, key=None, train=False) -> logits` for a batch `x`.
    loss: `loss(logits, y) -> per-example loss`, shape `y.shape`.
    metrics: `metrics(logits, y) -> per-example correctness` (1.0 when the arg-max
      prediction equals the label), shape `y.shape`.
    represent: Optional `represent(params, x, key=None, train=False) -> [batch, r]`:
      the representation the head reads (the penultimate layer's output), for
      representation-level methods (MOON). `from_flax` sets it when the module
      sows it (`self.sow("intermediates", REPRESENTATION, h)`), as `models/` do.
    batch_stats: `BatchStats` of a model with batch normalisation (`from_flax`
      sets it when the module keeps a `batch_stats` collection), else None;
      `apply` then normalises with the running statistics (`train=False`).
  """

  init: Callable[[PRNGKey], Params]
  apply: Callable[..., jax.Array]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metrics: Callable[[jax.Array, jax.Array], jax.Array]
  represent: Callable[..., jax.Array] | None = None
  batch_stats: BatchStats | None = None


# The name under which a flax module sows its representation (`Model.represent`).
REPRESENTATION = "representation"


def softmax_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example cross-entropy of integer labels `y` under `logits[..., C]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example 0/1 correctness of the arg-max prediction."""
  return (jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)


def from_flax(
    module: Any,
    sample_x: Any,
    *,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    metrics: Callable[[jax.Array, jax.Array], jax.Array] = accuracy,
) -> Model:
  """Builds a `Model` from a flax linen module.

  The module's `__call__(x, train=False)` may take a `train` keyword (dropout,
  batch normalisation). A module with a `batch_stats` collection must also take
  `mask` (the batch's real rows, for `nn.BatchNorm(mask=...)`): its statistics
  are merged into the params, next to each layer's parameters (`BatchStats`).
  A `key` passed to `apply` becomes the `dropout` rng.

  Args:
    module: A `flax.linen.Module`.
    sample_x: An example input batch (array or shape-dtype struct) used for `init`.
    loss: Per-example loss `(logits, y) -> [batch]`.
    metrics: Per-example metric `(logits, y) -> [batch]`.

  Returns:
    The `Model`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> m = from_flax(nn.Dense(3), jnp.zeros((1, 4)))
    >>> m.apply(m.init(jax.random.key(0)), jnp.ones((2, 4))).shape
    (2, 3)
  """
  # Only the sample's shape and dtype are kept: building a model touches no device.
  spec = jax.ShapeDtypeStruct(sample_x.shape, sample_x.dtype)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), spec)
  stats = flatten_dict(shapes["batch_stats"]) if "batch_stats" in shapes else {}

  def variables(params):   # the flax collections of params with the statistics inside
    if not stats:
      return {"params": params}
    flat = flatten_dict(params)
    return {"params": unflatten_dict({k: v for k, v in flat.items() if k not in stats}),
            "batch_stats": unflatten_dict({k: flat[k] for k in stats})}

  def put(params, new):
    flat, new = flatten_dict(params), flatten_dict(new)
    return unflatten_dict({k: new[k] if k in stats else v for k, v in flat.items()})

  def init(key):   # (the statistics join their layers' dicts, in the layers' order)
    v = module.init(key, jnp.zeros(spec.shape, spec.dtype))
    return v["params"] if not stats else unflatten_dict(
        {**flatten_dict(v["params"]), **flatten_dict(v["batch_stats"])})

  def call(params, x, key, train, **kwargs):
    rngs = None if key is None else {"dropout": key}
    if _takes_train(module):
      kwargs["train"] = train
    return module.apply(variables(params), x, rngs=rngs, **kwargs)

  def apply(params, x, key=None, train=False):
    if stats and train:   # batch statistics of every row; the round trains by `BatchStats`
      return call(params, x, key, True, mutable=["batch_stats"])[0]
    return call(params, x, key, train)

  def represent(params, x, key=None, train=False):
    mutable = ["intermediates"] + (["batch_stats"] if stats and train else [])
    return call(params, x, key, train, mutable=mutable)[1]["intermediates"][REPRESENTATION][0]

  def train_pass(params, x, mask, key=None):
    logits, new = call(params, x, key, True, mask=mask, mutable=["batch_stats"])
    return logits, new["batch_stats"]

  sows = jax.eval_shape(lambda x: module.apply(
      module.init(jax.random.key(0), x), x, mutable=["intermediates"])[1], spec)
  has = REPRESENTATION in sows.get("intermediates", {})
  return Model(init=init, apply=apply, loss=loss, metrics=metrics,
               represent=represent if has else None,
               batch_stats=BatchStats(train_pass, put) if stats else None)


def _takes_train(module: Any) -> bool:
  try:
    return "train" in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False
