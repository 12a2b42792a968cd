"""FedDyn: two rounds against NumPy (one client a round of two, three rounds), one compilation, the
config."""

import jax
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_grad
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import feddyn
from fedjax_pers.experiment import train_and_evaluate


def test_three_rounds_against_numpy():
  """θ ← θ − η (∇L_k(θ) − g_k + α (θ − θ^{t−1})); g_k ← g_k − α Δ_k;
  h ← h − (α/N) Δ_k; θ^t = θ^{t−1} + Δ_k − h/α."""
  data = small_data(num_clients=2, sizes=[7, 9])
  work = fp.LocalWork(3, epochs=1)
  eta, alpha = 0.2, 0.3
  alg = feddyn(logreg(), optax.sgd(eta), work, alpha=alpha, clients_per_round=1)
  state = alg.init(jax.random.key(5), data)
  step = jax.jit(alg.round)
  f64 = lambda a: np.asarray(a, np.float64)
  w, b = f64(state.params["Dense_0"]["kernel"]), f64(state.params["Dense_0"]["bias"])
  hw, hb = np.zeros_like(w), np.zeros_like(b)
  gw, gb = np.zeros((2,) + w.shape), np.zeros((2,) + b.shape)
  seen = []
  for _ in range(3):   # two clients, three rounds: one comes back with its own state
    rng = state.rng
    state, m = step(state, data)
    (i,) = np.asarray(m.clients)
    seen.append(int(i))
    plan = engine_plan(rng, data, work, i)
    xs, ys = f64(data.x[i]), np.asarray(data.y[i])
    tw, tb = w.copy(), b.copy()
    for idx, mask in zip(np.asarray(plan.idx), np.asarray(plan.mask)):
      if not mask.any():
        continue
      dw, db = logreg_grad(tw, tb, xs[idx[mask]], ys[idx[mask]])
      tw, tb = (tw - eta * (dw - gw[i] + alpha * (tw - w)),
                tb - eta * (db - gb[i] + alpha * (tb - b)))
    gw[i], gb[i] = gw[i] - alpha * (tw - w), gb[i] - alpha * (tb - b)
    hw, hb = hw - alpha * (tw - w) / 2, hb - alpha * (tb - b) / 2
    w, b = tw - hw / alpha, tb - hb / alpha
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w, atol=1e-5)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], b, atol=1e-5)
    np.testing.assert_allclose(state.client_states["Dense_0"]["kernel"], gw, atol=1e-5)
    np.testing.assert_allclose(state.algorithm["Dense_0"]["kernel"], hw, atol=1e-5)
  assert len(set(seen)) < len(seen)
  assert step._cache_size() == 1


def test_an_overflowing_gradient_state_excludes_the_client():
  """∇L_i⁺ = ∇L_i − α(θ − w_t) is the client's result too: with α = 1e38 one step of
  length ~10 leaves θ finite but overflows ∇L_i⁺, so every client is counted non-finite,
  the model does not move and no state is written back."""
  data = small_data(num_clients=4)
  alg = feddyn(logreg(), optax.sgd(10.0), fp.LocalWork(3, steps=1), alpha=1e38,
               clients_per_round=4)
  s0 = alg.init(jax.random.key(0), data)
  s1, m = jax.jit(alg.round)(s0, data)
  assert int(m.num_nonfinite) == 4
  for a, b in zip(jax.tree.leaves((s0.params, s0.client_states)),
                  jax.tree.leaves((s1.params, s1.client_states))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.run
def test_feddyn_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "feddyn"
  c.feddyn.alpha = 0.1
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["rounds"] == 4 and np.isfinite(s["final_test_loss"])


def test_feddyn_refuses_alpha_zero(tmp_path):
  c = tiny_config()
  c.algorithm = "feddyn"
  c.feddyn.alpha = 0.0
  with pytest.raises(ValueError, match="alpha \\(FedDyn's α\\) must be a number > 0"):
    train_and_evaluate(c, str(tmp_path / "zero"))
