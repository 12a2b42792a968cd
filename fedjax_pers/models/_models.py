"""Small flax models behind the `Model` interface."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_pers.core._model import REPRESENTATION, Model, from_flax


class _MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    self.sow("intermediates", REPRESENTATION, x)
    return nn.Dense(self.num_classes)(x)


class _CNN(nn.Module):
  """Two conv + max-pool blocks and two dense layers (the FedAvg paper's CNN, smaller)."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: int = 512

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    for f in self.features:
      x = nn.relu(nn.Conv(f, (5, 5), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    self.sow("intermediates", REPRESENTATION, x)
    return nn.Dense(self.num_classes)(x)


def _check(name: str, feature_shape, num_classes: int) -> None:
  if num_classes < 2:
    raise ValueError(f"{name}: num_classes must be >= 2; got {num_classes}.")
  if not feature_shape or any(int(d) < 1 for d in feature_shape):
    raise ValueError(f"{name}: feature_shape must be non-empty positive dims; got "
                     f"{tuple(feature_shape)}.")


def logistic_regression(feature_shape: Sequence[int], num_classes: int) -> Model:
  """Multinomial logistic regression: `logits = x W + b` on flattened features."""
  _check("logistic_regression", feature_shape, num_classes)
  return from_flax(_MLP((), num_classes), jax.ShapeDtypeStruct((1, *feature_shape), jnp.float32))


class _CNNBN(nn.Module):
  """`_CNN` with batch normalisation after each convolution (FedBN's models)."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: int = 512

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    if x.ndim == 3:
      x = x[..., None]
    m = None if mask is None else mask.reshape((-1, 1, 1, 1))   # the batch's real rows
    for f in self.features:
      x = nn.Conv(f, (5, 5), padding="SAME")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x, mask=m))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    self.sow("intermediates", REPRESENTATION, x)
    return nn.Dense(self.num_classes)(x)


def mlp(feature_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)
        ) -> Model:
  """A ReLU multilayer perceptron on flattened features."""
  _check("mlp", feature_shape, num_classes)
  if any(int(h) < 1 for h in hidden):
    raise ValueError(f"mlp: hidden widths must be positive; got {tuple(hidden)}.")
  return from_flax(_MLP(tuple(hidden), num_classes),
                   jax.ShapeDtypeStruct((1, *feature_shape), jnp.float32))


def cnn(feature_shape: Sequence[int], num_classes: int, features: Sequence[int] = (32, 64),
        dense: int = 512) -> Model:
  """A small CNN for `[H, W]` or `[H, W, C]` images."""
  _check("cnn", feature_shape, num_classes)
  if len(feature_shape) not in (2, 3):
    raise ValueError(f"cnn: feature_shape must be [H, W] or [H, W, C]; got "
                     f"{tuple(feature_shape)}.")
  return from_flax(_CNN(num_classes, tuple(features), dense),
                   jax.ShapeDtypeStruct((1, *feature_shape), jnp.float32))


def cnn_bn(feature_shape: Sequence[int], num_classes: int, features: Sequence[int] = (32, 64),
           dense: int = 512) -> Model:
  """`cnn` with batch normalisation after each convolution; its running statistics live
  in the params (`Model.batch_stats`), next to each `BatchNorm_i`'s scale and bias."""
  _check("cnn_bn", feature_shape, num_classes)
  if len(feature_shape) not in (2, 3):
    raise ValueError(f"cnn_bn: feature_shape must be [H, W] or [H, W, C]; got "
                     f"{tuple(feature_shape)}.")
  return from_flax(_CNNBN(num_classes, tuple(features), dense),
                   jax.ShapeDtypeStruct((1, *feature_shape), jnp.float32))
