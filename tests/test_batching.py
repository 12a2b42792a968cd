"""Batches inside jit: reshuffles, coverage, masks, epochs versus steps."""

import jax
import numpy as np
import pytest

from fedjax_pers.core import LocalWork, batch_plan, num_steps, shuffle_valid


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
