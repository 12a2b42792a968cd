"""APFL: its global part is FedAvg, its personal step matches NumPy, α = 0 is the global model."""

import jax
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_grad, logreg_loss
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import apfl, fedavg

WORK = fp.LocalWork(3, steps=4)


@pytest.mark.parametrize("client_tx", [optax.sgd(0.1), optax.adamw(0.05, weight_decay=0.5)])
def test_global_model_follows_fedavg_exactly(client_tx):
  """Also with an optimizer that keeps a state and reads the params (AdamW's decay): w and
  v each start their own state from their own params and step with them."""
  data = small_data(num_clients=6)
  kw = dict(clients_per_round=3, execution=fp.Execution(strategy="vmap"))
  a = apfl(logreg(), client_tx, optax.sgd(1.0), WORK, alpha=0.3, **kw)
  f = fedavg(logreg(), client_tx, optax.sgd(1.0), WORK, **kw)
  sa, sf = a.init(jax.random.key(0), data), f.init(jax.random.key(0), data)
  for _ in range(2):
    sa, ma = jax.jit(a.round)(sa, data)
    sf, mf = jax.jit(f.round)(sf, data)
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sf.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(ma.client_train_loss, mf.client_train_loss, rtol=1e-5)


def one_step(alpha, lr, alpha_lr=None, shift=lambda v: v + 0.2):
  """One APFL round of one client and one batch from a shifted v: the state before and
  after, and float64 NumPy copies of the batch, w, b and the client's v (kernel, bias)."""
  data = small_data(num_clients=1, sizes=[7])
  work = fp.LocalWork(4, steps=1)
  alg = apfl(logreg(), optax.sgd(lr), optax.sgd(1.0), work, alpha=alpha, alpha_lr=alpha_lr,
             clients_per_round=1)
  s0 = alg.init(jax.random.key(1), data)
  own = s0.client_states
  s0 = s0._replace(client_states=own._replace(v=jax.tree.map(shift, own.v)))
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  sel = np.asarray(plan.idx[0])[np.asarray(plan.mask[0])]
  x, y = np.asarray(data.x[0], np.float64)[sel], np.asarray(data.y[0])[sel]
  f64 = lambda a: np.asarray(a, np.float64)
  dense, own_dense = s0.params["Dense_0"], s0.client_states.v["Dense_0"]
  return (alg, s1, x, y, f64(dense["kernel"]), f64(dense["bias"]), f64(own_dense["kernel"][0]),
          f64(own_dense["bias"][0]))


def test_one_personal_step_matches_numpy():
  alpha, lr = 0.4, 0.3
  _, s1, x, y, w, b, v, c = one_step(alpha, lr)
  mw, mb = alpha * v + (1 - alpha) * w, alpha * c + (1 - alpha) * b
  gw, gb = logreg_grad(mw, mb, x, y)
  np.testing.assert_allclose(s1.client_states.v["Dense_0"]["kernel"][0], v - lr * alpha * gw,
                             atol=1e-5)
  np.testing.assert_allclose(s1.client_states.v["Dense_0"]["bias"][0], c - lr * alpha * gb,
                             atol=1e-5)
  assert float(s1.client_states.alpha[0]) == pytest.approx(alpha)     # fixed without alpha_lr


def _descended(v):
  """v moved 3 gradient steps' worth down the one client's full-data loss at w_0 (a v
  better than w, so that F falls along α)."""
  data = small_data(num_clients=1, sizes=[7])
  p = logreg().init(jax.random.split(jax.random.key(1))[0])["Dense_0"]
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])
  gw, gb = logreg_grad(np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64),
                       x, y)
  return v - 3.0 * (gw if v.ndim == 3 else gb)[None].astype(v.dtype)   # [clients, ...] leaves


