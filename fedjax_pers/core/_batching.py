"""Local batches drawn inside jit: per-client reshuffles and padding masks.

A client with `n` real examples (padded to `max_n` slots) sees its examples in a
fresh random order every epoch. An epoch is `ceil(n / B)` batches, the last one
partial; a partial batch carries a mask, so padding never reaches a loss. Local
work is either a number of epochs (the FedAvg/FedProx papers) or a number of
steps that runs through as many reshuffled epochs as it needs (the pFedMe and
Per-FedAvg papers' `get_next_train_batch`). With epochs, clients with fewer
batches than the largest client get whole masked steps, which leave their
parameters and optimizer state untouched.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LocalWork(NamedTuple):
  """How much each client trains per round.

  Exactly one of `epochs` and `steps` is set.

  Attributes:
    batch_size: Examples per local step (`B`).
    epochs: Passes over the client's data (`E`).
    steps: Local steps (`K`), cycling through reshuffled epochs.
  """

  batch_size: int
  epochs: int | None = None
  steps: int | None = None


class BatchPlan(NamedTuple):
  """Which examples each local step uses.

  Attributes:
    idx: `[num_steps, batch_size]` int32 example slots into the client's rows.
    mask: `[num_steps, batch_size]` bool, True for real examples.
  """

  idx: jax.Array
  mask: jax.Array


def check_local_work(work: LocalWork) -> None:
  """Raises `ValueError` unless `work` names a valid amount of local training."""
  if not isinstance(work.batch_size, int) or work.batch_size < 1:
    raise ValueError(f"batch_size must be a positive int; got {work.batch_size!r}.")
  if (work.epochs is None) == (work.steps is None):
    raise ValueError(
        "Exactly one of local epochs and local steps must be set; got "
        f"epochs={work.epochs!r}, steps={work.steps!r}.")
  for name in ("epochs", "steps"):
    v = getattr(work, name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      raise ValueError(f"local {name} must be a positive int (no local work would leave "
                       f"the model where it was); got {v!r}.")


def num_steps(work: LocalWork, max_examples: int) -> int:
  """The static number of scan steps for clients padded to `max_examples`."""
  if work.steps is not None:
    return work.steps
  return work.epochs * math.ceil(max_examples / work.batch_size)


def _num_epochs(work: LocalWork, min_examples: int) -> int:
  """An upper bound on the epochs any client touches."""
  if work.epochs is not None:
    return max(work.epochs, 1)
  per_epoch = math.ceil(min_examples / work.batch_size)
  return max(1, min(work.steps, math.ceil(work.steps / per_epoch)))


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


def batch_plan(
    key: jax.Array, n: jax.Array, work: LocalWork, *, max_examples: int,
    min_examples: int = 1,
) -> BatchPlan:
  """Example slots and masks for every local step of one client.

  Args:
    key: PRNG key of this client and round.
    n: The client's number of real examples (traced scalar, >= 1).
    work: Local work.
    max_examples: Slots per client (static).
    min_examples: Smallest client in the population (static); bounds the number
      of epochs a fixed number of steps can touch.

  Returns:
    A `BatchPlan` of `num_steps(work, max_examples)` steps.
  """
  b = work.batch_size
  total = num_steps(work, max_examples)
  epochs = _num_epochs(work, min_examples)
  keys = jax.random.split(key, epochs)
  perms = jax.vmap(shuffle_valid, (0, None, None))(keys, n, max_examples)
  per_epoch = (n + b - 1) // b
  s = jnp.arange(total)
  epoch, j = s // per_epoch, s % per_epoch
  active = s < (work.steps if work.steps is not None else work.epochs * per_epoch)
  pos = j[:, None] * b + jnp.arange(b)[None, :]
  mask = (pos < n) & active[:, None]
  pos = jnp.minimum(pos, max_examples - 1)
  idx = perms[jnp.minimum(epoch, epochs - 1)[:, None], pos]
  return BatchPlan(idx=idx, mask=mask)
