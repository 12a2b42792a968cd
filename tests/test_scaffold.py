"""SCAFFOLD: x* is its fixed point on heterogeneous quadratics (not FedAvg's), two rounds
against NumPy, no recompilation, the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_grad, logreg_loss
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers.algorithms import fedavg, scaffold
from fedjax_pers.experiment import train_and_evaluate

D = 3


def quadratic_model():
  """f(x) = mean_j ½ (a_jᵀ x − b_j)² over a client's rows [a_j, b_j]."""
  return fp.Model(init=lambda key: {"w": jnp.zeros(D, jnp.float32)},
                  apply=lambda p, x, key=None, train=False: x[:, :D] @ p["w"] - x[:, D],
                  loss=lambda r, y: 0.5 * r ** 2, metrics=lambda r, y: jnp.zeros_like(r))


def quadratics(n=6, clients=4, seed=0):
  rng = np.random.default_rng(seed)
  a = [rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0) for _ in range(clients)]
  b = [rng.normal(size=n) + 3.0 * i for i in range(clients)]   # heterogeneous optima
  xs = [np.concatenate([ai, bi[:, None]], 1).astype(np.float32) for ai, bi in zip(a, b)]
  data = fp.FederatedData.from_clients(xs, [np.zeros(n, np.int32)] * clients, num_classes=1)
  big_a, big_b = np.concatenate(a), np.concatenate(b)
  x_star = np.linalg.lstsq(big_a, big_b, rcond=None)[0]
  grads = [ai.T @ (ai @ x_star - bi) / n for ai, bi in zip(a, b)]
  return data, x_star, np.asarray(grads)


def test_the_minimiser_is_a_fixed_point_of_scaffold_not_of_fedavg():
  """c_i = ∇f_i(x*), c = 0: every corrected step is g_i(x*) − c_i + c = 0 (K = 5 > 1)."""
  data, x_star, grads = quadratics()
  assert np.abs(grads.sum(0)).max() < 1e-9 and np.abs(grads).max() > 0.5
  work = fp.LocalWork(6, steps=5)   # full batches: exact local gradients
  s = scaffold(quadratic_model(), work, learning_rate=0.05, clients_per_round=4)
  s0 = s.init(jax.random.key(0), data)
  s0 = s0._replace(params={"w": jnp.asarray(x_star, jnp.float32)},
                   client_states={"w": jnp.asarray(grads, jnp.float32)})
  s1, _ = jax.jit(s.round)(s0, data)
  np.testing.assert_allclose(s1.params["w"], x_star, atol=2e-5)
  np.testing.assert_allclose(s1.client_states["w"], grads, atol=2e-4)
  np.testing.assert_allclose(s1.algorithm["w"], 0.0, atol=2e-5)
  f = fedavg(quadratic_model(), optax.sgd(0.05), optax.sgd(1.0), work, clients_per_round=4,
             weighting=agg.uniform())
  f0 = f.init(jax.random.key(0), data)._replace(params={"w": jnp.asarray(x_star, jnp.float32)})
  f1, _ = jax.jit(f.round)(f0, data)
  assert np.abs(np.asarray(f1.params["w"]) - x_star).max() > 1e-2   # client drift


def test_three_rounds_against_numpy():
  """N = 2, one client a round for three rounds: y ← y − η (g − c_i + c);
  c_i⁺ = c_i − c + (x − y)/(K η); x ← x + Δy; c ← c + Δc_i / N."""
  data = small_data(num_clients=2, sizes=[7, 9])
  work = fp.LocalWork(3, epochs=1)
  eta = 0.2
  alg = scaffold(logreg(), work, learning_rate=eta, clients_per_round=1)
  state = alg.init(jax.random.key(4), data)
  step = jax.jit(alg.round)
  f64 = lambda a: np.asarray(a, np.float64)
  w, b = f64(state.params["Dense_0"]["kernel"]), f64(state.params["Dense_0"]["bias"])
  cw, cb = np.zeros_like(w), np.zeros_like(b)
  ciw, cib = np.zeros((2,) + w.shape), np.zeros((2,) + b.shape)
  seen = []
  for _ in range(3):   # two clients, three rounds: one comes back with its own state
    rng = state.rng
    state, m = step(state, data)
    (i,) = np.asarray(m.clients)
    seen.append(int(i))
    plan = engine_plan(rng, data, work, i)
    xs, ys = f64(data.x[i]), np.asarray(data.y[i])
    yw, yb, k = w.copy(), b.copy(), 0
    for idx, mask in zip(np.asarray(plan.idx), np.asarray(plan.mask)):
      if not mask.any():
        continue
      gw, gb = logreg_grad(yw, yb, xs[idx[mask]], ys[idx[mask]])
      yw, yb, k = yw - eta * (gw - ciw[i] + cw), yb - eta * (gb - cib[i] + cb), k + 1
    new_w, new_b = ciw[i] - cw + (w - yw) / (k * eta), cib[i] - cb + (b - yb) / (k * eta)
    cw, cb = cw + (new_w - ciw[i]) / 2, cb + (new_b - cib[i]) / 2
    ciw[i], cib[i] = new_w, new_b
    w, b = yw, yb
    np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w, atol=1e-5)
    np.testing.assert_allclose(state.params["Dense_0"]["bias"], b, atol=1e-5)
    np.testing.assert_allclose(state.client_states["Dense_0"]["kernel"], ciw, atol=1e-4)
    np.testing.assert_allclose(state.algorithm["Dense_0"]["bias"], cb, atol=1e-4)
  assert len(set(seen)) < len(seen)
  assert step._cache_size() == 1


