"""Aggregators inside the jitted round: references, non-finite clients, sharding, FedLAW."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import client_deltas
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers.algorithms import fedavg
from fedjax_pers.hypergrad import held_out_loss

WORK = fp.LocalWork(4, epochs=2)


def alg_with(weighting, k=5, strategy="vmap", mesh=None):
  return fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=k,
                weighting=weighting, execution=fp.Execution(strategy=strategy, mesh=mesh))


def test_q_ffl_round_matches_numpy_reference():
  data = small_data()
  q, lr = 1.5, 0.1
  alg = alg_with(agg.q_ffl(q, lr))
  s0 = alg.init(jax.random.key(3), data)
  s1, m = jax.jit(alg.round)(s0, data)
  w, b, clients = client_deltas(s0.params, data, s0.rng, WORK, lr, 5)
  big_l = 1 / lr
  f = np.array([c["loss_before"] for c in clients])
  sq = np.array([np.sum(c["dw"] ** 2) + np.sum(c["db"] ** 2) for c in clients]) * big_l ** 2
  h = q * f ** (q - 1) * sq + big_l * f ** q
  dw = sum(fi ** q * big_l * c["dw"] for fi, c in zip(f, clients)) / h.sum()
  db = sum(fi ** q * big_l * c["db"] for fi, c in zip(f, clients)) / h.sum()
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w + dw, atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b + db, atol=1e-5)
  np.testing.assert_allclose(m.weights, f ** q / np.sum(f ** q), rtol=1e-5)


def test_loss_improvement_round_uses_losses_before_and_after():
  data = small_data()
  alg = alg_with(agg.loss_improvement(0.5))
  s0 = alg.init(jax.random.key(4), data)
  s1, m = jax.jit(alg.round)(s0, data)
  w, b, clients = client_deltas(s0.params, data, s0.rng, WORK, 0.1, 5)
  gain = np.array([c["loss_before"] - c["loss_after"] for c in clients]) / 0.5
  p = np.exp(gain - gain.max())
  p /= p.sum()
  np.testing.assert_allclose(m.weights, p, rtol=2e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             w + sum(pi * c["dw"] for pi, c in zip(p, clients)), atol=1e-5)


def test_scaled_updates_attack_scales_the_named_clients():
  data = small_data()
  bad = np.zeros(data.num_clients, bool)
  bad[[0, 3]] = True
  alg = alg_with(agg.scaled_updates(agg.uniform(), bad, -10.0))
  s0 = alg.init(jax.random.key(5), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  w, _, clients = client_deltas(s0.params, data, s0.rng, WORK, 0.1, 5)
  want = w + np.mean([(-10.0 if bad[c["id"]] else 1.0) * c["dw"] for c in clients], 0)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], want, atol=1e-5)


def poisoned_data():
  """Client 2's features hold an inf: its update is NaN whatever the model."""
  data = small_data(num_clients=6, sizes=[6, 5, 7, 4, 8, 6])
  return dataclasses.replace(data, x=data.x.at[2, 0, 0].set(jnp.inf))


ALL = {
    "num_examples": agg.num_examples, "uniform": agg.uniform, "loss": agg.loss,
    "loss_improvement": agg.loss_improvement, "cosine": agg.cosine, "fedadp": agg.fedadp,
    "label_divergence": agg.label_divergence, "label_entropy": agg.label_entropy,
    "median": agg.median, "trimmed_mean": lambda: agg.trimmed_mean(0.2),
    "krum": lambda: agg.krum(1), "multi_krum": lambda: agg.multi_krum(1),
    "clip_norm": lambda: agg.clip_norm(0.5), "q_ffl": lambda: agg.q_ffl(1.0, 0.1),
    "fedlaw": lambda: agg.fedlaw(logreg(), np.ones((4, 5), np.float32), np.arange(4) % 3,
                                 steps=3),
    "auto": lambda: agg.auto(held_out_loss(logreg(), np.ones((4, 5), np.float32),
                                           np.arange(4) % 3), steps=3),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_nonfinite_clients_are_excluded_and_counted(name, strategy):
  data = poisoned_data()
  alg = alg_with(ALL[name](), k=6, strategy=strategy)
  state = alg.init(jax.random.key(0), data)
  step = jax.jit(alg.round)
  for _ in range(3):
    state, m = step(state, data)
    assert int(m.num_nonfinite) == 1
    w = np.asarray(m.weights)
    assert w[np.asarray(m.clients) == 2] == 0 and abs(w.sum() - 1) < 1e-6
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))
  assert step._cache_size() == 1           # no recompilation after the first round


@pytest.mark.parametrize("name", ["fedadp", "median", "krum", "q_ffl", "cosine"])
def test_sharded_cohort_gives_the_same_round(name):
  data = small_data(num_clients=8)
  mesh = fp.distributed.client_mesh(2)
  runs = []
  for m in (None, mesh):
    alg = alg_with(ALL[name](), k=5, mesh=m)
    state = alg.init(jax.random.key(2), data)
    for _ in range(2):
      state, metrics = jax.jit(alg.round)(state, data)
    runs.append((state, metrics))
  (s1, m1), (s2, m2) = runs
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], s2.params["Dense_0"]["kernel"],
                             atol=1e-6)
  np.testing.assert_allclose(m1.weights, m2.weights, atol=1e-6)


# ----------------------------------------------------------------- FedLAW


