"""Cohort sampling without replacement: uniform (a permutation, or Floyd's algorithm for
large populations) and weighted; distinct, seeded, and uniform over the k-subsets."""

from itertools import combinations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_pers as fp
from fedjax_pers.core import _sampling
from fedjax_pers.core._sampling import check_cohort


def test_sampling_is_without_replacement_and_seeded():
  idx = fp.core.sample_clients(jax.random.key(0), 50, 20)
  assert len(set(np.asarray(idx).tolist())) == 20
  np.testing.assert_array_equal(idx, fp.core.sample_clients(jax.random.key(0), 50, 20))
  p = np.zeros(50)
  p[:5] = 1.0
  idx = fp.core.sample_clients(jax.random.key(1), 50, 5, probs=jnp.asarray(p))
  assert sorted(np.asarray(idx).tolist()) == [0, 1, 2, 3, 4]
  counts = np.zeros(10)
  for s in range(400):
    counts[np.asarray(fp.core.sample_clients(jax.random.key(s), 10, 3))] += 1
  assert counts.min() > 80 and counts.max() < 160   # expected 120 each


def test_floyd_sampling_is_uniform_distinct_and_chosen_by_population_size():
  keys = jax.random.split(jax.random.key(0), 6000)
  draw = jax.jit(jax.vmap(lambda k: fp.core.sample_clients(k, 6, 2, method="floyd")))
  ids = np.sort(np.asarray(draw(keys)), axis=1)
  assert np.all(ids[:, 0] != ids[:, 1]) and ids.min() >= 0 and ids.max() < 6
  counts = {c: 0 for c in combinations(range(6), 2)}
  for a, b in ids:
    counts[(int(a), int(b))] += 1
  # 15 subsets, 400 expected each, standard deviation ~19: all within 5 of them.
  assert max(abs(v - 400) for v in counts.values()) < 100, counts
  big = fp.core.sample_clients(jax.random.key(1), 1 << 16, 100)
  assert len(set(np.asarray(big).tolist())) == 100
  np.testing.assert_array_equal(big, fp.core.sample_clients(jax.random.key(1), 1 << 16, 100,
                                                            method="floyd"))
  small = fp.core.sample_clients(jax.random.key(1), 1000, 10)
  np.testing.assert_array_equal(small, fp.core.sample_clients(jax.random.key(1), 1000, 10,
                                                              method="permutation"))
  with pytest.raises(ValueError, match="method must be"):
    fp.core.sample_clients(jax.random.key(1), 10, 2, method="reservoir")


def test_check_cohort_bounds_and_message():
  for k, n in [(1, 5), (5, 5), (np.int64(3), 5)]:
    check_cohort(k, n)
  for k in (0, 6, 2.0, True):
    with pytest.raises(ValueError, match=r"^clients_per_round must be an int in "
                                         r"\[1, num_clients\] = \[1, 5\]; got " + repr(k)):
      check_cohort(k, 5)


def test_sampling_probabilities_are_checked_and_normalised():
  np.testing.assert_array_equal(_sampling.check_probs([1, 3, 0], 3), [0.25, 0.75, 0.0])
  assert _sampling.check_probs(np.float32([2, 2]), 2).dtype == np.float64
  np.testing.assert_allclose(_sampling.check_probs([0.1, 0.2], 2), [1 / 3, 2 / 3])  # sum < 1
  np.testing.assert_array_equal(_sampling.check_probs([0.25, 0.75], 2), [0.25, 0.75])
  with pytest.raises(ValueError, match=r"^sampling probabilities must have shape "
                                       r"\(num_clients,\) = \(3,\); got shape \(2,\)\.$"):
    _sampling.check_probs([0.5, 0.5], 3)
  for bad, got in (([0.0, 0.0], "min=0.0, sum=0.0"), ([1.0, np.nan], "min=nan, sum=nan"),
                   ([1.0, -0.5], "min=-0.5, sum=0.5"), ([1.0, np.inf], "min=1.0, sum=inf")):
    with pytest.raises(ValueError, match=r"^sampling probabilities must be finite, "
                                         r"non-negative and not all zero; got " + got + r"\.$"):
      _sampling.check_probs(bad, 2)


def test_each_method_is_its_definition():
  key = jax.random.key(3)
  whole = fp.core.sample_clients(key, 10, 10)
  assert whole.dtype == jnp.int32
  np.testing.assert_array_equal(whole, np.arange(10))          # all clients, in order
  perm = fp.core.sample_clients(key, 10, 3, method="permutation")
  np.testing.assert_array_equal(perm, jax.random.choice(key, 10, (3,), replace=False))
  # Floyd: for j = N − k, ..., N − 1 draw t uniform in [0, j]; take t, or j if t was taken.
  n, k = 12, 5
  draws = np.asarray(jax.random.randint(key, (k,), 0, jnp.arange(n - k, n) + 1, jnp.int32))
  chosen = []
  for j, t in zip(range(n - k, n), draws):
    chosen.append(j if t in chosen else int(t))
  floyd = fp.core.sample_clients(key, n, k, method="floyd")
  np.testing.assert_array_equal(floyd, chosen)
  p = jnp.asarray([0.1, 0.0, 0.5, 0.4])
  weighted = fp.core.sample_clients(key, 4, 2, probs=p)
  np.testing.assert_array_equal(weighted, jax.random.choice(key, 4, (2,), replace=False, p=p))
  assert perm.dtype == floyd.dtype == weighted.dtype == jnp.int32
