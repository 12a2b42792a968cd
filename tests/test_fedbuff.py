"""FedBuff: zero latency spread and K = M is synchronous FedAvg, stale reports against
NumPy, the in-flight set, the config."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from _reference import client_deltas, engine_plan, logreg_sgd
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import fedbuff
from fedjax_pers.experiment import train_and_evaluate


@functools.cache
def data():   # built at first use: a test module's import starts no JAX backend
  return small_data(num_clients=8, sizes=[3, 11, 6, 9, 4, 12, 7, 5])

WORK = fp.LocalWork(2, epochs=1)


def test_no_spread_and_k_equal_m_is_synchronous_fedavg():
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=3, buffer_size=3,
                latency_spread=0.0)
  state = alg.init(jax.random.key(0), data())
  step = jax.jit(alg.round)
  for t in range(3):
    before, ids = state, np.sort(np.asarray(state.algorithm.in_flight))
    state, m = step(state, data())
    assert sorted(np.asarray(m.clients).tolist()) == ids.tolist()
    w, b, clients = client_deltas(before.params, data(), before.rng, WORK, 0.1, 3,
                                  ids=np.asarray(m.clients))
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"],
                               w + np.mean([c["dw"] for c in clients], 0), atol=1e-5)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"],
                               b + np.mean([c["db"] for c in clients], 0), atol=1e-5)
    np.testing.assert_allclose(m.weights, 1 / 3, rtol=1e-6)
    assert float(state.algorithm.clock) == t + 1
  assert step._cache_size() == 1


def test_stale_reports_are_discounted_against_numpy():
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=4, buffer_size=2,
                staleness_exponent=0.5, latency_spread=1.0)
  state = alg.init(jax.random.key(3), data())
  step = jax.jit(alg.round)
  seen_stale = False
  for _ in range(4):
    a = state.algorithm
    assert len(set(np.asarray(a.in_flight).tolist())) == 4
    order = np.argsort(np.asarray(a.finish), kind="stable")[:2]
    stale = int(a.steps) - np.asarray(a.version)[order]
    seen_stale |= bool((stale > 0).any())
    before, rng = state, state.rng
    state, m = step(state, data())
    ids = np.asarray(a.in_flight)[order]
    np.testing.assert_array_equal(np.asarray(m.clients), ids)
    disc = (1.0 + stale) ** -0.5 / 2
    np.testing.assert_allclose(m.weights, disc, rtol=1e-6)
    w = np.asarray(before.params["Dense_0"]["kernel"], np.float64)
    upd = np.zeros_like(w)
    for c, d in zip(ids, disc):
      sw = np.asarray(before.client_states["Dense_0"]["kernel"][c], np.float64)
      sb = np.asarray(before.client_states["Dense_0"]["bias"][c], np.float64)
      plan = engine_plan(rng, data(), WORK, c)
      x, y = np.asarray(data().x[c], np.float64), np.asarray(data().y[c])
      yw, _, _, _ = logreg_sgd(sw, sb, x, y, np.asarray(plan.idx), np.asarray(plan.mask), 0.1)
      upd += d * (yw - sw)
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w + upd, atol=1e-5)
    assert float(state.algorithm.clock) == pytest.approx(float(np.max(np.asarray(a.finish)[order])))
    # The new ones start from the new model.
    for c in np.setdiff1d(np.asarray(state.algorithm.in_flight), np.asarray(a.in_flight)):
      np.testing.assert_array_equal(state.client_states["Dense_0"]["kernel"][c],
                                    state.params["Dense_0"]["kernel"])
  assert seen_stale


@pytest.mark.run
def test_fedbuff_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "fedbuff"
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["rounds"] == 4
  import json
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  times = [r["simulated_time"] for r in rows]
  assert times[0] == 0 and times == sorted(times) and times[-1] > 0


def test_fedbuff_refuses_a_buffer_above_the_concurrency():
  with pytest.raises(ValueError, match="buffer_size \\(K=4\\) must be <= concurrency"):
    fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=3, buffer_size=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(concurrency=0, buffer_size=1), "concurrency must be an int >= 1; got 0"),
    (dict(concurrency=2, buffer_size=0), "buffer_size must be an int >= 1; got 0"),
    (dict(concurrency=2.0, buffer_size=1), "concurrency must be an int >= 1; got 2.0"),
    (dict(concurrency=2, buffer_size=True), "buffer_size must be an int >= 1; got True"),
    (dict(concurrency=2, buffer_size=1, staleness_exponent=-0.5),
     "staleness_exponent must be a number >= 0; got -0.5"),
    (dict(concurrency=2, buffer_size=1, latency_spread=-1.0),
     "latency_spread must be a number >= 0; got -1.0"),
    (dict(concurrency=2, buffer_size=1, latency_spread="1"),
     "latency_spread must be a number >= 0; got '1'"),
])
def test_fedbuff_refuses_bad_numbers(kwargs, match):
  with pytest.raises(ValueError, match="^" + match):
    fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, **kwargs)
  fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=2, buffer_size=1,
          staleness_exponent=0, latency_spread=0.0)   # the bounds themselves are allowed


@pytest.mark.parametrize("execution", [
    fp.Execution(sampling_probs=np.ones(8)), fp.Execution(poisson_rate=0.5),
    fp.Execution(system=fp.System(dropout_rate=0.1))])
def test_fedbuff_refuses_its_own_sampling_replaced(execution):
  with pytest.raises(ValueError, match="^fedbuff dispatches clients itself: execution."
                     "sampling_probs, poisson_rate and system must be None.$"):
    fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=2, buffer_size=1,
            execution=execution)


def test_fedbuff_refuses_more_in_flight_than_clients():
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=9, buffer_size=2)
  match = r"concurrency \(M=9\) must be <= the number of clients \(8\)"
  with pytest.raises(ValueError, match=match):
    alg.init(jax.random.key(0), data())
  ok = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=8, buffer_size=2)
  state = ok.init(jax.random.key(0), data())
  with pytest.raises(ValueError, match=match):   # a state from a larger population
    alg.round(state, data())
  state, _ = jax.jit(ok.round)(state, data())    # M = N: every client in flight
  assert sorted(np.asarray(state.algorithm.in_flight).tolist()) == list(range(8))



def test_fedbuff_defaults_are_the_papers():
  """The paper's staleness weights (1 + s)^(−1/2), and log-durations of spread 1: the
  defaults run as those values given; a stale report's weight and the durations differ
  with others."""
  make = lambda **kw: fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=4,
                              buffer_size=2, **kw)
  runs = {}
  for name, alg in (("default", make()), ("given", make(staleness_exponent=0.5,
                                                         latency_spread=1.0)),
                    ("other", make(staleness_exponent=1.5, latency_spread=2.0))):
    state = alg.init(jax.random.key(3), data())
    step, weights = jax.jit(alg.round), []
    for _ in range(4):
      state, m = step(state, data())
      weights.append(np.asarray(m.weights))
    runs[name] = (np.asarray(state.algorithm.duration), np.concatenate(weights))
  for a, b in zip(runs["default"], runs["given"]):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(runs["default"], runs["other"]):
    assert not np.allclose(a, b)


def test_a_non_finite_report_weighs_nothing():
  """A client whose update is NaN is reported with weight 0 and counted; the model stays
  finite."""
  bad = small_data(num_clients=8, sizes=[3, 11, 6, 9, 4, 12, 7, 5])
  bad = dataclasses.replace(bad, x=bad.x.at[2].set(np.nan))
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=4, buffer_size=2,
                latency_spread=0.0)
  state, step, seen = alg.init(jax.random.key(0), bad), jax.jit(alg.round), False
  for _ in range(12):
    state, m = step(state, bad)
    ids, w = np.asarray(m.clients), np.asarray(m.weights)
    assert int(m.num_nonfinite) == int(np.sum(ids == 2))
    if 2 in ids:
      seen = True
      assert w[ids == 2][0] == 0 and w[ids != 2][0] > 0
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))
  assert seen


def test_latencies_are_lognormal_and_the_counters_integers():
  """d_i = exp(σ z_i), z_i ~ N(0, 1) once per client: the log-durations of 2,000 clients
  have mean ≈ 0 and std ≈ σ; the server's version counters are int32 and count steps."""
  many = small_data(num_clients=2000, sizes=[3] * 2000)
  for sigma in (0.5, 2.0):
    alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=4, buffer_size=2,
                  latency_spread=sigma)
    log_d = np.log(np.asarray(alg.init(jax.random.key(0), many).algorithm.duration, np.float64))
    assert abs(log_d.mean()) < 0.1 * sigma and abs(log_d.std() / sigma - 1) < 0.05
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=3, buffer_size=1)
  state = alg.init(jax.random.key(0), data())
  step = jax.jit(alg.round)
  for t in range(1, 4):
    state, _ = step(state, data())
    a = state.algorithm
    assert (a.steps.dtype, a.version.dtype, a.in_flight.dtype) == (np.int32,) * 3
    assert int(a.steps) == t and int(a.version.max()) == t