def fedlaw_setup(dtype):
  data = small_data(num_clients=5, sizes=[6, 5, 7, 4, 8])
  model = logreg()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3, dtype),
                        model.init(jax.random.key(0)))
  deltas = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(5,) + p.shape) * 0.5, dtype),
                        params)
  x = jnp.asarray(rng.normal(size=(12, 5)), dtype)
  y = jnp.asarray(rng.integers(0, 3, 12))
  finite = jnp.asarray([True, True, False, True, True])
  return model, params, deltas, finite, x, y, data


def test_fedlaw_gradient_matches_finite_differences_float64():
  with jax.enable_x64(True):
    model, params, deltas, finite, x, y, _ = fedlaw_setup(jnp.float64)
    theta = jnp.asarray([0.3, -0.2, 0.0, 0.5, -0.4], jnp.float64)
    log_gamma = jnp.asarray(-0.1, jnp.float64)
    f = lambda th, lg: agg.fedlaw_objective(model, params, deltas, finite, th, lg, x, y)
    g_theta, g_gamma = jax.grad(f, argnums=(0, 1))(theta, log_gamma)
    eps = 1e-6
    fd = np.array([(f(theta.at[i].add(eps), log_gamma) - f(theta.at[i].add(-eps), log_gamma))
                   / (2 * eps) for i in range(5)])
    fd_gamma = (f(theta, log_gamma + eps) - f(theta, log_gamma - eps)) / (2 * eps)
    assert g_theta.dtype == jnp.float64
    rel = np.max(np.abs(np.asarray(g_theta) - fd)) / np.max(np.abs(fd))
    assert rel < 1e-4, rel
    assert abs(float(g_gamma) - float(fd_gamma)) / abs(float(fd_gamma)) < 1e-4
    assert float(g_theta[2]) == 0.0          # the non-finite client has no say


def test_fedlaw_aggregate_is_gamma_times_weighted_models():
  model, params, deltas, finite, x, y, _ = fedlaw_setup(jnp.float32)
  theta = jnp.asarray([0.3, -0.2, 5.0, 0.5, -0.4])
  got = agg.fedlaw_aggregate(params, deltas, finite, theta, jnp.asarray(-0.2))
  lam = np.exp(np.asarray(theta)) * np.asarray(finite)
  lam /= lam.sum()
  for p, d, g in zip(jax.tree.leaves(params), jax.tree.leaves(deltas), jax.tree.leaves(got)):
    models = np.asarray(p)[None] + np.asarray(d)
    want = np.exp(-0.2) * np.tensordot(lam, models, axes=1)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_fedlaw_learning_lowers_the_proxy_loss():
  model, params, deltas, finite, x, y, _ = fedlaw_setup(jnp.float32)
  n = jnp.asarray([6, 5, 7, 4, 8])
  out = fp.core.ClientOutput(delta=deltas, num_examples=n, train_loss=None, num_steps=None,
                             label_hist=None, finite=finite, client_id=jnp.arange(5))
  a = agg.fedlaw(model, x, y, steps=50)
  delta, w, state = jax.jit(a.apply)(out, a.init(5), params)
  learned = jax.tree.map(jnp.add, params, delta)
  fedavg_w = np.where(finite, n, 0) / np.sum(np.where(finite, n, 0))
  fedavg_model = jax.tree.map(lambda p, d: p + jnp.tensordot(jnp.asarray(fedavg_w, p.dtype), d,
                                                                 axes=1), params, deltas)
  proxy = lambda p: float(jnp.mean(model.loss(model.apply(p, x), y)))
  assert proxy(learned) < proxy(fedavg_model) - 1e-3
  assert abs(float(np.sum(w)) - 1) < 1e-6 and float(w[2]) == 0
  assert float(state.gamma) > 0


def test_fedlaw_in_a_round():
  data = small_data(num_clients=6)
  model = logreg()
  a = agg.fedlaw(model, data.x[0, :5], data.y[0, :5], steps=5)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=4, weighting=a)
  state = alg.init(jax.random.key(0), data)
  state, m = jax.jit(alg.round)(state, data)
  assert abs(float(np.sum(m.weights)) - 1) < 1e-6
  with pytest.raises(ValueError, match="proxy"):
    agg.fedlaw(model, data.x[0, :5], data.y[0, :4])


def test_fedlaw_starts_from_the_fedavg_weights():
  """With a learning rate of 0 the learned weights stay where they start: λ = n_i / Σ n_j
  over the finite clients and γ = 1, so the aggregate is FedAvg's (uniform would not be)."""
  model, params, deltas, finite, x, y, _ = fedlaw_setup(jnp.float32)
  n = jnp.asarray([6, 5, 7, 2, 9])
  out = fp.core.ClientOutput(delta=deltas, num_examples=n, train_loss=None, num_steps=None,
                             label_hist=None, finite=finite, client_id=jnp.arange(5))
  a = agg.fedlaw(model, x, y, steps=3, optimizer=optax.sgd(0.0))
  delta, w, state = jax.jit(a.apply)(out, a.init(5), params)
  want = np.where(finite, n, 0) / np.sum(np.where(finite, n, 0))
  np.testing.assert_allclose(w, want, rtol=1e-6)
  assert float(state.gamma) == 1.0
  for d, got in zip(jax.tree.leaves(deltas), jax.tree.leaves(delta)):
    np.testing.assert_allclose(got, np.tensordot(want, np.nan_to_num(np.asarray(d)), axes=1),
                               rtol=1e-5, atol=1e-6)