@pytest.mark.parametrize("alpha_lr, better", [(0.05, False), (50.0, False), (50.0, True)])
def test_adaptive_alpha_step_matches_numpy_and_finite_differences(alpha_lr, better):
  """A small step, and large ones that the projection onto [0, 1] stops at 0 (a noisy v)
  and at 1 (a v better than w)."""
  lr, alpha = 0.3, 0.4
  noise = _descended if better else lambda v: v + 0.5 * np.random.default_rng(3).normal(
      size=v.shape).astype(v.dtype)
  alg, s1, x, y, w, b, v, c = one_step(alpha, lr, alpha_lr, shift=noise)
  mixed = lambda a: (a * v + (1 - a) * w, a * c + (1 - a) * b)
  gw, gb = logreg_grad(*mixed(alpha), x, y)
  g_alpha = np.sum((v - w) * gw) + np.sum((c - b) * gb)
  eps = 1e-6                                   # dF/dα by central differences, float64
  fd = (logreg_loss(*mixed(alpha + eps), x, y) - logreg_loss(*mixed(alpha - eps), x, y)) / (
      2 * eps)
  assert g_alpha == pytest.approx(fd, rel=1e-5) and abs(g_alpha) > 1e-3
  want = np.clip(alpha - alpha_lr * g_alpha, 0.0, 1.0)
  assert (want in (0.0, 1.0)) == (alpha_lr > 1)   # the projection acts on the large steps
  assert alpha_lr < 1 or want == (1.0 if better else 0.0)
  assert float(s1.client_states.alpha[0]) == pytest.approx(want, abs=1e-5)
  np.testing.assert_allclose(s1.client_states.v["Dense_0"]["kernel"][0], v - lr * alpha * gw,
                             atol=1e-5)
  personal = alg.personal(s1)                  # the mixture with the client's own α_k
  a1 = float(s1.client_states.alpha[0])
  np.testing.assert_allclose(
      personal["Dense_0"]["kernel"][0],
      a1 * s1.client_states.v["Dense_0"]["kernel"][0]
      + (1 - a1) * s1.params["Dense_0"]["kernel"], atol=1e-6)


def test_alpha_zero_personal_model_is_the_global_one():
  data = small_data(num_clients=4)
  alg = apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=0.0, clients_per_round=2)
  state, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  for v, w in zip(jax.tree.leaves(alg.personal(state)), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(v, np.broadcast_to(w, v.shape))
  for kw, match in ((dict(alpha=1.5), r"alpha \(APFL's mixing weight\) must be in \[0, 1\]; "
                     r"got 1.5.$"),
                    *((dict(alpha=0.5, alpha_lr=lr), r"alpha_lr \(the step of APFL's adaptive "
                      rf"α\) must be a finite number > 0 or None; got {lr}.$")
                      for lr in (0.0, -1, float("inf"), float("nan")))):
    with pytest.raises(ValueError, match="^" + match):
      apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=2, **kw)
  apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=1.0, clients_per_round=2)


