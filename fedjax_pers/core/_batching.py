"""Local batches drawn inside jit: per-client reshuffles and padding masks.

A client with `n` real examples (padded to `max_n` slots) sees its examples in a
fresh random order every epoch. An epoch is `ceil(n / B)` batches, the last one
partial; a partial batch carries a mask, so padding never reaches a loss. Local
work is either a number of epochs (the FedAvg/FedProx papers) or a number of
steps that runs through as many reshuffled epochs as it needs (the pFedMe and
Per-FedAvg papers' `get_next_train_batch`), the same for every client or one
count per client. A plan has the static length of the longest client; the steps
after a client's last real one (`work_steps`) are all padding, which the engine
either skips (`lax.while_loop`) or masks (the differentiable path).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LocalWork(NamedTuple):
  """How much each client trains per round.

  Exactly one of `epochs` and `steps` is set.

  Attributes:
    batch_size: Examples per local step (`B`).
    epochs: Passes over the client's data (`E`).
    steps: Local steps (`K`), cycling through reshuffled epochs; an int for every
      client, or a tuple with one count per client of the population (`K_c`).
  """

  batch_size: int
  epochs: int | None = None
  steps: int | tuple[int, ...] | None = None


class BatchPlan(NamedTuple):
  """Which examples each local step uses.

  Attributes:
    idx: `[num_steps, batch_size]` int32 example slots into the client's rows.
    mask: `[num_steps, batch_size]` bool, True for real examples.
  """

  idx: jax.Array
  mask: jax.Array


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_local_work(work: LocalWork, num_clients: int | None = None) -> None:
  """Raises `ValueError` unless `work` names a valid amount of local training.

  With `num_clients`, per-client step counts must number one per client.
  """
  if not _positive_int(work.batch_size):
    raise ValueError(f"batch_size must be a positive int; got {work.batch_size!r}.")
  if (work.epochs is None) == (work.steps is None):
    raise ValueError(
        "Exactly one of local epochs and local steps must be set; got "
        f"epochs={work.epochs!r}, steps={work.steps!r}.")
  if work.epochs is not None and not _positive_int(work.epochs):
    raise ValueError("local epochs must be a positive int (no local work would leave the "
                     f"model where it was); got {work.epochs!r}.")
  if isinstance(work.steps, tuple):
    bad = [v for v in work.steps if not _positive_int(v)]
    if not work.steps or bad:
      raise ValueError("per-client local steps must be a non-empty tuple of positive ints; "
                       f"got {bad[0] if bad else work.steps!r}"
                       + (f" among {len(work.steps)} counts." if bad else "."))
    if num_clients is not None and len(work.steps) != num_clients:
      raise ValueError(f"per-client local steps must number one per client ({num_clients}); "
                       f"got {len(work.steps)}.")
  elif work.steps is not None and not _positive_int(work.steps):
    raise ValueError("local steps must be a positive int, or a tuple of one per client (no "
                     f"local work would leave the model where it was); got {work.steps!r}.")


def _max_steps(work: LocalWork) -> int:
  return max(work.steps) if isinstance(work.steps, tuple) else work.steps


def num_steps(work: LocalWork, max_examples: int) -> int:
  """The static number of plan steps: those of the longest client padded to `max_examples`."""
  if work.steps is not None:
    return _max_steps(work)
  return work.epochs * math.ceil(max_examples / work.batch_size)


def work_steps(work: LocalWork, n: jax.Array, client_id: jax.Array | None = None
               ) -> jax.Array | int:
  """The steps of `work` that hold a real example, for a client with `n` examples.

  `E · ⌈n / B⌉` for epochs, `K` for steps (a Python int: the same for every
  client), `K_c` for per-client steps (`client_id` is then required). NumPy in,
  NumPy out (the engine plans rounds on the host).
  """
  if work.epochs is not None:
    return work.epochs * ((n + work.batch_size - 1) // work.batch_size)
  if isinstance(work.steps, tuple):
    if client_id is None:
      raise ValueError("per-client local steps need the client's id (ClientData.id).")
    if isinstance(client_id, np.ndarray):
      return np.asarray(work.steps, np.int32)[client_id]
    return jnp.asarray(work.steps, jnp.int32)[client_id]
  return work.steps


def _num_epochs(work: LocalWork, min_examples: int) -> int:
  """An upper bound on the epochs any client touches."""
  if work.epochs is not None:
    return max(work.epochs, 1)
  steps = _max_steps(work)
  per_epoch = math.ceil(min_examples / work.batch_size)
  return max(1, min(steps, math.ceil(steps / per_epoch)))


def shuffle_valid(key: jax.Array, n: jax.Array, max_n: int) -> jax.Array:
  """A uniformly random order of slots `[0, n)`, followed by slots `[n, max_n)`.

  Each round sorts one packed uint32 per slot (random high bits, the slot in the
  low `b` bits), ~5x faster on CPU than an argsort of float keys; a tie of the
  random parts keeps the previous order, and two rounds compose to 2·(32 − b)
  random bits. With `b = 16` fixed for up to 65,536 slots and random bits that
  are prefix-stable in `max_n` (threefry is counter-based), the order of a
  client's real examples does not depend on how far it is padded.

  Args:
    key: PRNG key.
    n: Number of real examples (traced scalar).
    max_n: Number of slots (static).

  Returns:
    `[max_n]` int32 permutation whose first `n` entries are a permutation of
    `range(n)`.
  """
  idx_bits = max(16, (max_n - 1).bit_length())
  rounds = 2 if idx_bits == 16 else 3
  low = jnp.uint32((1 << idx_bits) - 1)
  pos = jnp.arange(max_n, dtype=jnp.uint32)
  order = jnp.arange(max_n, dtype=jnp.int32)
  for r in range(rounds):
    high = jax.random.bits(jax.random.fold_in(key, r), (max_n,), jnp.uint32) & ~low
    high = jnp.where(pos < n, high, ~low)
    shuffled = (jnp.sort(high | pos) & low).astype(jnp.int32)
    order = order[shuffled]
  return order


FITTED_MIN_WIDTH = 64


def width_classes(max_n: int, min_n: int = 1) -> tuple[int, ...]:
  """Widths a fitted shuffle sorts for clients of `min_n` to `max_n` examples: the
  powers of two from 64 that hold some client, then `max_n`. One class: no gain."""
  if max_n > 1 << 16:       # beyond 16 index bits shuffle_valid is not prefix-stable
    return (max_n,)
  widths, w = [], FITTED_MIN_WIDTH
  while w < max_n:
    if w >= min_n:
      widths.append(w)
    w *= 2
  return (*widths, max_n)


def shuffle_fitted(key: jax.Array, n: jax.Array, max_n: int, min_n: int = 1) -> jax.Array:
  """`shuffle_valid(key, n, max_n)`, sorting only the smallest width class that holds
  `n` slots (`lax.switch`), so its cost follows `n`.

  `shuffle_valid` is prefix-stable in its width, so the client's real examples
  come out in exactly the same order, and so do the padding slots, which every
  round leaves in place. Under `vmap` a switch would become a select over every
  class, so a batched call runs its elements one after another (`lax.map`, each
  with its own switch): the engine builds plans one client at a time where there
  are several classes (`Plan.plans_one_by_one`), and a sweep's variants
  (`fedjax_pers.sweep`) keep the same work.
  """
  widths = width_classes(max_n, min_n)
  if len(widths) == 1:
    return shuffle_valid(key, n, max_n)
  return _fitted(widths, max_n)(jax.random.key_data(key), n)


@functools.cache
def _fitted(widths: tuple[int, ...], max_n: int):
  """`shuffle_fitted` for these width classes on raw key data, batched by `lax.map`."""

  def branch(w):
    tail = jnp.arange(w, max_n, dtype=jnp.int32)
    return lambda key, n: jnp.concatenate([shuffle_valid(key, n, w), tail])

  @jax.custom_batching.custom_vmap
  def fitted(key_data, n):
    which = jnp.searchsorted(jnp.asarray(widths, jnp.int32), n.astype(jnp.int32))
    return jax.lax.switch(which, [branch(w) for w in widths],
                          jax.random.wrap_key_data(key_data), n)

  @fitted.def_vmap
  def _(axis_size, in_batched, key_data, n):
    key_data, n = (a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                   for a, b in zip((key_data, n), in_batched))
    return jax.lax.map(lambda a: fitted(*a), (key_data, n)), True

  return fitted


def batch_plan(
    key: jax.Array, n: jax.Array, work: LocalWork, *, max_examples: int,
    min_examples: int = 1, client_id: jax.Array | None = None,
) -> BatchPlan:
  """Example slots and masks for every local step of one client.

  Args:
    key: PRNG key of this client and round.
    n: The client's number of real examples (traced scalar, >= 1).
    work: Local work.
    max_examples: Slots per client (static).
    min_examples: Smallest client in the population (static); bounds the number
      of epochs a fixed number of steps can touch.
    client_id: The client's index in the population (per-client steps only).

  Returns:
    A `BatchPlan` of `num_steps(work, max_examples)` steps; the first
    `work_steps(work, n, client_id)` hold real examples, the rest none.
  """
  b = work.batch_size
  total = num_steps(work, max_examples)
  epochs = _num_epochs(work, min_examples)
  keys = jax.random.split(key, epochs)
  # On CPU the engine builds clients' plans one at a time (see `core/_cohort.py`), where
  # sorting only the width that holds the client's examples costs O(n), not O(max_n).
  if jax.default_backend() == "cpu":
    shuffle = lambda k, m: shuffle_fitted(k, m, max_examples, min_examples)
  else:
    shuffle = lambda k, m: shuffle_valid(k, m, max_examples)
  perms = jax.vmap(shuffle, (0, None))(keys, n)
  per_epoch = (n + b - 1) // b
  s = jnp.arange(total)
  epoch, j = s // per_epoch, s % per_epoch
  active = s < work_steps(work, n, client_id)
  pos = j[:, None] * b + jnp.arange(b)[None, :]
  mask = (pos < n) & active[:, None]
  pos = jnp.minimum(pos, max_examples - 1)
  idx = perms[jnp.minimum(epoch, epochs - 1)[:, None], pos]
  return BatchPlan(idx=idx, mask=mask)
