"""`FederatedData`: every client's examples, stacked and padded, on device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class HostSizes:
  """Every client's number of examples as a read-only host NumPy array.

  Kept as static metadata of `FederatedData`, so the engine can plan a round
  (lanes, balance across devices, flat evaluation) at trace time. Compared and
  hashed by identity: a jitted function sees the same object every round and
  never hashes the array.
  """

  def __init__(self, sizes):
    self.array = np.array(sizes, np.int64)
    self.array.setflags(write=False)

  def __repr__(self) -> str:
    return f"HostSizes(num_clients={self.array.size}, total={int(self.array.sum())})"


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Examples of all clients, padded to a common length, or capped in a flat store.

  Padded (the default): row `c` of `x`/`y` holds client `c`'s examples in its
  first `num_examples[c]` slots; the remaining slots are padding, which every
  computation masks out. Build one with `FederatedData.from_clients`, which
  validates its input.

  Capped (`cap` set, see `with_cap`): `x`/`y` hold every client's examples one
  after the other (client `c` at `offsets[c] : offsets[c] + num_examples[c]`,
  shuffled once when built), with no padding. Each round, `cohort` gives every
  sampled client a fresh random subset of `min(n_c, cap)` of its examples,
  padded to `cap` slots, while aggregation weights keep the true `n_c`.

  Attributes:
    x: Features, `[num_clients, max_examples, *feature_shape]` (capped:
      `[total, *feature_shape]`).
    y: Integer labels, `[num_clients, max_examples]` (capped: `[total]`).
    num_examples: `[num_clients]` int32, the number of real examples per client.
    num_classes: Number of label classes (static).
    min_examples: `min(num_examples)` (static; bounds how many epochs a fixed
      number of local steps can touch); capped: `min(min(num_examples), cap)`.
    offsets: Capped only: `[num_clients]` int32, where each client starts in `x`.
    cap: Capped only: examples a client trains on per round (static).
    host_sizes: `num_examples` on the host (static; see `HostSizes`), or None
      where the data were built by hand (the engine then plans without them).
    window: One round's cohort gathered from a host store (`data.HostStore`):
      `[k]` int32 ids of the clients whose rows `x` `[k, max_examples, ...]` and
      `y` hold, in the order the round's key samples them; `num_examples` stays
      `[num_clients]`. The round trains exactly these clients. None: `x`/`y`
      hold every client.
    deal: With `window`, over a mesh: `[k_pad]` int32, the permutation of the
      padded cohort (`window` padded to a multiple of the devices, as the round
      pads it) its devices run, `k_pad / d` each; `x`/`y` then hold
      `[k_pad, max_examples, ...]` rows in that order, split over the mesh's
      `clients` axis, so each process gathers only its devices' clients
      (`data.CohortFeed(mesh=...)`; `FederatedAlgorithm.deal` gives it).
  """

  x: jax.Array
  y: jax.Array
  num_examples: jax.Array
  num_classes: int = dataclasses.field(metadata=dict(static=True))
  min_examples: int = dataclasses.field(metadata=dict(static=True))
  offsets: jax.Array | None = None
  cap: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  host_sizes: HostSizes | None = dataclasses.field(default=None, metadata=dict(static=True))
  window: jax.Array | None = None
  deal: jax.Array | None = None

  @property
  def sizes(self) -> np.ndarray | None:
    """Every client's number of examples as a host array, or None if unknown."""
    return None if self.host_sizes is None else self.host_sizes.array

  @property
  def num_clients(self) -> int:
    return self.num_examples.shape[0]

  @property
  def max_examples(self) -> int:
    """Slots of a client's rows in a round: the padded length, or the cap."""
    return self.x.shape[1] if self.cap is None else self.cap

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[2:] if self.cap is None else self.x.shape[1:])

  @property
  def padding_fraction(self) -> float:
    """Fraction of the stored example slots that are padding (0 for a capped store)."""
    total = int(np.prod(self.y.shape))
    return 1.0 - float(np.sum(np.asarray(self.num_examples))) / total

  @property
  def stored_bytes(self) -> int:
    """Bytes of the stored arrays (features, labels, sizes, offsets)."""
    return int(sum(a.nbytes for a in jax.tree.leaves(self)))

  def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `c`'s real examples as NumPy arrays `(x, y)` (padding removed)."""
    if self.window is not None:
      raise ValueError("FederatedData.client: this is one round's gathered cohort (window "
                       "set); read clients from its HostStore.")
    n = int(self.num_examples[c])
    if self.cap is not None:
      start = int(self.offsets[c])
      return np.asarray(self.x[start:start + n]), np.asarray(self.y[start:start + n])
    return np.asarray(self.x[c, :n]), np.asarray(self.y[c, :n])

  def cohort(self, idx: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rows of clients `idx` for a round: `(x [k, M, ...], y [k, M], n [k])`.

    Padded data: the clients' rows as stored (`key` unused), `M = max_examples`.

    Capped data (`M = cap`): client c with n_c > cap gets a stratified random
    sample of `cap` of its (shuffled once) examples: the circle of its n_c
    examples, rotated by r_c uniform in [0, n_c), is cut into `cap` strata
    `[⌊j n_c / cap⌋, ⌊(j+1) n_c / cap⌋)` and one example is drawn uniformly from
    each, all from `fold_in(key, c)`. The examples are distinct, each is included
    with probability exactly cap / n_c, the subset changes every round and every
    example is reached; the cost is O(cap) per client. Clients with n_c ≤ cap get
    all their examples, padded. `n` is the TRUE n_c (local training sees
    min(n_c, cap): `core._program.capped`).
    """
    if self.cap is None:
      return self.x[idx], self.y[idx], self.num_examples[idx]
    rows = self.cohort_positions(idx, key)
    return self.x[rows], self.y[rows], self.num_examples[idx]

  def cohort_positions(self, idx: jax.Array, key: jax.Array) -> jax.Array:
    """Capped data: `[k, cap]` positions in the flat store of the rows `cohort` gives
    clients `idx` (padding slots point at position 0 of the client, masked out)."""
    cap = self.cap
    n = self.num_examples[idx]
    m = jnp.minimum(n, cap)

    def positions(key, n, m):
      k_rot, k_pick = jax.random.split(key)
      j = jnp.arange(cap + 1)
      q, rem = n // m, n % m
      edge = j * q + (j * rem) // m            # ⌊j n / m⌋ without int32 overflow
      width = jnp.maximum(edge[1:] - edge[:-1], 1)
      pick = jax.random.randint(k_pick, (cap,), 0, width)
      rot = jax.random.randint(k_rot, (), 0, jnp.maximum(n, 1))
      pos = jnp.where(n > cap, (rot + edge[:-1] + pick) % n, j[:-1])
      return jnp.where(j[:-1] < m, pos, 0)

    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
    return self.offsets[idx][:, None] + jax.vmap(positions)(keys, n, m)

  def with_cap(self, cap: int, *, seed: int = 0) -> FederatedData:
    """The same clients in a capped flat store (see the class docstring).

    Args:
      cap: Examples a client trains on per round; clients larger than it train on
        a fresh random subset of `cap` of their examples every round.
      seed: Seed of the one-time shuffle of each client's examples.

    Returns:
      Capped `FederatedData`; `self` unchanged when `cap` is at least the largest
      client (nothing to cap).
    """
    if not (isinstance(cap, (int, np.integer)) and not isinstance(cap, bool) and cap >= 1):
      raise ValueError(f"cap must be an int >= 1; got {cap!r}.")
    sizes = np.asarray(self.num_examples)
    if self.cap is None and cap >= int(sizes.max()):
      return self
    pairs = [self.client(c) for c in range(self.num_clients)]
    return FederatedData.from_clients(
        [p[0] for p in pairs], [p[1] for p in pairs], num_classes=self.num_classes,
        dtype=self.x.dtype, example_cap=int(cap), seed=seed)

  @classmethod
  def from_clients(
      cls,
      xs: Sequence[np.ndarray],
      ys: Sequence[np.ndarray],
      *,
      num_classes: int | None = None,
      max_examples: int | None = None,
      dtype=jnp.float32,
      example_cap: int | None = None,
      seed: int = 0,
  ) -> FederatedData:
    """Stacks per-client arrays into padded device arrays, checking them first.

    Args:
      xs: One feature array per client, `[n_c, *feature_shape]`, the same
        feature shape for all.
      ys: One integer label array per client, `[n_c]`.
      num_classes: Labels must lie in `[0, num_classes)`; default `max(y) + 1`.
      max_examples: Pad every client to this many slots (default: the largest
        client). Must be at least the largest client.
      dtype: Dtype of the stored features (float32; an integer dtype such as
        int32 keeps token ids exact).
      example_cap: If set and smaller than the largest client: a capped flat
        store (see the class docstring; `max_examples` must then be None).
      seed: Seed of the capped store's one-time shuffle of each client.

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
    if not (isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
            and num_classes >= 1):
      raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}.")
    if y_min < 0 or y_max >= num_classes:
      c = next(i for i, y in enumerate(ys) if y.min() < 0 or y.max() >= num_classes)
      raise ValueError(
          f"Client {c}: labels must lie in [0, num_classes) = [0, {num_classes}); "
          f"got values in [{int(ys[c].min())}, {int(ys[c].max())}].")
    sizes = np.array([len(y) for y in ys], np.int32)
    longest = int(sizes.max())
    if example_cap is not None:
      if not (isinstance(example_cap, (int, np.integer)) and not isinstance(example_cap, bool)
              and example_cap >= 1):
        raise ValueError(f"example_cap must be an int >= 1; got {example_cap!r}.")
      if max_examples is not None:
        raise ValueError(f"max_examples={max_examples} and example_cap={example_cap} "
                         "exclude each other; pass one.")
      if example_cap < longest:
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(y)) for y in ys]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        return cls(
            x=jnp.asarray(np.concatenate([x[o] for x, o in zip(xs, orders)]).astype(dtype)),
            y=jnp.asarray(np.concatenate([y[o] for y, o in zip(ys, orders)]).astype(np.int32)),
            num_examples=jnp.asarray(sizes), num_classes=int(num_classes),
            min_examples=int(min(sizes.min(), example_cap)), offsets=jnp.asarray(offsets),
            cap=int(example_cap), host_sizes=HostSizes(sizes))
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
        num_classes=int(num_classes), min_examples=int(sizes.min()),
        host_sizes=HostSizes(sizes))


jax.tree_util.register_dataclass(FederatedData)
