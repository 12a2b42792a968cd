"""Edge cases of the core package that its mutation pass found untested."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_pers as fp
from fedjax_pers.core import _cohort, _sampling, _system


def binomial_over(n, q, k):
  """Exact `P(Binomial(n, q) > k)` (q a Fraction)."""
  return sum(math.comb(n, j) * q**j * (1 - q)**(n - j) for j in range(k + 1, n + 1))


def max_cohort_reference(n, q, tail):
  """The smallest K >= 1 with `P(Binomial(n, q) > K) <= tail`, in exact arithmetic."""
  return max(1, next(k for k in range(n + 1) if binomial_over(n, q, k) <= Fraction(tail)))


@pytest.mark.parametrize("n,q,tail", [
    (100, Fraction(1, 10), None),     # the default tail 1e-12
    (3, Fraction(9, 10), None),       # P(X = N) > tail: every slot
    (10, Fraction(1, 100), 0.5),      # P(X > 0) <= tail: still one slot
    (5, Fraction(1, 2), 0.0),         # tail 0: all N slots
])
def test_poisson_max_cohort_is_the_binomial_quantile(n, q, tail):
  kw = {} if tail is None else {"tail": tail}
  want = max_cohort_reference(n, q, 1e-12 if tail is None else tail)
  assert _sampling.poisson_max_cohort(n, float(q), **kw) == want
  assert _sampling.poisson_max_cohort(n, 1.0) == n


@pytest.mark.parametrize("rate", [0, 0.0, -0.5, 1.5, 2, "0.5", None])
def test_poisson_max_cohort_rejects_rates_outside_0_1(rate):
  with pytest.raises(ValueError, match=r"poisson_rate must be a number in \(0, 1\]"):
    _sampling.poisson_max_cohort(10, rate)


def test_poisson_tail_sums_the_whole_upper_tail():
  for n, k in ((3, 1), (4, 2), (6, 0), (3, 3)):
    want = float(binomial_over(n, Fraction(1, 2), k))
    assert _sampling.poisson_tail(n, 0.5, k) == pytest.approx(want, rel=1e-12)


def test_poisson_draw_excludes_a_client_whose_u_equals_the_rate():
  """Client i takes part iff u_i < q, strictly (so that P(present) = q)."""
  key = jax.random.key(0)
  u = np.asarray(jax.random.uniform(key, (8,)))
  rate = float(np.sort(u)[3])              # exactly 3 clients lie below it
  ids, present = _sampling.poisson_cohort(key, 8, 8, rate)
  np.testing.assert_array_equal(present, u[np.asarray(ids)] < rate)
  assert int(np.sum(present)) == 3
  np.testing.assert_array_equal(_sampling.poisson_present(key, ids, 8, rate), present)


def token_clients():
  rs = np.random.RandomState(0)
  xs = [rs.randint(0, 50, (n, 2)).astype(np.int32) for n in (2, 9, 7)]
  ys = [rs.randint(0, 3, n) for n in (2, 9, 7)]
  return xs, ys


def test_with_cap_keeps_dtype_and_classes_and_seeds_the_shuffle():
  xs, ys = token_clients()
  data = fp.FederatedData.from_clients(xs, ys, num_classes=7, dtype=jnp.int32)
  for seed in (0, 5):
    kw = {} if seed == 0 else {"seed": seed}
    capped = data.with_cap(3, **kw)
    want = fp.FederatedData.from_clients(xs, ys, num_classes=7, dtype=jnp.int32,
                                         example_cap=3, seed=seed)
    assert capped.x.dtype == jnp.int32 and capped.num_classes == 7 and capped.cap == 3
    np.testing.assert_array_equal(capped.x, want.x)
    np.testing.assert_array_equal(capped.y, want.y)
  assert not np.array_equal(data.with_cap(3).x, data.with_cap(3, seed=5).x)


@pytest.mark.parametrize("cap", [0, -1, 2.5, True, "3", None])
def test_with_cap_rejects_what_is_not_an_int_at_least_1(cap):
  xs, ys = token_clients()
  data = fp.FederatedData.from_clients(xs, ys)
  with pytest.raises(ValueError, match=r"^cap must be an int >= 1"):
    data.with_cap(cap)


def test_balance_on_host_orders_unsigned_counts_as_signed():
  """Largest count first: an unsigned 0 must not wrap around to come first."""
  counts = np.array([0, 2, 1, 3], np.uint32)
  want = [3, 1, 2, 0]
  np.testing.assert_array_equal(_cohort.balance_on_host(counts, 1), want)
  np.testing.assert_array_equal(_cohort.balance_on_host(counts.astype(np.int64), 1), want)


def test_evaluate_without_host_sizes_reports_the_clients_sizes():
  rs = np.random.RandomState(0)
  xs = [rs.normal(size=(n, 3)).astype(np.float32) for n in (2, 4)]
  data = fp.FederatedData.from_clients(xs, [rs.randint(0, 2, n) for n in (2, 4)])
  bare = fp.FederatedData(x=data.x, y=data.y, num_examples=data.num_examples,
                          num_classes=data.num_classes, min_examples=data.min_examples)
  model = fp.models.logistic_regression((3,), 2)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ev = fp.core.evaluate(model, params, bare)
  np.testing.assert_array_equal(ev.num_examples, [2, 4])
  np.testing.assert_allclose(ev.loss, [math.log(2)] * 2, rtol=1e-6)   # zero logits


def test_a_stragglers_steps_are_a_whole_ceiling():
  """⌈share · S / levels⌉ as an integer: share 1 of 4 levels of S = 10 is 3 steps."""
  program = fp.core.LocalProgram(None, None, None, lambda client: 10)
  p = _system.straggling(program, jnp.asarray([0]), jnp.asarray([1]), 4, 2)
  client = fp.core.ClientData(None, None, jnp.asarray([5, 5]), id=jnp.asarray([0, 1]))
  steps = jax.vmap(p.num_steps)(client)
  assert steps.dtype == jnp.int32
  np.testing.assert_array_equal(steps, [3, 10])
