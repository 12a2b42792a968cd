"""Weightings that wrap others (product, power, floor, attacks), per-client logits, edge
cases (clients with 0 or 1 examples, two classes) and every factory's numbers traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_aggregation import BAD, N, make_outputs, np_softmax, weights_of

from fedjax_pers import aggregation as agg

WRAPPERS = {
    "product": lambda fn: agg.product(agg.num_examples(), fn),
    "power": lambda fn: agg.power(fn, 2.0),
    "floor": lambda fn: agg.floor(fn, 0.3),
}


def two_rounds(fn):
  """Weights and state of two rounds (the second cohort overlaps the first)."""
  state = fn.init(N)
  out = []
  for seed in (0, 1):
    w, state = jax.jit(fn.apply)(make_outputs(seed), state)
    out.append(np.asarray(w))
  return out, state


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrappers_carry_the_inner_state(name):
  """FedAdp keeps a state; wrapped, it must evolve exactly as alone."""
  (_, _), alone = two_rounds(agg.fedadp())
  (w1, w2), wrapped = two_rounds(WRAPPERS[name](agg.fedadp()))
  inner = wrapped[1] if name == "product" else wrapped
  np.testing.assert_array_equal(inner.angle, alone.angle)
  np.testing.assert_array_equal(inner.count, alone.count)
  assert np.asarray(alone.count).sum() > 0 and abs(w2.sum() - 1) < 1e-6


def test_scores_exist_exactly_where_the_weights_are_separable():
  sep, not_sep = agg.label_entropy(1.0), agg.loss(0.5)
  assert agg.product(agg.num_examples(), sep).score is not None
  assert agg.product(agg.num_examples(), not_sep).score is None
  assert agg.power(sep, 2.0).score is not None
  assert agg.power(not_sep, 2.0).score is None
  assert agg.floor(sep, 0.3).score is None          # mixing with 1/m needs the cohort
  assert agg.scaled_updates(sep, np.zeros(N, bool), -1.0).score is None
  out = make_outputs(4)
  finite = np.asarray(out.finite)
  for fn in (agg.product(agg.num_examples(), sep), agg.power(sep, 2.0)):
    u = np.where(finite, np.asarray(jax.vmap(fn.score)(out)), 0.0)
    np.testing.assert_allclose(u / u.sum(), weights_of(fn, out)[0], rtol=1e-5, atol=1e-7)


def test_client_losses_flag_passes_through_the_wrappers():
  needs = agg.loss_improvement()
  assert agg.product(agg.num_examples(), needs).client_losses
  assert not agg.product(agg.num_examples(), agg.uniform()).client_losses
  assert agg.power(needs, 2.0).client_losses and agg.floor(needs, 0.5).client_losses
  assert agg.scaled_updates(needs, np.zeros(N, bool), 2.0).client_losses


def test_logits_weigh_the_cohort_by_its_clients_logits():
  theta = np.linspace(-1.0, 1.0, N)
  out = make_outputs(2)
  w, _ = weights_of(agg.logits(jnp.asarray(theta, jnp.float32)), out)
  want = np_softmax(theta[np.asarray(out.client_id)], np.asarray(out.finite))
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
  assert w[BAD] == 0
  with pytest.raises(ValueError, match=r"one logit per client, shape \(10,\); got \(3,\)"):
    agg.logits(jnp.zeros(3)).init(N)


def test_scaled_updates_scale_only_the_attackers_and_keep_dtypes_and_params():
  out = make_outputs(5)
  bad = np.zeros(N, bool)
  bad[np.asarray(out.client_id)[[0, 3]]] = True
  scale = jnp.where(jnp.asarray(bad)[out.client_id], -4.0, 1.0)
  scaled = out._replace(delta=jax.tree.map(
      lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)), out.delta))
  # an aggregator that reads the global model: FedLAW on a tiny proxy problem
  params = jax.tree.map(lambda d: jnp.ones(d.shape[1:]), out.delta)
  objective = lambda p: sum(jnp.sum(jnp.square(x - 0.5)) for x in jax.tree.leaves(p))
  inner = agg.auto(objective, steps=2)
  a = agg.scaled_updates(inner, bad, -4.0)
  got, w, _ = jax.jit(a.apply)(out, a.init(N), params)
  want, w_want, _ = jax.jit(inner.apply)(scaled, inner.init(N), params)
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, v, rtol=1e-6)
  np.testing.assert_allclose(w, w_want, rtol=1e-6)
  # bfloat16 updates reach the wrapped aggregator as bfloat16
  half = out._replace(delta=jax.tree.map(lambda d: d.astype(jnp.bfloat16), out.delta))
  first = agg.Aggregator(init=lambda n: (), apply=lambda o, s, p: (
      jax.tree.map(lambda d: d[0], o.delta), jnp.ones(o.finite.shape), s))
  d16, _, _ = jax.jit(agg.scaled_updates(first, bad, 2.0).apply)(half, (), params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d16))
  with pytest.raises(ValueError, match=r"one entry per client \(10\); got 3"):
    agg.scaled_updates(agg.uniform(), np.zeros(3, bool), 2.0).init(N)


@pytest.mark.parametrize("bad_call, match", [
    (lambda: agg.product(), r"product needs one or more WeightFn; got \(\)"),
    (lambda: agg.product(agg.uniform(), "x"), "product needs one or more WeightFn"),
    (lambda: agg.power(agg.uniform(), 0.0), r"exponent must be a number > 0; got 0.0"),
    (lambda: agg.floor(agg.uniform(), -0.1), r"fraction must be a number in \[0, 1\]"),
    (lambda: agg.loss(-1.0), r"temperature must be a number > 0; got -1.0"),
    (lambda: agg.label_divergence(-0.5), r"temperature must be a number >= 0; got -0.5"),
    (lambda: agg.label_entropy(-0.5), r"temperature must be a number >= 0; got -0.5"),
    (lambda: agg.fedadp(-1.0), r"alpha must be a number > 0; got -1.0"),
])
def test_boundaries_and_messages(bad_call, match):
  with pytest.raises(ValueError, match=match):
    bad_call()


def test_boundary_values_are_accepted():
  out = make_outputs(6)
  for fn in (agg.power(agg.uniform(), 0.5), agg.floor(agg.cosine(), 0.0),
             agg.floor(agg.cosine(), 1.0), agg.label_divergence(0.0),
             agg.label_entropy(0.0)):
    w, _ = weights_of(fn, out)
    assert abs(float(np.sum(w)) - 1) < 1e-6
  w, _ = weights_of(agg.floor(agg.cosine(), 1.0), out)   # all uniform
  np.testing.assert_allclose(w, np.asarray(out.finite) / np.sum(out.finite), rtol=1e-6)


# Each factory with its number traced (as a sweep passes it) gives the weights it gives
# with the same number concrete.
TRACED = {
    "power": lambda v: agg.power(agg.num_examples(), v),
    "floor": lambda v: agg.floor(agg.cosine(), v),
    "loss": agg.loss,
    "loss_improvement": agg.loss_improvement,
    "label_entropy": agg.label_entropy,
    "fedadp": agg.fedadp,
}


@pytest.mark.parametrize("name", sorted(TRACED))
def test_factories_take_traced_numbers(name):
  out = make_outputs(7)
  make = TRACED[name]
  concrete, _ = weights_of(make(0.4), out)
  traced = jax.jit(lambda v: make(v).apply(out, make(0.4).init(N))[0])(jnp.float32(0.4))
  np.testing.assert_allclose(traced, concrete, rtol=1e-5, atol=1e-7)


def test_clients_with_no_examples_get_no_weight_and_one_example_some():
  out = make_outputs(8)
  n = np.asarray(out.num_examples).copy()
  n[0], n[1] = 0, 1
  hist = np.asarray(out.label_hist).copy()
  hist[0], hist[1] = 0, np.eye(hist.shape[1])[1]
  out = out._replace(num_examples=jnp.asarray(n), label_hist=jnp.asarray(hist))
  for fn in (agg.label_divergence(0.0), agg.label_divergence(1.0), agg.label_entropy(1.0),
             agg.label_divergence(1.0, [0.1, 0.2, 0.3, 0.4])):
    w, _ = weights_of(fn, out)
    assert w[0] == 0 and w[1] > 0 and w[BAD] == 0 and abs(float(np.sum(w)) - 1) < 1e-6
  w, _ = weights_of(agg.label_divergence(0.0), out)
  keep = np.asarray(out.finite)
  np.testing.assert_allclose(w, np.where(keep, n, 0) / np.sum(np.where(keep, n, 0)),
                             rtol=1e-6)


def test_entropy_is_divided_by_log_of_the_number_of_classes_even_for_two():
  out = make_outputs(9)
  hist = np.asarray(out.label_hist)[:, :2] + 1.0
  out = out._replace(label_hist=jnp.asarray(hist))
  p = hist / hist.sum(1, keepdims=True)
  h = -(p * np.log(p)).sum(1) / np.log(2)
  want = np_softmax(np.log(np.asarray(out.num_examples, float)) + 1.5 * h,
                    np.asarray(out.finite))
  np.testing.assert_allclose(weights_of(agg.label_entropy(1.5), out)[0], want, rtol=2e-5)


def test_label_weightings_scores():
  out = make_outputs(10)
  finite = np.asarray(out.finite)
  assert agg.label_divergence(1.0).score is None   # the cohort's pooled labels
  for fn in (agg.label_divergence(0.0), agg.label_divergence(1.0, [0.1, 0.2, 0.3, 0.4]),
             agg.label_entropy(1.0)):
    u = np.where(finite, np.asarray(jax.vmap(fn.score)(out), np.float64), 0.0)
    np.testing.assert_allclose(u / u.sum(), weights_of(fn, out)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("population", [[[0.5, 0.5]], [1.5, -0.5], [0.5, 0.4]])
def test_bad_populations_are_refused(population):
  with pytest.raises(ValueError, match="population must be a 1-D distribution"):
    agg.label_divergence(1.0, population)


def test_label_weighting_messages():
  with pytest.raises(ValueError, match=r"\[2\]: a client holding one .* the cohort's own "
                     r"\(population=None\)\."):
    agg.label_divergence(1.0, [0.5, 0.5, 0.0])
  for make in (agg.label_divergence, agg.label_entropy, agg.loss):
    with pytest.raises(ValueError, match="temperature must be a number"):
      make("warm")
  # label divergence's τ decides the program (τ = 0: data size), so it cannot be traced
  with pytest.raises(jax.errors.TracerBoolConversionError):
    jax.jit(lambda t: agg.label_divergence(t).apply(make_outputs(), ())[0])(1.0)


def test_clip_norm_clips_before_its_own_weighting_and_never_streams():
  out = make_outputs(11)
  a = agg.clip_norm(0.8, weighting=agg.uniform())
  assert a.score is None and agg.clip_norm(0.8).score is None
  keep = np.asarray(out.finite)
  d = np.concatenate([np.asarray(x, np.float64).reshape(len(keep), -1)
                      for x in jax.tree.leaves(out.delta)], 1)
  d[~keep] = 0
  d *= np.minimum(1.0, 0.8 / np.maximum(np.linalg.norm(d, axis=1), 1e-30))[:, None]
  want = d[keep].mean(0)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), out.delta)
  got, w, _ = jax.jit(a.apply)(out, a.init(N), params)
  got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(got)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, keep / keep.sum(), rtol=1e-6)
  traced = jax.jit(lambda c: agg.clip_norm(c, agg.uniform()).apply(out, (), params)[0])(0.8)
  np.testing.assert_allclose(np.concatenate([np.asarray(x).ravel()
                                             for x in jax.tree.leaves(traced)]), want,
                             rtol=1e-5, atol=1e-6)


def test_robust_messages_name_the_aggregator_and_the_fix():
  with pytest.raises(ValueError, match=r"^krum: f \(Byzantine clients tolerated\)"):
    agg.krum(-1)
  with pytest.raises(ValueError, match=r"use beta >= 1/k = 0\.2 or more clients per round\.\n"):
    jax.jit(agg.trimmed_mean(0.1).apply)(make_outputs(k=5), (), None)
  out = make_outputs(k=6, bad=())
  beta = 0.2   # traced: trims floor(0.2 · 6) = 1 per side, as concrete
  concrete = jax.jit(agg.trimmed_mean(beta).apply)(out, (), None)[0]
  traced = jax.jit(lambda b: agg.trimmed_mean(b).apply(out, (), None)[0])(beta)
  for c, t in zip(jax.tree.leaves(concrete), jax.tree.leaves(traced)):
    np.testing.assert_allclose(t, c, rtol=1e-6)


# ----------------------------------------------------------------- FedLAW, FedNova, q-FFL


def fedlaw_problem(seed=12):
  from test_engine import logreg

  rng = np.random.default_rng(seed)
  model = logreg()
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3, jnp.float32),
                        model.init(jax.random.key(0)))
  k = 5
  deltas = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(k,) + p.shape) * 0.5,
                                              jnp.float32), params)
  n = jnp.asarray([6, 5, 7, 4, 8])
  out = make_outputs(seed, k=k, bad=(2,))._replace(delta=deltas, num_examples=n)
  x, y = rng.normal(size=(12, 5)).astype(np.float32), rng.integers(0, 3, 12)
  return model, params, out, x, y


def test_fedlaw_runs_adam_on_its_objective_from_the_fedavg_weights():
  """The learned (θ, θ_γ) are those of Adam(0.05) on `fedlaw_objective`, written out."""
  import optax

  model, params, out, x, y = fedlaw_problem()
  steps = 7
  a = agg.fedlaw(model, x, y, steps=steps)
  delta, w, state = jax.jit(a.apply)(out, a.init(5), params)
  finite = out.finite
  deltas = jax.tree.map(lambda d: jnp.where(
      finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0), out.delta)
  n = np.where(finite, np.asarray(out.num_examples, float), 0)
  z = (jnp.asarray(np.log(np.where(n > 0, n / n.sum(), 1.0)), jnp.float32), jnp.float32(0))
  f = lambda z: agg.fedlaw_objective(model, params, deltas, finite, z[0], z[1], x, y)
  tx = optax.adam(0.05)
  opt = tx.init(z)
  for _ in range(steps):
    updates, opt = tx.update(jax.grad(f)(z), opt, z)
    z = optax.apply_updates(z, updates)
  np.testing.assert_allclose(w, np_softmax(np.asarray(z[0]), np.asarray(finite)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(float(state.gamma), float(np.exp(z[1])), rtol=1e-5)
  want = agg.fedlaw_aggregate(params, deltas, finite, *z)
  for d, p, v in zip(jax.tree.leaves(delta), jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(p) + np.asarray(d), v, rtol=1e-4, atol=1e-5)


def test_fedlaw_leaves_out_clients_without_data():
  model, params, out, x, y = fedlaw_problem(13)
  out = out._replace(num_examples=out.num_examples.at[0].set(0))
  a = agg.fedlaw(model, x, y, steps=3)
  _, w, _ = jax.jit(a.apply)(out, a.init(5), params)
  assert float(w[0]) == 0 and float(w[2]) == 0 and abs(float(np.sum(w)) - 1) < 1e-6


def test_fedlaw_arguments():
  model, _, _, x, y = fedlaw_problem()
  agg.fedlaw(model, x[:1], y[:1], steps=1)          # one proxy example, one step: fine
  agg.fedlaw(model, x[:, 0], y)                      # 1-D inputs (a model of scalars)
  for px, py in ((x[:0], y[:0]), (x, y[:3]), (np.float32(1.0), y[:1])):
    with pytest.raises(ValueError, match=r"^fedlaw needs a non-empty proxy set with proxy_y "
                       r"of shape \[m\] matching proxy_x's first axis"):
      agg.fedlaw(model, px, py)
  for steps in (0, 2.0):
    with pytest.raises(ValueError, match=f"steps must be a positive int; got {steps!r}"):
      agg.fedlaw(model, x, y, steps=steps)


def test_fednova_with_its_own_weighting_and_momentum():
  out = make_outputs(14)
  steps = np.array([3, 5, 1, 8, 2, 6])
  out = out._replace(num_steps=jnp.asarray(steps))
  rho = 0.5
  a = agg.fednova(agg.uniform(), momentum=rho)
  _, w, _ = jax.jit(a.apply)(out, a.init(N), None)
  norm = (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)
  keep = np.asarray(out.finite)
  p = keep / keep.sum()
  want = np.sum(p * norm) * np.where(keep, p / norm, 0)
  np.testing.assert_allclose(w, want, rtol=1e-5)


def test_q_ffl_at_q_one_keeps_the_curvature_term():
  out = make_outputs(15)
  a = agg.q_ffl(1.0, 0.1)
  got, w, _ = jax.jit(a.apply)(out, (), None)
  keep = np.asarray(out.finite)
  d = np.concatenate([np.asarray(x, np.float64).reshape(len(keep), -1)
                      for x in jax.tree.leaves(out.delta)], 1)[keep]
  f = np.asarray(out.loss_before, np.float64)[keep]
  lip = 10.0
  h = np.sum(d ** 2, 1) * lip ** 2 + lip * f      # q F^(q-1) ||ΔW||² + L F^q at q = 1
  want = (lip * f) @ d / h.sum()
  got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(got)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  traced = jax.jit(lambda lr: agg.q_ffl(1.0, lr).apply(out, (), None)[0])(0.1)
  np.testing.assert_allclose(np.concatenate([np.asarray(x).ravel()
                                             for x in jax.tree.leaves(traced)]), want,
                             rtol=1e-5, atol=1e-7)
  # q decides the program (q = 0 drops the curvature term), so it cannot be traced
  with pytest.raises(jax.errors.TracerBoolConversionError):
    jax.jit(lambda q: agg.q_ffl(q, 0.1).apply(out, (), None)[0])(1.0)


def test_robust_cohort_and_argument_messages():
  six = make_outputs(k=6)
  with pytest.raises(ValueError, match=r"krum with f=2 needs at least 2f \+ 3 = 7 clients "
                     r"per round; got 6\."):
    jax.jit(agg.krum(2).apply)(six, (), None)
  with pytest.raises(ValueError, match=r"^multi_krum with f=2 needs at least 2f \+ 3 = 7"):
    jax.jit(agg.multi_krum(2).apply)(six, (), None)
  with pytest.raises(ValueError, match=r"^multi_krum: f \(Byzantine clients tolerated\)"):
    agg.multi_krum(-1)
  for m in (0, 2.0):
    with pytest.raises(ValueError, match=f"^multi_krum: m must be a positive int or None; "
                       f"got {m!r}"):
      agg.multi_krum(1, m=m)
  with pytest.raises(ValueError, match=r"^multi_krum: m=7 exceeds the k=6 clients per round, "
                     r"so it would average them all\."):
    jax.jit(agg.multi_krum(1, m=7).apply)(six, (), None)
  jax.jit(agg.multi_krum(1, m=6).apply)(six, (), None)    # m = k: allowed


def test_cosine_falls_back_to_data_size_when_no_update_agrees_with_the_mean():
  out = make_outputs(16, k=2, bad=())
  out = out._replace(delta=jax.tree.map(lambda d: jnp.stack([d[0], -d[0]]), out.delta),
                     num_examples=jnp.asarray([5, 5]))
  w, _ = weights_of(agg.cosine(), out)              # the mean is 0: every cosine is 0
  np.testing.assert_allclose(w, [0.5, 0.5])


def test_fedadp_leaves_clients_without_data_or_a_finite_update_alone():
  out = make_outputs(17)
  out = out._replace(num_examples=out.num_examples.at[0].set(0).at[1].set(1))
  fn = agg.fedadp()
  w, state = weights_of(fn, out)
  assert float(w[0]) == 0 and float(w[1]) > 0 and float(w[BAD]) == 0
  bad_id = int(out.client_id[BAD])
  assert float(state.angle[bad_id]) == 0 and int(state.count[bad_id]) == 0
  assert state.count.dtype == jnp.int32


def test_more_edges_the_mutation_pass_found():
  # the attackers' wrapper gives the inner weighting its state (FedAdp keeps one)
  a = agg.scaled_updates(agg.fedadp(), np.zeros(N, bool), 2.0)
  state = a.init(N)
  assert state.angle.shape == (N,)
  # FedLAW keeps a client with a single example
  model, params, out, x, y = fedlaw_problem(18)
  out = out._replace(num_examples=out.num_examples.at[0].set(1))
  _, w, _ = jax.jit(agg.fedlaw(model, x, y, steps=2).apply)(out, agg.FedLAWState(
      jnp.float32(1)), params)
  assert float(w[0]) > 0
  # FedAdp's Gompertz constant reaches the weights
  o = make_outputs(19)
  theta = np.arccos(np.clip(np.asarray(agg.cosine_to_mean(o), np.float64), -1, 1))
  f = 2.0 * (1 - np.exp(-np.exp(-2.0 * (theta - 1))))
  want = np_softmax(np.log(np.asarray(o.num_examples, float)) + f, np.asarray(o.finite))
  np.testing.assert_allclose(weights_of(agg.fedadp(2.0), o)[0], want, rtol=2e-5, atol=1e-7)
  # Krum tolerating no Byzantine client is allowed
  agg.krum(0)
  agg.multi_krum(0)
  # the automated weighting's divergence family uses the population it is given
  q = [0.7, 0.1, 0.1, 0.1]
  objective = lambda p: sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(p))
  ap = agg.auto(objective, optimizer=__import__("optax").sgd(0.0), population=q)
  params0 = jax.tree.map(lambda d: jnp.zeros(d.shape[1:]), o.delta)
  _, w, _ = jax.jit(ap.apply)(o, ap.init(N), params0)
  learned, _ = agg.fedlaw_fit(objective, params0, o, steps=100,
                              optimizer=__import__("optax").adam(0.05))
  want = jnp.mean(agg.family_weights(o, jnp.zeros(3), jnp.asarray(q), learned=learned), axis=0)
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)


def test_defaults_are_the_documented_ones():
  """Each factory's defaults, against the same call with the documented value spelt out."""
  o = make_outputs(21)
  for default, spelt, other in (
      (agg.loss(), agg.loss(1.0), agg.loss(2.0)),
      (agg.loss_improvement(), agg.loss_improvement(1.0), agg.loss_improvement(2.0)),
      (agg.label_divergence(), agg.label_divergence(1.0), agg.label_divergence(2.0)),
      (agg.label_entropy(), agg.label_entropy(1.0), agg.label_entropy(2.0))):
    np.testing.assert_array_equal(weights_of(default, o)[0], weights_of(spelt, o)[0])
    assert np.max(np.abs(weights_of(default, o)[0] - weights_of(other, o)[0])) > 1e-3
  steps = jnp.asarray([3, 5, 8])
  np.testing.assert_array_equal(agg.norm_a(steps), steps)   # ρ = 0: a_i = τ_i
  model, params, out, x, y = fedlaw_problem(22)
  apply = lambda a: jax.jit(a.apply)(out, a.init(5), params)[1]
  np.testing.assert_array_equal(apply(agg.fedlaw(model, x, y)),
                                apply(agg.fedlaw(model, x, y, steps=100)))
  score = lambda out: out.num_examples.astype(jnp.float32)
  assert agg.from_score(score, client_losses=True).client_losses is True
  assert agg.from_score(score).client_losses is False


