"""Poisson sampling: each client independently with rate q, in static slots with the
absent ones masked; against NumPy and the binomial law, and in a round."""

import math
from fractions import Fraction

import jax
import numpy as np
import optax
import pytest
from _reference import client_deltas
from scipy import stats
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers import privacy
from fedjax_pers.algorithms import fedavg
from fedjax_pers.core import _sampling


def test_poisson_cohort_is_the_clients_under_the_rate_in_order_of_their_draw():
  key, n, k, q = jax.random.key(4), 50, 12, 0.1
  ids, present = _sampling.poisson_cohort(key, n, k, q)
  u = np.asarray(jax.random.uniform(key, (n,)))
  np.testing.assert_array_equal(ids, np.argsort(u, kind="stable")[:k])
  np.testing.assert_array_equal(present, u[np.asarray(ids)] < q)
  assert np.asarray(present).sum() == (u < q).sum()        # none lost: m <= K here
  assert len(set(np.asarray(ids).tolist())) == k           # the absent slots are distinct


def test_poisson_cohort_includes_each_client_with_probability_q_independently():
  n, k, q, trials = 20, 12, 0.25, 20_000
  draw = jax.jit(jax.vmap(lambda key: _sampling.poisson_cohort(key, n, k, q)))
  ids, present = (np.asarray(a) for a in draw(jax.random.split(jax.random.key(0), trials)))
  member = np.zeros((trials, n), bool)
  np.put_along_axis(member, ids, present, axis=1)
  rate = member.mean(axis=0)
  assert np.all(np.abs(rate - q) < 5 * np.sqrt(q * (1 - q) / trials))
  # Sizes follow Binomial(N, q) (χ² goodness of fit over the likely sizes).
  sizes = member.sum(axis=1)
  obs = np.bincount(sizes, minlength=n + 1)[:11]
  exp = stats.binom.pmf(np.arange(11), n, q) * trials
  assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4
  # Pairs are independent: P(i and j) = q².
  both = (member[:, 0] & member[:, 1]).mean()
  assert abs(both - q * q) < 5 * np.sqrt(q * q / trials)


@pytest.mark.parametrize("n,q", [(100, 0.2), (1000, 0.01), (7, 0.5), (10, 1.0)])
def test_poisson_max_cohort_is_the_binomial_tail_quantile(n, q):
  k = _sampling.poisson_max_cohort(n, q, 1e-12)
  if q == 1.0:
    assert k == n
    return
  assert stats.binom.sf(k, n, q) <= 1e-12 < stats.binom.sf(k - 1, n, q) or k == 1
  assert _sampling.poisson_tail(n, q, k) == pytest.approx(stats.binom.sf(k, n, q), rel=1e-6,
                                                          abs=1e-300)


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


def test_poisson_round_averages_the_present_clients_only():
  """Uniform weights: the mean of the present clients' updates; absent slots weigh 0, run
  no step, keep their state and are not counted as non-finite."""
  data, q, k = small_data(num_clients=10), 0.3, 7
  work = fp.LocalWork(3, epochs=1)
  ex = fp.Execution(poisson_rate=q)
  alg = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=k,
               weighting=agg.uniform(), execution=ex)
  s0 = alg.init(jax.random.key(1), data)
  s1, m = jax.jit(alg.round)(s0, data)
  _, k_sample, _ = jax.random.split(s0.rng, 3)
  u = np.asarray(jax.random.uniform(k_sample, (10,)))
  want = np.flatnonzero(u < q)
  present = np.asarray(m.present)
  assert 1 <= present.sum() < k                            # this seed masks some slots
  np.testing.assert_array_equal(np.sort(np.asarray(m.clients)[present]), want)
  w, b, clients = client_deltas(s0.params, data, s0.rng, work, 0.1, k,
                                ids=np.asarray(m.clients)[present])
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             w + sum(c["dw"] for c in clients) / len(clients), atol=1e-5)
  np.testing.assert_allclose(np.asarray(m.weights)[~present], 0.0)
  assert int(m.num_nonfinite) == 0
  steps = sum(c["steps"] for c in clients)
  assert int(m.real_steps) == steps


def test_poisson_dp_round_divides_by_the_fixed_denominator():
  data, q, k = small_data(num_clients=10), 0.3, 7
  den = q * 10
  alg = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
               clients_per_round=k, execution=fp.Execution(poisson_rate=q),
               weighting=privacy.dp_fedavg_aggregator(1e6, 0.0, den, jax.random.key(0)))
  s0 = alg.init(jax.random.key(1), data)
  s1, m = jax.jit(alg.round)(s0, data)
  present = np.asarray(m.present)
  w, _, clients = client_deltas(s0.params, data, s0.rng, fp.LocalWork(3, epochs=1), 0.1, k,
                                ids=np.asarray(m.clients)[present])
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             w + sum(c["dw"] for c in clients) / den, atol=1e-5)
  np.testing.assert_allclose(m.weights, np.where(present, 1 / den, 0.0), rtol=1e-6)


def test_poisson_refusals():
  with pytest.raises(ValueError, match=r"poisson_rate must be a number in \(0, 1\]"):
    fp.Execution(poisson_rate=0.0)
  with pytest.raises(ValueError, match="two ways to sample"):
    fp.Execution(poisson_rate=0.5, sampling_probs=np.ones(3))
