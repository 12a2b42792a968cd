"""The round: strategies against a NumPy reference, invariants, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import fedavg_round

import fedjax_pers as fp
from fedjax_pers.algorithms import fedavg, fedprox
from fedjax_pers.core._round import cohort_state_change, zero_client_states


def small_data(num_clients=6, sizes=None, dim=5, num_classes=3, seed=0, max_examples=None):
  rs = np.random.RandomState(seed)
  sizes = sizes or [int(s) for s in rs.randint(3, 12, num_clients)]
  xs = [rs.normal(size=(n, dim)).astype(np.float32) for n in sizes]
  ys = [rs.randint(0, num_classes, n) for n in sizes]
  return fp.FederatedData.from_clients(xs, ys, num_classes=num_classes,
                                       max_examples=max_examples)


def logreg(dim=5, num_classes=3):
  return fp.models.logistic_regression((dim,), num_classes)


def make_alg(strategy="vmap", work=fp.LocalWork(4, epochs=2), k=4, mu=None, chunk=None,
             weighting=None, server=None, lr=0.1):
  return fedavg(logreg(), optax.sgd(lr), server or optax.sgd(1.0), work,
                clients_per_round=k, execution=fp.Execution(strategy=strategy, client_chunk=chunk),
                weighting=weighting, prox_mu=mu)


def run(alg, data, rounds=1, seed=0):
  state = alg.init(jax.random.key(seed), data)
  step = jax.jit(alg.round)
  metrics = []
  for _ in range(rounds):
    state, m = step(state, data)
    metrics.append(m)
  return state, metrics


STRATS = [("vmap", None), ("chunked", 3), ("chunked", 4), ("scan", None)]


@pytest.mark.parametrize("strategy,chunk", STRATS)
@pytest.mark.parametrize("work", [fp.LocalWork(4, epochs=2), fp.LocalWork(3, steps=7)])
@pytest.mark.parametrize("mu", [None, 0.5])
def test_strategies_match_numpy_reference(strategy, chunk, work, mu):
  data = small_data()
  alg = make_alg(strategy, work, k=4, mu=mu, chunk=chunk)
  state0 = alg.init(jax.random.key(1), data)
  state1, m = jax.jit(alg.round)(state0, data)
  w, b, weights, losses = fedavg_round(state0.params, data, state0.rng, work, 0.1, 4, mu)
  np.testing.assert_allclose(state1.params["Dense_0"]["kernel"], w, atol=1e-5)
  np.testing.assert_allclose(state1.params["Dense_0"]["bias"], b, atol=1e-5)
  np.testing.assert_allclose(m.weights, weights, atol=1e-6)
  np.testing.assert_allclose(m.client_train_loss, losses, rtol=1e-5)


def test_all_strategies_agree_over_rounds():
  data = small_data(num_clients=8)
  finals = {}
  for strategy, chunk in STRATS + [("auto", None)]:
    state, _ = run(make_alg(strategy, k=5, chunk=chunk, server=optax.adam(0.05)), data, 3)
    finals[(strategy, chunk)] = state.params
  ref = finals[("vmap", None)]
  for key, params in finals.items():
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(key))


def test_uniform_weighting_matches_reference():
  data = small_data()
  alg = make_alg("scan", k=6, weighting=fp.aggregation.uniform())
  state0 = alg.init(jax.random.key(2), data)
  state1, m = jax.jit(alg.round)(state0, data)
  w, _, weights, _ = fedavg_round(state0.params, data, state0.rng, fp.LocalWork(4, epochs=2),
                                  0.1, 6, weighting="uniform")
  np.testing.assert_allclose(m.weights, weights, atol=1e-6)
  np.testing.assert_allclose(state1.params["Dense_0"]["kernel"], w, atol=1e-5)


def test_server_momentum_is_fedavgm():
  data = small_data()
  beta, lr = 0.9, 0.7
  alg = make_alg("vmap", server=optax.sgd(lr, momentum=beta))
  plain = make_alg("vmap")
  state = alg.init(jax.random.key(3), data)
  mom = jax.tree.map(jnp.zeros_like, state.params)
  for _ in range(3):
    # The plain FedAvg round from the same params and rng gives the same Δ.
    ref_state, _ = jax.jit(plain.round)(
        state._replace(opt_state=plain.init(jax.random.key(0), data).opt_state), data)
    delta = jax.tree.map(jnp.subtract, ref_state.params, state.params)
    mom = jax.tree.map(lambda m, d: beta * m - d, mom, delta)
    expected = jax.tree.map(lambda p, m: p - lr * m, state.params, mom)
    state, _ = jax.jit(alg.round)(state, data)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("strategy,chunk", STRATS)
@pytest.mark.parametrize("work", [fp.LocalWork(4, epochs=2), fp.LocalWork(3, steps=5)])
def test_padding_does_not_change_results(strategy, chunk, work):
  data = small_data()
  padded = small_data(max_examples=2 * data.max_examples)
  assert padded.max_examples == 2 * data.max_examples
  s1, m1 = run(make_alg(strategy, work, chunk=chunk), data, 2)
  s2, m2 = run(make_alg(strategy, work, chunk=chunk), padded, 2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m1[-1].client_train_loss, m2[-1].client_train_loss, rtol=1e-6)


def test_padded_examples_never_reach_the_loss():
  """Garbage (huge) values in padded slots change nothing."""
  data = small_data()
  valid = np.arange(data.max_examples)[None, :] < np.asarray(data.num_examples)[:, None]
  dirty = data.__class__(
      x=jnp.where(valid[..., None], data.x, 1e6), y=jnp.where(valid, data.y, 2),
      num_examples=data.num_examples, num_classes=data.num_classes,
      min_examples=data.min_examples)
  s1, _ = run(make_alg(), data, 2)
  s2, _ = run(make_alg(), dirty, 2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  e1 = fp.core.evaluate(logreg(), s1.params, data)
  e2 = fp.core.evaluate(logreg(), s1.params, dirty)
  np.testing.assert_array_equal(e1.accuracy, e2.accuracy)
  np.testing.assert_array_equal(e1.loss, e2.loss)


def test_same_seed_same_metrics_and_different_seed_differs():
  data = small_data()
  _, m1 = run(make_alg(), data, 3, seed=5)
  _, m2 = run(make_alg(), data, 3, seed=5)
  _, m3 = run(make_alg(), data, 3, seed=6)
  for a, b in zip(m1, m2):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(m1[-1].clients, m3[-1].clients) or not np.allclose(
      m1[-1].train_loss, m3[-1].train_loss)


@pytest.mark.parametrize("strategy,chunk", STRATS)
def test_second_round_does_not_recompile(strategy, chunk):
  data = small_data()
  alg = make_alg(strategy, chunk=chunk)
  traces = []
  step = jax.jit(lambda s, d: (traces.append(1), alg.round(s, d))[1])
  state = alg.init(jax.random.key(0), data)
  for _ in range(3):
    state, _ = step(state, data)
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_fedprox_mu_zero_equals_fedavg():
  data = small_data()
  s1, _ = run(make_alg("vmap"), data, 2)
  s2, _ = run(fedprox(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=2),
                      mu=0.0, clients_per_round=4, execution=fp.Execution(strategy="vmap")),
              data, 2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_fedprox_is_fedavg_with_its_proximal_term():
  data = small_data()
  kw = dict(clients_per_round=4, execution=fp.Execution(strategy="vmap"))
  args = (logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=2))
  s1, _ = run(fedprox(*args, mu=2.0, **kw), data, 2)
  s2, _ = run(fedavg(*args, prox_mu=2.0, **kw), data, 2)
  s3, _ = run(fedavg(*args, **kw), data, 2)
  for a, b, c in zip(*(jax.tree.leaves(s.params) for s in (s1, s2, s3))):
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_fedprox_pulls_towards_global_model():
  data = small_data()
  s0 = make_alg().init(jax.random.key(0), data)
  drift = []
  for mu in (0.0, 10.0):
    s1, _ = jax.jit(make_alg(mu=mu, work=fp.LocalWork(4, epochs=5)).round)(s0, data)
    drift.append(float(sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)))))
  assert drift[1] < 0.5 * drift[0]


def test_nonfinite_client_is_excluded_and_counted():
  data = small_data(num_clients=4)
  # Client 0 gets labels whose huge learning rate blows up; simpler: poison x.
  x = np.asarray(data.x).copy()
  x[0, : int(data.num_examples[0])] = 1e30
  poisoned = data.__class__(x=jnp.asarray(x), y=data.y, num_examples=data.num_examples,
                            num_classes=data.num_classes, min_examples=data.min_examples)
  for strategy in ("vmap", "scan"):
    alg = make_alg(strategy, k=4, lr=1e10)
    state, ms = run(alg, poisoned, 1)
    m = ms[0]
    assert int(m.num_nonfinite) >= 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    bad = ~np.isfinite(np.asarray(m.client_train_loss)) | (np.asarray(m.weights) == 0)
    assert np.isclose(float(np.sum(m.weights)), 1.0) or int(m.num_nonfinite) == 4
    assert bad.sum() >= int(m.num_nonfinite)




@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clients_per_round=0), "clients_per_round"),
        (dict(clients_per_round=99), r"clients_per_round.*\[1, 6\]"),
        (dict(execution="vmap"), "execution must be a fedjax_pers.Execution; got str"),
        (dict(prox_mu=-1.0), "prox_mu"),
        (dict(work=fp.LocalWork(0, epochs=1)), "batch_size"),
        (dict(work=fp.LocalWork(4)), "Exactly one of local epochs and local steps"),
        (dict(work=fp.LocalWork(4, epochs=1, steps=2)), "Exactly one"),
        (dict(work=fp.LocalWork(4, epochs=0)), "local epochs must be a positive int"),
        (dict(work=fp.LocalWork(4, steps=0)), "local steps must be a positive int"),
    ])
def test_bad_algorithm_arguments(kwargs, match):
  data = small_data()
  args = dict(clients_per_round=4, work=fp.LocalWork(4, epochs=1))
  args.update(kwargs)
  work = args.pop("work")
  with pytest.raises(ValueError, match=match):
    alg = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, **args)
    alg.init(jax.random.key(0), data)


def test_per_client_state_helpers_by_hand():
  """Zero states of the params' shapes and dtypes; the cohort's total change gathers the
  cohort's rows, or sums a window's slots."""
  params = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.int32)}
  z = zero_client_states(params, 5)
  assert (z["a"].shape, z["a"].dtype, z["b"].shape, z["b"].dtype) == (
      (5, 2, 3), np.float32, (5, 4), np.int32)
  assert not np.any(z["a"]) and not np.any(z["b"])
  rs = np.random.RandomState(0)
  s0, s1 = rs.normal(size=(6, 2)), rs.normal(size=(6, 2))
  state = fp.core.ServerState(None, None, None, None, None, None, ())
  before, after = state._replace(client_states=s0), state._replace(client_states=s1)
  np.testing.assert_allclose(cohort_state_change(before, after, jnp.array([4, 1])),
                             s1[4] - s0[4] + s1[1] - s0[1], rtol=1e-6)
  window = lambda s: state._replace(client_states=fp.core.ClientWindow(s[:3]))
  np.testing.assert_allclose(cohort_state_change(window(s0), window(s1), jnp.array([9])),
                             (s1[:3] - s0[:3]).sum(0), rtol=1e-6)


def test_served_is_the_algorithms_global_model():
  data, work = small_data(), fp.LocalWork(4, epochs=1)
  a = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=2)
  s = a.init(jax.random.key(0), data)
  assert a.serve is None and fp.core.served(a, s) is s.params
  ifca = fp.algorithms.ifca(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, num_clusters=2,
                            clients_per_round=2)
  s = ifca.init(jax.random.key(0), data)
  got, want = fp.core.served(ifca, s), ifca.serve(s)   # one cluster's model, not the stack
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w, stacked in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(s.params)):
    np.testing.assert_array_equal(g, w)
    assert g.shape == stacked.shape[1:]
