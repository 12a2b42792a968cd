"""Batches inside jit: reshuffles, coverage, masks, epochs versus steps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pers.core import LocalWork, batch_plan, num_steps, shuffle_valid
from fedjax_pers.core._batching import (
  _num_epochs,
  check_local_work,
  shuffle_fitted,
  width_classes,
  work_steps,
)


@pytest.mark.parametrize("n,max_n", [(1, 1), (5, 5), (7, 20), (200, 200), (3, 70000)])
def test_shuffle_valid_is_a_permutation_with_real_slots_first(n, max_n):
  order = np.asarray(shuffle_valid(jax.random.key(0), n, max_n))
  assert sorted(order.tolist()) == list(range(max_n))
  assert sorted(order[:n].tolist()) == list(range(n))


def test_shuffle_is_uniform_enough():
  counts = np.zeros((4, 4))
  keys = jax.random.split(jax.random.key(0), 4000)
  orders = np.asarray(jax.vmap(shuffle_valid, (0, None, None))(keys, 4, 9))[:, :4]
  for o in orders:
    counts[np.arange(4), o] += 1
  np.testing.assert_allclose(counts / 4000, 0.25, atol=0.035)


def test_epochs_cover_every_example_once_per_epoch_with_fresh_orders():
  n, max_n, b, e = 11, 16, 4, 3
  plan = batch_plan(jax.random.key(1), n, LocalWork(b, epochs=e), max_examples=max_n)
  idx, mask = np.asarray(plan.idx), np.asarray(plan.mask)
  # Static length: e * ceil(16/4) = 12 steps; this client's epochs are ceil(11/4) = 3
  # batches (4, 4, 3 real examples), laid end to end, then 3 whole masked steps.
  assert idx.shape == (e * num_steps(LocalWork(b, epochs=1), max_n), b) == (12, 4)
  np.testing.assert_array_equal(mask.sum(1), [4, 4, 3] * 3 + [0, 0, 0])
  orders = []
  for k in range(e):
    sel = idx[3 * k:3 * k + 3][mask[3 * k:3 * k + 3]]
    assert sorted(sel.tolist()) == list(range(n))
    orders.append(sel.tolist())
  assert orders[0] != orders[1] != orders[2]


def test_steps_run_through_reshuffled_epochs_with_partial_last_batch():
  n, b, k = 5, 2, 7
  plan = batch_plan(jax.random.key(2), n, LocalWork(b, steps=k), max_examples=8,
                    min_examples=5)
  idx, mask = np.asarray(plan.idx), np.asarray(plan.mask)
  np.testing.assert_array_equal(mask.sum(1), [2, 2, 1, 2, 2, 1, 2])
  first = idx[:3][mask[:3]]
  second = idx[3:6][mask[3:6]]
  assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(5))


def test_steps_with_batch_larger_than_client_use_the_whole_client():
  plan = batch_plan(jax.random.key(3), 3, LocalWork(10, steps=4), max_examples=6,
                    min_examples=3)
  mask = np.asarray(plan.mask)
  np.testing.assert_array_equal(mask.sum(1), [3, 3, 3, 3])


def test_fitted_shuffle_orders_real_examples_as_the_full_width_one():
  """Sorting only the width class that holds a client's n slots gives its real examples
  in exactly the order of the full-width shuffle, so plans built one client at a time
  are the same batches; the padding slots, left in place, too."""
  assert width_classes(4645, 45) == (64, 128, 256, 512, 1024, 2048, 4096, 4645)
  assert width_classes(200, 200) == (200,) and width_classes(70_000, 3) == (70_000,)
  fitted = jax.jit(lambda k, n: shuffle_fitted(k, n, 1500, 5))
  for i, n in enumerate([5, 63, 64, 65, 200, 511, 1024, 1400, 1500]):
    key = jax.random.key(i)
    a, b = np.asarray(fitted(key, jnp.int32(n))), np.asarray(shuffle_valid(key, n, 1500))
    np.testing.assert_array_equal(a, b)   # the padding slots too: they stay in place
    w = next(c for c in width_classes(1500, 5) if c >= n)
    np.testing.assert_array_equal(a, np.concatenate([shuffle_valid(key, n, w),
                                                     np.arange(w, 1500)]))
  keys, ns = jax.random.split(jax.random.key(9), 3), jnp.int32([7, 100, 1500])
  np.testing.assert_array_equal(jax.vmap(lambda k, n: shuffle_fitted(k, n, 1500))(keys, ns),
                                [fitted(k, n) for k, n in zip(keys, ns)])


def test_width_classes_by_hand():
  assert width_classes(64) == (64,)
  assert width_classes(65) == (64, 65)
  assert width_classes(256) == (64, 128, 256)
  assert width_classes(300) == (64, 128, 256, 300)
  assert width_classes(300, 128) == (128, 256, 300)
  assert width_classes(300, 129) == (256, 300)
  assert width_classes(1 << 16) == tuple(1 << p for p in range(6, 17))
  assert width_classes((1 << 16) + 1) == ((1 << 16) + 1,)   # beyond 16 index bits


def test_step_counts_by_hand():
  assert num_steps(LocalWork(2, steps=(3, 5, 4)), 10) == 5
  assert num_steps(LocalWork(3, epochs=2), 10) == 8                   # 2 · ⌈10 / 3⌉
  # An upper bound on the epochs a client touches: E, or ⌈K / ⌈n_min / B⌉⌉.
  assert _num_epochs(LocalWork(2, epochs=1), 5) == 1
  assert _num_epochs(LocalWork(2, epochs=3), 5) == 3
  assert _num_epochs(LocalWork(2, steps=6), 4) == 3                   # 2 steps an epoch
  assert _num_epochs(LocalWork(2, steps=(2, 6)), 4) == 3
  assert _num_epochs(LocalWork(4, steps=1), 10) == 1
  assert _num_epochs(LocalWork(8, steps=5), 3) == 5                   # a step an epoch
  n = np.array([1, 4, 5, 9])
  np.testing.assert_array_equal(work_steps(LocalWork(4, epochs=2), n), [2, 2, 4, 6])
  assert work_steps(LocalWork(4, steps=7), n) == 7
  per = LocalWork(4, steps=(3, 1, 2))
  host = work_steps(per, n[:2], np.array([2, 0]))
  assert isinstance(host, np.ndarray) and host.dtype == np.int32
  np.testing.assert_array_equal(host, [2, 3])
  traced = jax.jit(lambda i: work_steps(per, None, i))(jnp.int32([1, 2]))
  assert traced.dtype == jnp.int32
  np.testing.assert_array_equal(traced, [1, 2])
  with pytest.raises(ValueError, match=r"^per-client local steps need the client's id "
                                       r"\(ClientData\.id\)\.$"):
    work_steps(per, n)


NO_WORK = "(no local work would leave the model where it was)"


@pytest.mark.parametrize("work,num_clients,message", [
    (LocalWork(0, epochs=1), None, "batch_size must be a positive int; got 0."),
    (LocalWork(True, epochs=1), None, "batch_size must be a positive int; got True."),
    (LocalWork(4), None, "Exactly one of local epochs and local steps must be set; got "
                         "epochs=None, steps=None."),
    (LocalWork(4, 1, 2), None, "Exactly one of local epochs and local steps must be set; "
                               "got epochs=1, steps=2."),
    (LocalWork(4, epochs=0), None, f"local epochs must be a positive int {NO_WORK}; got 0."),
    (LocalWork(4, epochs=True), None,
     f"local epochs must be a positive int {NO_WORK}; got True."),
    (LocalWork(4, epochs=2.0), None,
     f"local epochs must be a positive int {NO_WORK}; got 2.0."),
    (LocalWork(4, steps=(2, 0, -1)), None, "per-client local steps must be a non-empty "
                                          "tuple of positive ints; got 0 among 3 counts."),
    (LocalWork(4, steps=()), None, "per-client local steps must be a non-empty tuple of "
                                   "positive ints; got ()."),
    (LocalWork(4, steps=(1, 2)), 3, "per-client local steps must number one per client "
                                    "(3); got 2."),
    (LocalWork(4, steps=0), None, "local steps must be a positive int, or a tuple of one "
                                  f"per client {NO_WORK}; got 0."),
    (LocalWork(4, steps=-1), None, "local steps must be a positive int, or a tuple of one "
                                   f"per client {NO_WORK}; got -1."),
    (LocalWork(4, steps=True), None, "local steps must be a positive int, or a tuple of "
                                     f"one per client {NO_WORK}; got True."),
])
def test_check_local_work_refusals(work, num_clients, message):
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    check_local_work(work, num_clients)


def test_check_local_work_accepts_each_form():
  for work, num_clients in [(LocalWork(1, epochs=1), None), (LocalWork(4, steps=3), 5),
                            (LocalWork(4, steps=(1, 2)), 2), (LocalWork(4, steps=(1, 2)), None)]:
    check_local_work(work, num_clients)


def _plan_by_hand(key, n, work, max_examples, min_examples, steps, shuffle):
  """A plan from its definition: epoch e reads the e-th shuffle of the client's slots
  in batches of B; steps from `steps` on, and slots past n, are masked."""
  b = work.batch_size
  total = num_steps(work, max_examples)
  perms = np.asarray([shuffle(k) for k in jax.random.split(key, _num_epochs(work, min_examples))])
  per_epoch = -(-n // b)
  idx, mask = np.zeros((total, b), np.int32), np.zeros((total, b), bool)
  for s in range(total):
    pos = (s % per_epoch) * b + np.arange(b)
    mask[s] = (pos < n) & (s < steps)
    idx[s] = perms[min(s // per_epoch, len(perms) - 1), np.minimum(pos, max_examples - 1)]
  return idx, mask


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_batch_plans_by_hand_on_each_backend(backend, monkeypatch):
  """On the CPU a plan sorts only the width class that holds the client
  (`shuffle_fitted`); on an accelerator the full width (`shuffle_valid`). Per-client
  steps read the client's own count; a client filling every slot is covered whole."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  max_n, min_n = 130, 3
  fitted = backend == "cpu"
  shuffle = jax.jit(lambda k, n: shuffle_fitted(k, n, max_n, min_n) if fitted
                    else shuffle_valid(k, n, max_n))
  for work in [LocalWork(4, steps=(5, 40, 2)), LocalWork(4, epochs=2)]:
    planned = jax.jit(lambda k, n, i, work=work: batch_plan(
        k, n, work, max_examples=max_n, min_examples=min_n, client_id=i))
    for i, n in enumerate((3, 70, 130)):
      key = jax.random.key(i)
      plan = planned(key, jnp.int32(n), jnp.int32(i))
      steps = int(work_steps(work, np.int32(n), np.int32(i)))
      idx, mask = _plan_by_hand(key, n, work, max_n, min_n, steps,
                                lambda k, n=n: shuffle(k, jnp.int32(n)))
      np.testing.assert_array_equal(plan.mask, mask)
      np.testing.assert_array_equal(plan.idx, idx)
      if work.epochs:   # every epoch covers the client's examples once
        real = np.asarray(plan.idx)[np.asarray(plan.mask)]
        assert sorted(real.tolist()) == sorted(list(range(n)) * 2)


