"""The automated weighting: family weights against NumPy, its hypergradient against central
differences in float64, the learned mixture in a round (a run's outputs:
`test_auto_weighting_run.py`)."""

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


def np_softmax_over(logit, mask):
  e = np.where(mask, np.exp(np.where(mask, logit, 0) - np.max(logit[mask])), 0.0)
  return e / e.sum()


def np_cosines(n, finite, flat):
  mean = (n * finite) @ np.where(finite[:, None], flat, 0) / np.sum(n * finite)
  with np.errstate(invalid="ignore"):
    cos = flat @ mean / (np.linalg.norm(flat, axis=1) * np.linalg.norm(mean))
  return np.where(finite, cos, 0.0)


def np_families(n, finite, losses, hist, cos, tau, learned, q=None):
  """The six rows of `family_weights`, written out (module docstring of `_auto`)."""
  keep = finite & (n > 0)
  log_n = np.log(np.where(keep, n, 1.0))
  if q is None:
    q = hist[finite].sum(0) / hist[finite].sum()
  p = hist / hist.sum(1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(p > 0, p * np.log(p / q), 0.0).sum(1)
  return np.stack([
      np_softmax_over(log_n, keep),
      finite / finite.sum(),
      np_softmax_over(-np.where(finite, losses, 0) / tau[0], finite),
      np_softmax_over(log_n - kl / tau[1], keep),
      np_softmax_over(log_n + cos / tau[2], keep),
      learned,
  ])


def outputs_for(flat, n, losses, hist, finite):
  k = len(n)
  return fp.core.ClientOutput(
      delta={"w": jnp.asarray(flat)}, num_examples=jnp.asarray(n), train_loss=jnp.asarray(losses),
      num_steps=None, label_hist=jnp.asarray(hist), finite=jnp.asarray(finite),
      client_id=jnp.arange(k))


def test_family_weights_match_numpy_with_a_nonfinite_client():
  rng = np.random.default_rng(0)
  n = np.array([10, 4, 7, 20], np.int32)
  finite = np.array([True, True, False, True])
  flat = rng.normal(size=(4, 6)).astype(np.float32)
  flat[2, 0] = np.nan
  losses = np.array([0.5, 2.0, np.nan, 1.0], np.float32)
  hist = np.array([[5, 5, 0], [4, 0, 0], [2, 2, 3], [6, 7, 7]], np.float32)
  log_tau = np.log(np.array([0.5, 2.0, 0.25]))
  out = outputs_for(flat, n, losses, hist, finite)
  learned = np.array([0.1, 0.6, 0.0, 0.3], np.float32)
  got = np.asarray(agg.family_weights(out, jnp.asarray(log_tau, jnp.float32),
                                      learned=jnp.asarray(learned)))
  cos = np_cosines(n, finite, np.where(finite[:, None], flat, 0))
  want = np_families(n.astype(float), finite, losses, hist, cos, np.exp(log_tau), learned)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  assert np.all(got[:, 2] == 0)
  # with a population q, and the mixture as π @ rows
  q = np.array([0.2, 0.3, 0.5])
  got_q = np.asarray(agg.family_weights(out, jnp.asarray(log_tau, jnp.float32), jnp.asarray(q),
                                        learned=jnp.asarray(learned)))
  np.testing.assert_allclose(got_q, np_families(n.astype(float), finite, losses, hist, cos,
                                                np.exp(log_tau), learned, q),
                             rtol=2e-5, atol=1e-7)
  a = np.array([0.3, -1.0, 0.5, 0.0, 2.0, -0.4])
  pi = np.exp(a) / np.exp(a).sum()
  np.testing.assert_allclose(agg.auto_weights(out, jnp.asarray(a), jnp.asarray(log_tau),
                                              learned=jnp.asarray(learned)),
                             pi @ want, rtol=2e-5, atol=1e-7)


def test_hypergradient_matches_central_differences_float64():
  with jax.enable_x64(True):
    model = logreg()
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3, jnp.float64),
                          model.init(jax.random.key(0)))
    k = 5
    deltas = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(k,) + p.shape) * 0.5, jnp.float64), params)
    finite = jnp.asarray([True, True, False, True, True])
    out = fp.core.ClientOutput(
        delta=deltas, num_examples=jnp.asarray([6, 5, 7, 4, 8]),
        train_loss=jnp.asarray([0.4, 1.3, np.nan, 0.9, 0.7], jnp.float64), num_steps=None,
        label_hist=jnp.asarray(rng.integers(0, 5, (k, 3)).astype(np.float64) + 0.5),
        finite=finite, client_id=jnp.arange(k))
    objective = held_out_loss(model, rng.normal(size=(12, 5)), rng.integers(0, 3, 12))
    learned = jnp.asarray([0.3, 0.1, 0.0, 0.2, 0.4], jnp.float64)
    f = lambda a, t: agg.auto_objective(objective, params, out, a, t, learned=learned,
                                        gamma=0.9)
    a = jnp.asarray([0.3, -0.2, 0.1, 0.5, -0.4, 0.2], jnp.float64)
    t = jnp.asarray([-0.3, 0.2, -0.5], jnp.float64)
    ga, gt = jax.grad(f, argnums=(0, 1))(a, t)
    assert ga.dtype == jnp.float64 and np.all(np.isfinite(ga)) and np.all(np.isfinite(gt))
    eps = 1e-6
    fd_a = np.array([(f(a.at[i].add(eps), t) - f(a.at[i].add(-eps), t)) / (2 * eps)
                     for i in range(6)])
    fd_t = np.array([(f(a, t.at[i].add(eps)) - f(a, t.at[i].add(-eps))) / (2 * eps)
                     for i in range(3)])
    np.testing.assert_allclose(ga, fd_a, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(gt, fd_t, rtol=1e-6, atol=1e-10)
    assert np.max(np.abs(fd_t)) > 1e-4   # the temperatures do move the objective


WORK = fp.LocalWork(4, epochs=2)


def test_round_aggregates_with_the_mixture_of_the_numpy_families():
  """With a learning rate of 0 the mixture stays where the state has it: the round's
  weights are π(a) @ the six families at τ, recomputed from the NumPy clients (the FedLAW
  row and γ: `fedlaw` on their updates), and the new model is γ (w + Σ_i w_i Δ_i)."""
  data = small_data(num_clients=6, sizes=[6, 5, 7, 4, 8, 6])
  model = logreg()
  px, py = data.x[0, :5], data.y[0, :5]
  a = agg.auto(held_out_loss(model, px, py), steps=2, optimizer=optax.sgd(0.0),
               fedlaw_steps=7)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=4, weighting=a)
  s0 = alg.init(jax.random.key(0), data)
  a0, t0 = np.array([0.5, -0.3, 1.0, 0.2, -0.7, 0.4]), np.log([0.7, 1.5, 0.4])
  s0 = s0._replace(weight_state=s0.weight_state._replace(
      logits=jnp.asarray(a0, jnp.float32), log_temperature=jnp.asarray(t0, jnp.float32)))
  s1, m = jax.jit(alg.round)(s0, data)
  w, b, clients = client_deltas(s0.params, data, s0.rng, WORK, 0.1, 4)
  n = np.array([c["n"] for c in clients], float)
  ys = np.asarray(data.y)
  hist = np.stack([np.bincount(ys[c["id"], :c["n"]], minlength=3) for c in clients]).astype(float)
  flat = np.stack([np.concatenate([c["dw"].ravel(), c["db"].ravel()]) for c in clients])
  finite = np.ones(4, bool)
  out = fp.core.ClientOutput(
      delta={"Dense_0": {"kernel": jnp.asarray(np.stack([c["dw"] for c in clients]),
                                               jnp.float32),
                         "bias": jnp.asarray(np.stack([c["db"] for c in clients]),
                                             jnp.float32)}},
      num_examples=jnp.asarray(n, jnp.int32), train_loss=None, num_steps=None,
      label_hist=None, finite=jnp.asarray(finite), client_id=jnp.arange(4))
  law = agg.fedlaw(model, px, py, steps=7)
  _, learned, law_state = law.apply(out, law.init(4), s0.params)
  gamma = float(law_state.gamma)
  assert abs(gamma - 1) > 1e-4
  fam = np_families(n, finite, np.array([c["train_loss"] for c in clients]), hist,
                    np_cosines(n, finite, flat), np.exp(t0), np.asarray(learned))
  want = np.exp(a0) / np.exp(a0).sum() @ fam
  np.testing.assert_allclose(m.weights, want, rtol=2e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             gamma * (w + sum(p * c["dw"] for p, c in zip(want, clients))),
                             atol=1e-5)
  np.testing.assert_allclose(s1.weight_state.logits, a0, rtol=1e-6)
  np.testing.assert_allclose(s1.weight_state.gamma, gamma, rtol=1e-6)