@pytest.mark.run
def test_scaffold_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "scaffold"
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["rounds"] == 4 and np.isfinite(s["final_test_loss"])


def test_scaffold_refusals(tmp_path):
  c = tiny_config()
  c.algorithm = "scaffold"
  c.client.optimizer = "adam"
  with pytest.raises(ValueError, match="algorithm='scaffold' takes plain SGD steps"):
    train_and_evaluate(c, str(tmp_path / "adam"))
  with pytest.raises(ValueError, match="learning_rate"):
    scaffold(logreg(), fp.LocalWork(3, steps=1), learning_rate=0.0, clients_per_round=1)


def _scaffold_reference(state, data, work, eta, eta_g, cohorts):
  """NumPy SCAFFOLD rounds with data-size weights and server SGD of rate η_g: returns the
  params, each round's c_i, c and the example-weighted train loss."""
  f64 = lambda a: np.asarray(a, np.float64)
  w, b = f64(state.params["Dense_0"]["kernel"]), f64(state.params["Dense_0"]["bias"])
  n_clients = data.num_clients
  cw, cb = np.zeros_like(w), np.zeros_like(b)
  ciw, cib = np.zeros((n_clients,) + w.shape), np.zeros((n_clients,) + b.shape)
  out = []
  for rng, cohort in cohorts:
    n = np.asarray(data.num_examples, np.float64)[cohort]
    p = n / n.sum()
    dw, db, losses, moved_w, moved_b = 0.0, 0.0, [], 0.0, 0.0
    for pi, i in zip(p, cohort):
      plan = engine_plan(rng, data, work, i)
      xs, ys = f64(data.x[i]), np.asarray(data.y[i])
      yw, yb, k, loss_sum, count = w.copy(), b.copy(), 0, 0.0, 0
      for idx, mask in zip(np.asarray(plan.idx), np.asarray(plan.mask)):
        if not mask.any():
          continue
        xb, yb_ = xs[idx[mask]], ys[idx[mask]]
        loss_sum += logreg_loss(yw, yb, xb, yb_) * len(yb_)
        count += len(yb_)
        gw, gb = logreg_grad(yw, yb, xb, yb_)
        yw, yb, k = yw - eta * (gw - ciw[i] + cw), yb - eta * (gb - cib[i] + cb), k + 1
      new_w, new_b = ciw[i] - cw + (w - yw) / (k * eta), cib[i] - cb + (b - yb) / (k * eta)
      moved_w, moved_b = moved_w + new_w - ciw[i], moved_b + new_b - cib[i]
      ciw[i], cib[i] = new_w, new_b
      dw, db = dw + pi * (yw - w), db + pi * (yb - b)
      losses.append(loss_sum / count)
    w, b = w + eta_g * dw, b + eta_g * db
    cw, cb = cw + moved_w / n_clients, cb + moved_b / n_clients
    out.append((w.copy(), b.copy(), ciw.copy(), cw.copy(), float(np.dot(p, losses)), p))
  return out