def _shuffle_by_numpy(key, n, max_n):
  """`shuffle_valid` as its docstring defines it, in NumPy: each round sorts one uint32
  per slot, random high bits over the slot's index in the low b = max(16, bits of
  max_n - 1) bits, the padding slots' high bits all ones; 2 rounds for b = 16, else 3."""
  b = max(16, (max_n - 1).bit_length())
  low = np.uint32((1 << b) - 1)
  pos = np.arange(max_n, dtype=np.uint32)
  order = np.arange(max_n)
  for r in range(2 if b == 16 else 3):
    high = np.asarray(jax.random.bits(jax.random.fold_in(key, r), (max_n,), jnp.uint32))
    high = np.where(pos < n, high & ~low, ~low)
    order = order[(np.sort(high | pos) & low).astype(np.int64)]
  return order


@pytest.mark.parametrize("n,max_n", [(5, 9), (70, 70), (100, 1 << 16), (3, (1 << 16) + 1),
                                     (131_000, (1 << 17) + 1)])
def test_shuffle_valid_against_numpy(n, max_n):
  key = jax.random.key(n)
  order = np.asarray(shuffle_valid(key, n, max_n))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(order, _shuffle_by_numpy(key, n, max_n))
  assert sorted(order[:n].tolist()) == list(range(n))
  if max_n <= 1 << 16:   # prefix-stable: the real slots' order is the same at any width
    np.testing.assert_array_equal(order[:n], np.asarray(shuffle_valid(key, n, 1 << 16))[:n])