def test_masked_softmax_shifts_by_the_largest_kept_logit():
  w = agg.masked_softmax(jnp.asarray([1000.0, 999.0, 5.0, 2000.0]),
                         jnp.asarray([True, True, True, False]))
  e = np.exp([1.0, 0.0, 5.0 - 1000.0])
  np.testing.assert_allclose(w, np.append(e / e.sum(), 0.0), rtol=1e-6)


def test_cosine_to_mean_of_zero_nonfinite_and_parallel_updates():
  def outputs(flat, finite=None):
    k = len(flat)
    finite = np.ones(k, bool) if finite is None else finite
    return make_outputs(0, k=k, bad=())._replace(
        delta={"w": jnp.asarray(np.asarray(flat, np.float32))},
        num_examples=jnp.ones(k, jnp.int32), finite=jnp.asarray(finite))

  # a zero update and a non-finite one have cosine 0
  cos = agg.cosine_to_mean(outputs([[1.0, 2.0], [0.0, 0.0], [np.nan, 1.0]],
                                   [True, True, False]))
  np.testing.assert_allclose(cos, [1.0, 0.0, 0.0], atol=1e-6)
  # parallel updates: cos = ±1 exactly, even where float32 rounding gives 1.0000001
  # (it does for this v on x86 CPUs: the clip is what keeps it in [−1, 1])
  v = np.random.default_rng(0).normal(size=7).astype(np.float32)
  for flat, want in (([v, v, v], [1, 1, 1]), ([v, -3 * v], [-1, 1])):
    cos = np.asarray(agg.cosine_to_mean(outputs(flat)))
    assert np.all(cos <= 1.0) and np.all(cos >= -1.0)
    np.testing.assert_allclose(cos, want, atol=1e-6)


