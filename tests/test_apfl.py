"""APFL: its global part is FedAvg, its personal step matches NumPy, α = 0 is the global model."""

import jax
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_grad
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import apfl, fedavg

WORK = fp.LocalWork(3, steps=4)


def test_global_model_follows_fedavg_exactly():
  data = small_data(num_clients=6)
  kw = dict(clients_per_round=3, strategy="vmap")
  a = apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=0.3, **kw)
  f = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, **kw)
  sa, sf = a.init(jax.random.key(0), data), f.init(jax.random.key(0), data)
  for _ in range(2):
    sa, ma = jax.jit(a.round)(sa, data)
    sf, mf = jax.jit(f.round)(sf, data)
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sf.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(ma.client_train_loss, mf.client_train_loss, rtol=1e-5)


def test_one_personal_step_matches_numpy():
  data = small_data(num_clients=1, sizes=[7])
  work = fp.LocalWork(4, steps=1)
  alpha, lr = 0.4, 0.3
  alg = apfl(logreg(), optax.sgd(lr), optax.sgd(1.0), work, alpha=alpha, clients_per_round=1)
  s0 = alg.init(jax.random.key(1), data)
  s0 = s0._replace(client_states=jax.tree.map(lambda v: v + 0.2, s0.client_states))
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  sel = np.asarray(plan.idx[0])[np.asarray(plan.mask[0])]
  x, y = np.asarray(data.x[0], np.float64)[sel], np.asarray(data.y[0])[sel]
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  v = np.asarray(s0.client_states["Dense_0"]["kernel"][0], np.float64)
  c = np.asarray(s0.client_states["Dense_0"]["bias"][0], np.float64)
  mw, mb = alpha * v + (1 - alpha) * w, alpha * c + (1 - alpha) * b
  gw, gb = logreg_grad(mw, mb, x, y)
  v_new = v - lr * alpha * gw
  c_new = c - lr * alpha * gb
  np.testing.assert_allclose(s1.client_states["Dense_0"]["kernel"][0], v_new, atol=1e-5)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["bias"][0], c_new, atol=1e-5)


def test_alpha_zero_personal_model_is_the_global_one():
  data = small_data(num_clients=4)
  alg = apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=0.0, clients_per_round=2)
  state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  for v, w in zip(jax.tree.leaves(alg.personal(state)), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(v, np.broadcast_to(w, v.shape))
  with pytest.raises(ValueError, match="alpha"):
    apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=1.5, clients_per_round=2)