def test_a_mixture_all_on_the_fedlaw_family_is_fedlaw():
  """π one-hot on FedLAW's family: the automated weighting's round is FedLAW's."""
  data = small_data(num_clients=6, sizes=[6, 5, 7, 4, 8, 6])
  model = logreg()
  px, py = data.x[0, :5], data.y[0, :5]
  a = agg.auto(held_out_loss(model, px, py), optimizer=optax.sgd(0.0), fedlaw_steps=9)
  build = lambda w: fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=4,
                           weighting=w)
  alg = build(a)
  s0 = alg.init(jax.random.key(3), data)
  s0 = s0._replace(weight_state=s0.weight_state._replace(
      logits=jnp.asarray([-1e9] * 5 + [0.0], jnp.float32)))
  s1, m = jax.jit(alg.round)(s0, data)
  law = build(agg.fedlaw(model, px, py, steps=9))
  l0 = law.init(jax.random.key(3), data)
  l1, lm = jax.jit(law.round)(l0, data)
  np.testing.assert_allclose(m.weights, lm.weights, rtol=1e-6, atol=1e-8)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
               s1.params, l1.params)
  np.testing.assert_allclose(s1.weight_state.gamma, l1.weight_state.gamma, rtol=1e-6)


def test_learning_lowers_the_proxy_loss_and_carries_over_rounds():
  data = small_data(num_clients=6, sizes=[6, 5, 7, 4, 8, 6])
  model = logreg()
  objective = held_out_loss(model, data.x[1, :6], data.y[1, :6])
  steps = 20
  a = agg.auto(objective, steps=steps)
  alg = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=4, weighting=a)
  state = alg.init(jax.random.key(1), data)
  step = jax.jit(alg.round)
  for r in range(3):
    before = state.weight_state
    new, m = step(state, data)
    # the same round's aggregate with the mixture it started from (no learning)
    frozen = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=4,
                    weighting=agg.auto(objective, steps=1, optimizer=optax.sgd(0.0)))
    old, _ = jax.jit(frozen.round)(state._replace(weight_state=before), data)
    assert float(objective(new.params)) < float(objective(old.params)) - 1e-4
    assert float(new.weight_state.proxy_loss) == pytest.approx(float(objective(new.params)),
                                                               rel=1e-5)
    assert int(new.weight_state.opt_state[0].count) == steps * (r + 1)   # Adam's moments kept
    state = new
  mix = state.weight_state.mixture()
  assert set(mix) == set(agg.FAMILIES) and abs(sum(mix.values()) - 1) < 1e-5
  assert step._cache_size() == 1


