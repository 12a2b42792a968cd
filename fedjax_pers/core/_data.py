"""`FederatedData`: every client's examples, stacked and padded, on device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Examples of all clients, padded to a common length.

  Row `c` of `x`/`y` holds client `c`'s examples in its first `num_examples[c]`
  slots; the remaining slots are padding, which every computation masks out.
  Build one with `FederatedData.from_clients`, which validates its input.

  Attributes:
    x: Features, `[num_clients, max_examples, *feature_shape]`.
    y: Integer labels, `[num_clients, max_examples]`.
    num_examples: `[num_clients]` int32, the number of real examples per client.
    num_classes: Number of label classes (static).
    min_examples: `min(num_examples)` (static; bounds how many epochs a fixed
      number of local steps can touch).
  """

  x: jax.Array
  y: jax.Array
  num_examples: jax.Array
  num_classes: int = dataclasses.field(metadata=dict(static=True))
  min_examples: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_clients(self) -> int:
    return self.x.shape[0]

  @property
  def max_examples(self) -> int:
    return self.x.shape[1]

  @property
  def padding_fraction(self) -> float:
    """Fraction of the stored example slots that are padding."""
    total = self.num_clients * self.max_examples
    return 1.0 - float(np.sum(np.asarray(self.num_examples))) / total

  def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `c`'s real examples as NumPy arrays `(x, y)` (padding removed)."""
    n = int(self.num_examples[c])
    return np.asarray(self.x[c, :n]), np.asarray(self.y[c, :n])

  @classmethod
  def from_clients(
      cls,
      xs: Sequence[np.ndarray],
      ys: Sequence[np.ndarray],
      *,
      num_classes: int | None = None,
      max_examples: int | None = None,
      dtype=jnp.float32,
  ) -> FederatedData:
    """Stacks per-client arrays into padded device arrays, checking them first.

    Args:
      xs: One feature array per client, `[n_c, *feature_shape]`, the same
        feature shape for all.
      ys: One integer label array per client, `[n_c]`.
      num_classes: Labels must lie in `[0, num_classes)`; default `max(y) + 1`.
      max_examples: Pad every client to this many slots (default: the largest
        client). Must be at least the largest client.
      dtype: Floating dtype of the stored features.

    Returns:
      The `FederatedData`.

    Raises:
      ValueError: On mismatched lengths, empty clients, non-integer labels or
        labels outside `[0, num_classes)`, non-finite features, or mismatched
        feature shapes, naming the client and what was expected.
    """
    xs = [np.asarray(x) for x in xs]
    ys = [np.asarray(y) for y in ys]
    if len(xs) != len(ys):
      raise ValueError(
          f"xs and ys must have one entry per client; got len(xs)={len(xs)} and "
          f"len(ys)={len(ys)}.")
    if not xs:
      raise ValueError("xs must hold at least one client; got an empty sequence.")
    feature_shape = xs[0].shape[1:]
    for c, (x, y) in enumerate(zip(xs, ys)):
      if x.ndim < 1 or y.ndim != 1:
        raise ValueError(
            f"Client {c}: expected x of shape [n, ...] and y of shape [n]; got "
            f"x.shape={x.shape}, y.shape={y.shape}.")
      if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Client {c}: x and y must have the same number of examples; got "
            f"x.shape[0]={x.shape[0]} and y.shape[0]={y.shape[0]}.")
      if x.shape[0] == 0:
        raise ValueError(
            f"Client {c} has zero examples; every client needs at least one "
            "(drop empty clients before building FederatedData).")
      if x.shape[1:] != feature_shape:
        raise ValueError(
            f"Client {c}: feature shape {x.shape[1:]} differs from client 0's "
            f"{feature_shape}; all clients must share one feature shape.")
      if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"Client {c}: labels y must be integers; got dtype {y.dtype}.")
      if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ValueError(
            f"Client {c}: x holds {bad} non-finite values (NaN or Inf); features "
            "must be finite.")
    y_max = max(int(y.max()) for y in ys)
    y_min = min(int(y.min()) for y in ys)
    if num_classes is None:
      num_classes = y_max + 1
    if num_classes < 1:
      raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    if y_min < 0 or y_max >= num_classes:
      c = next(i for i, y in enumerate(ys) if y.min() < 0 or y.max() >= num_classes)
      raise ValueError(
          f"Client {c}: labels must lie in [0, num_classes) = [0, {num_classes}); "
          f"got values in [{int(ys[c].min())}, {int(ys[c].max())}].")
    sizes = np.array([len(y) for y in ys], np.int32)
    longest = int(sizes.max())
    if max_examples is None:
      max_examples = longest
    if max_examples < longest:
      raise ValueError(
          f"max_examples={max_examples} is smaller than the largest client "
          f"({longest} examples); it must be at least that.")
    x_pad = np.zeros((len(xs), max_examples, *feature_shape), dtype)
    y_pad = np.zeros((len(ys), max_examples), np.int32)
    for c, (x, y) in enumerate(zip(xs, ys)):
      x_pad[c, : len(x)] = x
      y_pad[c, : len(y)] = y
    return cls(
        x=jnp.asarray(x_pad), y=jnp.asarray(y_pad), num_examples=jnp.asarray(sizes),
        num_classes=int(num_classes), min_examples=int(sizes.min()))


jax.tree_util.register_dataclass(FederatedData)