def test_krum_with_no_byzantine_client_and_three_updates_uses_the_nearest_one():
  """m − f − 2 = 1: each score is the squared distance to the nearest other update."""
  x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
  o = make_outputs(0, k=3, bad=())._replace(delta={"w": jnp.asarray(x, jnp.float32)},
                                            finite=jnp.ones(3, bool))
  d = ((x[:, None] - x[None]) ** 2).sum(-1) + np.diag([np.inf] * 3)
  np.testing.assert_allclose(agg.krum_scores(o, 0), d.min(1), rtol=1e-5)


def test_auto_objective_and_step_use_the_population():
  """With a population q, the hypergradient step (SGD at lr 1 here) is −∇ of the
  objective of the aggregate weighted with q's divergence family, written out."""
  import optax

  o = make_outputs(23)
  q = jnp.asarray([0.7, 0.1, 0.1, 0.1])
  params0 = jax.tree.map(lambda d: jnp.full(d.shape[1:], 0.3), o.delta)
  objective = lambda p: sum(jnp.sum(jnp.square(v - 1.0)) for v in jax.tree.leaves(p))
  deltas = jax.tree.map(lambda d: jnp.where(
      o.finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0), o.delta)

  learned, gamma = agg.fedlaw_fit(objective, params0, o, steps=100, optimizer=optax.adam(0.05))

  def by_hand(a, t):
    w = agg.auto_weights(o, a, t, q, learned=learned)
    return objective(jax.tree.map(lambda p, d: gamma * (p + jnp.tensordot(w, d, 1)), params0,
                                  deltas))

  a0 = jnp.asarray([0.2, -0.1, 0.0, 0.4, -0.3, 0.1])
  t0 = jnp.zeros(3)
  np.testing.assert_allclose(
      agg.auto_objective(objective, params0, o, a0, t0, q, learned=learned, gamma=gamma),
      by_hand(a0, t0), rtol=1e-6)
  ga, gt = jax.grad(by_hand, argnums=(0, 1))(jnp.zeros(6), t0)
  ap = agg.auto(objective, optimizer=optax.sgd(1.0), population=list(np.asarray(q)))
  _, _, s = jax.jit(ap.apply)(o, ap.init(N), params0)
  np.testing.assert_allclose(s.logits, -ga, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.log_temperature, -gt, rtol=1e-5, atol=1e-7)
  # without q, the step differs (the pooled labels are not q)
  ga_pooled = jax.grad(lambda a: agg.auto_objective(objective, params0, o, a, t0,
                                                    learned=learned, gamma=gamma))(jnp.zeros(6))
  assert np.max(np.abs(np.asarray(ga_pooled) - np.asarray(ga))) > 1e-4


def test_auto_families_keep_a_client_with_one_example():
  o = make_outputs(24)._replace(num_examples=make_outputs(24).num_examples.at[0].set(1))
  rows = np.asarray(agg.family_weights(o, jnp.zeros(3), learned=jnp.zeros(o.finite.shape)))
  n = np.where(np.asarray(o.finite), np.asarray(o.num_examples, float), 0.0)
  np.testing.assert_allclose(rows[0], n / n.sum(), rtol=1e-5)
  assert np.all(rows[[0, 3, 4], 0] > 0)