def test_dispatch_draws_uniformly_among_the_idle():
  """Each server step dispatches K clients not in flight, uniformly: over 40 steps of
  M = 2, K = 1 among N = 8, every client is dispatched, never one already in flight."""
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=2, buffer_size=1)
  state = alg.init(jax.random.key(0), data())
  step = jax.jit(alg.round)
  dispatched = []
  for _ in range(40):
    before = set(np.asarray(state.algorithm.in_flight).tolist())
    state, m = step(state, data())
    after = np.asarray(state.algorithm.in_flight).tolist()
    assert len(set(after)) == 2                   # the fresh one was not in flight
    fresh = set(after) - (before - {int(m.clients[0])})
    assert len(fresh) == 1
    dispatched += fresh
  assert set(dispatched) == set(range(8))
  assert max(np.bincount(dispatched)) < 15       # not always the lowest idle ids


def test_fedbuff_refuses_a_host_feed():
  """A host feed gathers a cohort drawn ahead from the key; FedBuff's next cohort is the
  state's earliest reports, so it has no `sample` and refuses windowed data."""
  alg = fedbuff(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, concurrency=3, buffer_size=2)
  assert alg.sample is None
  window = dataclasses.replace(data(), window=np.arange(2, dtype=np.int32))
  with pytest.raises(ValueError, match=r"^fedbuff: who reports next depends on the server's "
                     r"simulated clock, so a host feed cannot gather the cohort ahead "
                     r"\(data.window is set\); give it the whole population's data "
                     r"\(no data.store\).$"):
    alg.init(jax.random.key(0), window)
  state = alg.init(jax.random.key(0), data())
  with pytest.raises(ValueError, match=r"^fedbuff: who reports next"):
    alg.round(state, window)