def test_bad_arguments_are_refused():
  objective = held_out_loss(logreg(), np.ones((2, 5)), np.zeros(2, int))
  with pytest.raises(ValueError, match="steps must be a positive int; got 0"):
    agg.auto(objective, steps=0)
  with pytest.raises(ValueError, match="objective must be a callable"):
    agg.auto(None)
  with pytest.raises(ValueError, match="population must be a 1-D distribution with every"):
    agg.auto(objective, population=[0.5, 0.5, 0.0])
  with pytest.raises(ValueError, match="fedlaw_steps must be a positive int; got 0"):
    agg.auto(objective, fedlaw_steps=0)
  agg.auto(objective, fedlaw_steps=1)       # one step of the FedLAW fit is allowed


def test_factory_defaults_and_population():
  """`auto(objective)` takes one Adam step (lr 0.05) a round, FedLAW's family fits 100 Adam
  steps (lr 0.05), and a population given to the factory is the divergence family's q (the
  aggregator's weights against NumPy)."""
  rng = np.random.default_rng(3)
  n = np.array([6, 5, 7, 4], np.int32)
  flat = rng.normal(size=(4, 6)).astype(np.float32)
  losses = np.array([0.5, 2.0, 0.8, 1.0], np.float32)
  hist = np.array([[3, 3, 0], [5, 0, 0], [2, 2, 3], [1, 1, 2]], np.float32)
  out = outputs_for(flat, n, losses, hist, np.ones(4, bool))
  q = np.array([0.2, 0.3, 0.5])
  objective = lambda p: jnp.sum(p["w"] ** 2)
  lr0 = agg.auto(objective, population=list(q), optimizer=optax.sgd(0.0))
  zero = {"w": jnp.zeros(6)}
  mean, w, state = lr0.apply(out, lr0.init(4), zero)
  learned, gamma = agg.fedlaw_fit(objective, zero, out, steps=100, optimizer=optax.adam(0.05))
  other, _ = agg.fedlaw_fit(objective, zero, out, steps=99, optimizer=optax.adam(0.05))
  assert np.max(np.abs(np.asarray(learned) - np.asarray(other))) > 1e-6
  cos = np_cosines(n.astype(float), np.ones(4, bool), flat)
  want = np.full(6, 1 / 6) @ np_families(n.astype(float), np.ones(4, bool), losses, hist, cos,
                                         np.ones(3), np.asarray(learned), q)
  np.testing.assert_allclose(w, want, rtol=2e-5)
  np.testing.assert_allclose(mean["w"], float(gamma) * (want @ flat), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(state.gamma, gamma, rtol=1e-6)
  default = agg.auto(objective)
  s0 = default.init(4)
  _, _, s1 = default.apply(out, s0, {"w": jnp.zeros(6)})
  assert int(s1.opt_state[0].count) == 1
  g = jax.grad(lambda a: agg.auto_objective(objective, zero, out, a, s0.log_temperature,
                                            learned=learned, gamma=gamma))(s0.logits)
  # auto_objective's default γ is 1
  j = lambda **kw: float(agg.auto_objective(objective, zero, out, s0.logits, s0.log_temperature,
                                            learned=learned, **kw))
  assert j() == j(gamma=1.0) and abs(j() - j(gamma=2.0)) > 1e-3
  # Adam's first step: −lr ĝ/(|ĝ| + ε) with lr 0.05, ε 1e-8
  np.testing.assert_allclose(s1.logits, -0.05 * g / (np.abs(g) + 1e-8), atol=1e-6)
  for bad in ([[0.5, 0.5]], [0.5, 0.6], [0.5, 0.5, 0.0]):
    with pytest.raises(ValueError, match="population must be a 1-D distribution"):
      agg.auto(objective, population=bad)


def test_gradient_through_an_automated_round_matches_central_differences_float64():
  """d(proxy loss after one round)/d(client lr) through the automated weighting, FedLAW's
  fit included, against central differences in float64."""
  from fedjax_pers.hypergrad import unrolled_objective

  with jax.enable_x64(True):
    rs = np.random.RandomState(4)
    sizes = [7, 9, 5, 11, 8, 6]
    data = fp.FederatedData.from_clients([rs.normal(size=(n, 5)) for n in sizes],
                                         [rs.randint(0, 3, n) for n in sizes],
                                         num_classes=3, dtype=jnp.float64)
    model = logreg()
    objective = held_out_loss(model, rs.normal(size=(20, 5)), rs.randint(0, 3, 20))
    build = lambda lr: fedavg(model, optax.sgd(lr), optax.sgd(1.0), fp.LocalWork(3, steps=3),
                              clients_per_round=4,
                              weighting=agg.auto(objective, fedlaw_steps=5),
                              execution=fp.Execution(differentiable=True))
    state = build(0.2).init(jax.random.key(5), data)
    state = state._replace(params=jax.tree.map(lambda a: a.astype(jnp.float64), state.params))
    f = jax.jit(lambda lr: unrolled_objective(build, lr, state, data, objective))
    g = jax.grad(f)(jnp.float64(0.2))
    # The mixture and FedLAW's fit run in float32 (`AutoState`), so a step of 1e-6 does not
    # move the fit's output: central differences at 1e-6 give the gradient with (λ, γ)
    # held fixed, 0.3% away. At 1e-3 (an O(1e-6) truncation error here) they see the fit.
    eps = 1e-3
    want = (f(jnp.float64(0.2 + eps)) - f(jnp.float64(0.2 - eps))) / (2 * eps)
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(g, want, rtol=1e-4)


def test_the_fedlaw_family_uses_the_optimizer_given():
  """`fedlaw_optimizer=sgd(0)` leaves FedLAW's fit at its start: λ = n / N and γ = 1."""
  rng = np.random.default_rng(6)
  n = np.array([6, 5, 7, 4], np.int32)
  flat = rng.normal(size=(4, 6)).astype(np.float32)
  out = outputs_for(flat, n, np.array([0.5, 2.0, 0.8, 1.0], np.float32),
                    np.array([[3, 3, 0], [5, 0, 0], [2, 2, 3], [1, 1, 2]], np.float32),
                    np.ones(4, bool))
  objective = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
  frozen = agg.auto(objective, optimizer=optax.sgd(0.0), fedlaw_optimizer=optax.sgd(0.0))
  _, w, state = frozen.apply(out, frozen.init(4), {"w": jnp.zeros(6)})
  rows = agg.family_weights(out, jnp.zeros(3), learned=jnp.asarray(n / n.sum(), jnp.float32))
  np.testing.assert_allclose(w, np.mean(np.asarray(rows), 0), rtol=1e-5)
  assert float(state.gamma) == 1.0
