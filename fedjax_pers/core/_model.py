"""The `Model` interface: four pure functions over plain parameter pytrees."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
PRNGKey = jax.Array


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
  """

  init: Callable[[PRNGKey], Params]
  apply: Callable[..., jax.Array]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metrics: Callable[[jax.Array, jax.Array], jax.Array]
  represent: Callable[..., jax.Array] | None = None


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
  batch statistics are not supported: use normalisations without state). A
  `key` passed to `apply` becomes the `dropout` rng.

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
  sample_x = jnp.zeros(sample_x.shape, sample_x.dtype)

  def init(key):
    return module.init(key, sample_x)["params"]

  def apply(params, x, key=None, train=False):
    rngs = None if key is None else {"dropout": key}
    kwargs = {"train": train} if _takes_train(module) else {}
    return module.apply({"params": params}, x, rngs=rngs, **kwargs)

  def represent(params, x, key=None, train=False):
    rngs = None if key is None else {"dropout": key}
    kwargs = {"train": train} if _takes_train(module) else {}
    _, sown = module.apply({"params": params}, x, rngs=rngs, mutable=["intermediates"],
                           **kwargs)
    return sown["intermediates"][REPRESENTATION][0]

  sows = jax.eval_shape(lambda: module.apply(
      module.init(jax.random.key(0), sample_x), sample_x, mutable=["intermediates"])[1])
  has = REPRESENTATION in sows.get("intermediates", {})
  return Model(init=init, apply=apply, loss=loss, metrics=metrics,
               represent=represent if has else None)


def _takes_train(module: Any) -> bool:
  try:
    return "train" in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False