def test_adaptive_alpha_from_the_config(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import make_algorithm, make_model, prepare_data

  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "apfl", "mlp", (8,)
  c.apfl.alpha_lr = 0.5
  data = prepare_data(c)
  model = make_model(c.model, data.train.x.shape[2:], data.train.num_classes)
  alg = make_algorithm(c, model, data.train)
  state = alg.init(jax.random.key(0), data.train)
  state, m = jax.jit(alg.round)(state, data.train)
  alphas = np.asarray(state.client_states.alpha)
  moved = alphas != np.float32(c.apfl.alpha)
  assert moved.sum() == c.clients_per_round                 # the sampled clients learned theirs
  assert set(np.flatnonzero(moved)) == set(np.asarray(m.clients).tolist())
  c.apfl.alpha_lr = -1.0
  with pytest.raises(ValueError, match="alpha_lr"):
    make_algorithm(c, model, data.train)


def test_float64_rounds_of_apfl_and_pfedme_match_float32():
  # Float64 parameters flow through both local loops (loss sums, counts, α) unchanged.
  def run(make, x64):
    with jax.enable_x64(x64):
      data = small_data(num_clients=4)
      alg = make()
      state = alg.init(jax.random.key(0), data)
      if x64:
        state = state._replace(
            params=jax.tree.map(lambda p: p.astype(np.float64), state.params),
            client_states=jax.tree.map(lambda p: p.astype(np.float64), state.client_states),
            opt_state=alg.init(jax.random.key(0), data).opt_state)
      state, m = jax.jit(alg.round)(state, data)
      return state, m

  makers = [
      lambda: apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=0.3, alpha_lr=0.5,
                   clients_per_round=2),
      lambda: fp.algorithms.pfedme(logreg(), WORK, learning_rate=0.05,
                                   personal_learning_rate=0.05, lam=5.0, inner_steps=2,
                                   clients_per_round=2)]
  for make in makers:
    s32, m32 = run(make, False)
    s64, m64 = run(make, True)
    assert jax.tree.leaves(s64.params)[0].dtype == np.float64
    for a, b in zip(jax.tree.leaves((s32.params, s32.client_states)),
                    jax.tree.leaves((s64.params, s64.client_states))):
      np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(m32.client_train_loss, m64.client_train_loss, rtol=1e-5)


def test_a_fixed_alpha_is_the_factorys_not_the_states():
  """Without `alpha_lr` the mix uses the α given to `apfl` (a sweep over α reuses one
  state), not the α the state was started with."""
  data = small_data(num_clients=4)
  make = lambda alpha: apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, alpha=alpha,
                            clients_per_round=2)
  state = make(0.5).init(jax.random.key(0), data)
  state = state._replace(client_states=state.client_states._replace(
      v=jax.tree.map(lambda v: v + 1.0, state.client_states.v)))
  pers = make(0.25).personal(state)
  for got, v, w in zip(jax.tree.leaves(pers), jax.tree.leaves(state.client_states.v),
                       jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(got, 0.25 * np.asarray(v) + 0.75 * np.asarray(w), rtol=1e-6)


def test_a_client_whose_v_or_alpha_is_not_finite_is_dropped_whole():
  """A client is finite only if its w, v_k and α_k all are. Client 0's v_k starts at
  3e38: its mixture's logits overflow and v_k becomes NaN while its w stays finite, so
  client 0 alone is dropped (its (v_k, α_k) kept) and the server applies client 1's
  update. A traced η_α = NaN (a diverged sweep) makes every α_k NaN after one step
  while v_k, stepped with the α_k before it, stays finite: both clients are dropped."""
  data = small_data(num_clients=2, sizes=[7, 9])
  work = fp.LocalWork(4, steps=1)
  make = lambda alpha_lr=None: apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), work,
                                    alpha=0.5, alpha_lr=alpha_lr, clients_per_round=2)
  state = make().init(jax.random.key(0), data)
  huge = state._replace(client_states=state.client_states._replace(v=jax.tree.map(
      lambda v: v.at[0].set(3e38), state.client_states.v)))
  new, m = jax.jit(make().round)(huge, data)
  assert int(m.num_nonfinite) == 1
  kept = lambda t: jax.tree.map(lambda a: a[0], t)
  for a, b in zip(jax.tree.leaves(kept(huge.client_states)),
                  jax.tree.leaves(kept(new.client_states)), strict=True):
    np.testing.assert_array_equal(a, b)
  moved = lambda t: np.asarray(jax.tree.leaves(t)[0])
  assert np.all(np.isfinite(moved(new.params)))
  assert not np.array_equal(moved(new.params), moved(huge.params))
  new, m = jax.jit(lambda lr: make(lr).round(state, data))(np.float32(np.nan))
  assert int(m.num_nonfinite) == 2
  for before, after in ((state.client_states, new.client_states), (state.params, new.params)):
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
      np.testing.assert_array_equal(a, b)