def test_server_rate_data_size_weights_and_per_client_steps_against_numpy():
  """The options the paper's Algorithm 1 leaves open: η_g (server SGD), weights by data
  size, each client its own K_i (one of them a single step: c_i⁺ uses K_i = 1)."""
  data = small_data(num_clients=4, sizes=[5, 9, 7, 4])
  work = fp.LocalWork(3, steps=(1, 2, 3, 2))
  eta, eta_g = 0.2, 0.5
  alg = scaffold(logreg(), work, learning_rate=eta, clients_per_round=2,
                 server_tx=optax.sgd(eta_g), weighting=agg.num_examples())
  state = alg.init(jax.random.key(3), data)
  step = jax.jit(alg.round)
  cohorts, got = [], []
  for _ in range(4):
    rng = state.rng
    state, m = step(state, data)
    cohorts.append((rng, [int(i) for i in np.asarray(m.clients)]))
    got.append((state, m))
  assert {i for _, c in cohorts for i in c} == {0, 1, 2, 3}
  want = _scaffold_reference(alg.init(jax.random.key(3), data), data, work, eta, eta_g,
                             cohorts)
  for (s, m), (w, b, ciw, cw, loss, p) in zip(got, want):
    np.testing.assert_allclose(s.params["Dense_0"]["kernel"], w, atol=1e-5)
    np.testing.assert_allclose(s.params["Dense_0"]["bias"], b, atol=1e-5)
    np.testing.assert_allclose(s.client_states["Dense_0"]["kernel"], ciw, atol=1e-4)
    np.testing.assert_allclose(s.algorithm["Dense_0"]["kernel"], cw, atol=1e-4)
    np.testing.assert_allclose(m.train_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m.weights)[np.asarray(m.weights) > 0], p, rtol=1e-6)
  with pytest.raises(ValueError, match=r"^per-client local steps must number one per client "
                     r"\(5\); got 4"):
    alg.round(state, small_data(num_clients=5))


def test_loss_weightings_see_the_clients_losses_and_dropped_clients_keep_their_c_i():
  """A weighting that reads the clients' losses before and after gets them (the first round,
  with every control variate 0, is FedAvg's); a client that drops out keeps its c_i."""
  data = small_data(num_clients=4, sizes=[5, 9, 7, 4])
  work = fp.LocalWork(3, steps=2)
  s = scaffold(logreg(), work, learning_rate=0.2, clients_per_round=3,
               weighting=agg.loss_improvement(1.0))
  f = fedavg(logreg(), optax.sgd(0.2), optax.sgd(1.0), work, clients_per_round=3,
             weighting=agg.loss_improvement(1.0))
  _, ms = jax.jit(s.round)(s.init(jax.random.key(1), data), data)
  _, mf = jax.jit(f.round)(f.init(jax.random.key(1), data), data)
  np.testing.assert_allclose(ms.weights, mf.weights, rtol=1e-5)
  np.testing.assert_allclose(ms.train_loss, mf.train_loss, rtol=1e-5)
  system = fp.Execution(system=fp.System(dropout_rate=0.5))
  d = scaffold(logreg(), work, learning_rate=0.2, clients_per_round=3, execution=system)
  state, step, dropped_seen = d.init(jax.random.key(2), data), jax.jit(d.round), 0
  for _ in range(4):
    before = np.asarray(state.client_states["Dense_0"]["kernel"])
    state, m = step(state, data)
    after = np.asarray(state.client_states["Dense_0"]["kernel"])
    w, ids = np.asarray(m.weights), np.asarray(m.clients)
    for slot, i in enumerate(ids):
      if w[slot] == 0:   # dropped out: trained nothing, its control variate unchanged
        dropped_seen += 1
        np.testing.assert_array_equal(after[i], before[i])
      else:
        assert not np.array_equal(after[i], before[i])
  assert dropped_seen > 0 and np.abs(np.asarray(state.algorithm["Dense_0"]["kernel"])).max() > 0


def test_a_client_whose_control_variate_is_not_finite_is_dropped_whole():
  """η_l = 1e-46 is 0 in float32: y stays x, and c_i⁺ = c_i − c + (x − y) / (K η_l) is
  0/0. Such a client counts as non-finite although its Δy is 0: its c_i, the server's c
  and x keep their values."""
  data = small_data(num_clients=4, sizes=[5, 9, 7, 4])
  s = scaffold(logreg(), fp.LocalWork(3, steps=2), learning_rate=1e-46, clients_per_round=3)
  state = s.init(jax.random.key(0), data)
  new, m = jax.jit(s.round)(state, data)
  assert int(m.num_nonfinite) == 3
  for before, after in ((state.client_states, new.client_states),
                        (state.algorithm, new.algorithm), (state.params, new.params)):
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
      np.testing.assert_array_equal(a, b)
