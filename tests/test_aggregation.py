"""Weight functions and aggregators against NumPy references, and their invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pers import aggregation as agg
from fedjax_pers.core import ClientOutput

N, K, C = 10, 6, 4
BAD = 2   # the client with a NaN update


def make_outputs(seed=0, k=K, bad=(BAD,)):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, 40, k)
  hist = np.stack([rng.multinomial(m, rng.dirichlet(np.ones(C))) for m in n])
  delta = {"a": rng.normal(size=(k, 3, 2)), "b": rng.normal(size=(k, 4))}
  delta["a"][:, 0, 0] += 1.5            # a shared direction, so cosines are mostly > 0
  for i in bad:
    delta["a"][i, 1, 1] = np.nan
  before = rng.uniform(0.5, 3.0, k)
  return ClientOutput(
      delta=jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), delta),
      num_examples=jnp.asarray(n, jnp.int32),
      train_loss=jnp.asarray(rng.uniform(0.1, 3.0, k), jnp.float32),
      num_steps=jnp.ones(k, jnp.int32),
      label_hist=jnp.asarray(hist, jnp.float32),
      finite=jnp.asarray([i not in bad for i in range(k)]),
      loss_before=jnp.asarray(before, jnp.float32),
      loss_after=jnp.asarray(before * rng.uniform(0.3, 1.0, k), jnp.float32),
      client_id=jnp.asarray(rng.permutation(N)[:k], jnp.int32))


def np_out(out):
  return jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), out)


def flat(delta):
  return np.concatenate([np.asarray(d, np.float64).reshape(d.shape[0], -1)
                         for d in jax.tree.leaves(delta)], axis=1)


def np_softmax(z, keep):
  z = np.where(keep, z, -np.inf)
  e = np.where(keep, np.exp(z - z[keep].max()), 0.0)
  return e / e.sum()


def np_cos(o):
  keep = o.finite.astype(bool)
  d = flat(o.delta)
  d[~keep] = 0.0
  n = np.where(keep, o.num_examples, 0.0)
  mean = (n / n.sum()) @ d
  cos = d @ mean / (np.linalg.norm(d, axis=1) * np.linalg.norm(mean) + 1e-300)
  return np.where(keep, cos, 0.0)


def ref_num_examples(o):
  n = np.where(o.finite.astype(bool), o.num_examples, 0.0)
  return n / n.sum()


def ref_label_kl_weights(o, tau, q=None):
  keep = o.finite.astype(bool)
  h = o.label_hist
  p = h / h.sum(1, keepdims=True)
  if q is None:
    q = h[keep].sum(0) / h[keep].sum()
  kl = np.array([sum(pi * math.log(pi / qi) for pi, qi in zip(row, q) if pi > 0) for row in p])
  return np_softmax(np.log(o.num_examples) - tau * kl, keep)


def ref_entropy_weights(o, tau):
  p = o.label_hist / o.label_hist.sum(1, keepdims=True)
  h = np.array([-sum(x * math.log(x) for x in row if x > 0) for row in p]) / math.log(C)
  return np_softmax(np.log(o.num_examples) + tau * h, o.finite.astype(bool))


def ref_fedadp(o, alpha=5.0):
  theta = np.arccos(np.clip(np_cos(o), -1, 1))
  f = alpha * (1 - np.exp(-np.exp(-alpha * (theta - 1))))
  return np_softmax(np.log(o.num_examples) + f, o.finite.astype(bool))


def ref_cosine(o):
  w = o.num_examples * np.maximum(np_cos(o), 0.0)
  return w / w.sum()


POPULATION = np.array([0.1, 0.2, 0.3, 0.4])
WEIGHTINGS = {
    "num_examples": (agg.num_examples, ref_num_examples),
    "uniform": (agg.uniform, lambda o: o.finite / o.finite.sum()),
    "loss": (lambda: agg.loss(0.5), lambda o: np_softmax(-o.train_loss / 0.5, o.finite > 0)),
    "loss_improvement": (lambda: agg.loss_improvement(2.0), lambda o: np_softmax(
        (o.loss_before - o.loss_after) / 2.0, o.finite > 0)),
    "cosine": (agg.cosine, ref_cosine),
    "fedadp": (agg.fedadp, ref_fedadp),
    "label_divergence": (lambda: agg.label_divergence(2.0),
                         lambda o: ref_label_kl_weights(o, 2.0)),
    "label_divergence_population": (lambda: agg.label_divergence(1.0, POPULATION),
                                    lambda o: ref_label_kl_weights(o, 1.0, POPULATION)),
    "label_entropy": (lambda: agg.label_entropy(1.5), lambda o: ref_entropy_weights(o, 1.5)),
    "product": (lambda: agg.product(agg.num_examples(), agg.loss(0.5)),
                lambda o: (lambda w: w / w.sum())(
                    ref_num_examples(o) * np_softmax(-o.train_loss / 0.5, o.finite > 0))),
    "power": (lambda: agg.power(agg.num_examples(), 2.0),
              lambda o: (lambda w: w / w.sum())(ref_num_examples(o) ** 2)),
    "floor": (lambda: agg.floor(agg.cosine(), 0.3),
              lambda o: 0.7 * ref_cosine(o) + 0.3 * o.finite / o.finite.sum()),
}


def weights_of(fn, out, state=None):
  state = fn.init(N) if state is None else state
  return jax.jit(fn.apply)(out, state)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_weighting_matches_numpy_reference(name):
  make, ref = WEIGHTINGS[name]
  out = make_outputs()
  w, _ = weights_of(make(), out)
  np.testing.assert_allclose(np.asarray(w), ref(np_out(out)), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_weighting_properties(name):
  fn = WEIGHTINGS[name][0]()
  out = make_outputs(seed=3)
  w, _ = weights_of(fn, out)
  w = np.asarray(w)
  assert np.all(w >= 0)
  assert abs(w.sum() - 1) < 1e-6
  assert w[BAD] == 0.0
  # Permutation: permuting the cohort (with its client ids) permutes the weights.
  perm = np.array([3, 0, 5, 1, 4, 2])
  wp, _ = weights_of(fn, jax.tree.map(lambda a: a[perm], out))
  np.testing.assert_allclose(np.asarray(wp), w[perm], rtol=1e-5, atol=1e-7)
  # Padding: extra non-finite clients get zero and change nothing else.
  pad = make_outputs(seed=9, k=2, bad=(0, 1))
  pad = pad._replace(client_id=jnp.asarray([out.client_id[0], out.client_id[1]]))
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, pad)
  wb, _ = weights_of(fn, both)
  np.testing.assert_allclose(np.asarray(wb), np.concatenate([w, [0, 0]]), rtol=1e-5,
                             atol=1e-7)
  if fn.score is not None:   # the streamed form gives the same weights
    u = np.asarray(jax.vmap(fn.score)(out))
    u = np.where(np.asarray(out.finite), u, 0.0)
    np.testing.assert_allclose(u / u.sum(), w, rtol=1e-5, atol=1e-7)


def test_all_nonfinite_gives_zero_weights_and_no_nan():
  out = make_outputs(bad=tuple(range(K)))
  for name, (make, _) in WEIGHTINGS.items():
    w, _ = weights_of(make(), out)
    assert np.all(np.asarray(w) == 0), name


def test_fedadp_smooths_angles_over_participation():
  fn = agg.fedadp()
  o1, o2 = make_outputs(seed=1, bad=()), make_outputs(seed=2, bad=())
  o2 = o2._replace(client_id=o1.client_id)     # the same clients, twice
  _, s1 = weights_of(fn, o1)
  w2, s2 = weights_of(fn, o2, s1)
  th1 = np.arccos(np.clip(np_cos(np_out(o1)), -1, 1))
  th2 = np.arccos(np.clip(np_cos(np_out(o2)), -1, 1))
  smooth = 0.5 * th1 + 0.5 * th2               # t = 2: (1/2) θ̃ + θ / 2
  ids = np.asarray(o1.client_id)
  np.testing.assert_allclose(np.asarray(s2.angle)[ids], smooth, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(s2.count)[ids], 2)
  assert np.asarray(s2.count).sum() == 2 * K
  f = 5 * (1 - np.exp(-np.exp(-5 * (smooth - 1))))
  np.testing.assert_allclose(
      np.asarray(w2), np_softmax(np.log(np.asarray(o2.num_examples, float)) + f,
                                 np.ones(K, bool)), rtol=2e-5)


def test_gompertz_values_from_the_issue():
  np.testing.assert_allclose(
      [float(agg.gompertz(t)) for t in (0.0, 1.0, math.pi / 2)], [5.0, 3.16060, 0.27993],
      atol=5e-6)


# ----------------------------------------------------------------- aggregators


def np_finite_rows(o):
  keep = o.finite.astype(bool)
  return flat(o.delta)[keep], keep


def ref_median(o):
  d, _ = np_finite_rows(o)
  return np.median(d, axis=0)


def ref_trimmed(o, beta):
  d, _ = np_finite_rows(o)
  m = d.shape[0]
  b = int(math.floor(beta * m))
  s = np.sort(d, axis=0)
  return s[b:m - b].mean(0)


def ref_multi_krum(o, f, m=None):
  d, keep = np_finite_rows(o)
  mm = d.shape[0]
  scores = []
  for i in range(mm):
    dist = sorted(np.sum((d[i] - d[j]) ** 2) for j in range(mm) if j != i)
    scores.append(sum(dist[:mm - f - 2]))
  take = mm - f if m is None else m
  best = np.argsort(scores, kind="stable")[:take]
  return d[best].mean(0)


def ref_clip(o, c):
  d, keep = np_finite_rows(o)
  norms = np.linalg.norm(d, axis=1)
  d = d * np.minimum(1.0, c / norms)[:, None]
  n = o.num_examples[keep]
  return (n / n.sum()) @ d


def ref_qffl(o, q, lr):
  d, keep = np_finite_rows(o)
  big_l = 1.0 / lr
  f = o.loss_before[keep]
  dw = big_l * (-d)                            # L (w_t − w̄_k), with Δ = w̄_k − w_t
  deltas = (f ** q)[:, None] * dw
  h = q * f ** (q - 1) * np.sum(dw ** 2, 1) + big_l * f ** q
  return -deltas.sum(0) / h.sum()


AGGREGATORS = {
    "median": (agg.median, ref_median),
    "trimmed_mean": (lambda: agg.trimmed_mean(0.2), lambda o: ref_trimmed(o, 0.2)),
    "krum": (lambda: agg.krum(1), lambda o: ref_multi_krum(o, 1, m=1)),
    "multi_krum": (lambda: agg.multi_krum(1, m=3), lambda o: ref_multi_krum(o, 1, m=3)),
    "multi_krum_default": (lambda: agg.multi_krum(1), lambda o: ref_multi_krum(o, 1)),
    "clip_norm": (lambda: agg.clip_norm(1.5), lambda o: ref_clip(o, 1.5)),
    "q_ffl": (lambda: agg.q_ffl(2.0, 0.1), lambda o: ref_qffl(o, 2.0, 0.1)),
    "q_ffl_0": (lambda: agg.q_ffl(0.0, 0.1), lambda o: ref_qffl(o, 0.0, 0.1)),
}


def aggregate_of(a, out):
  a = agg.as_aggregator(a)
  params = jax.tree.map(lambda d: jnp.zeros(d.shape[1:]), out.delta)
  delta, w, _ = jax.jit(a.apply)(out, a.init(N), params)
  return flat(jax.tree.map(lambda d: d[None], delta))[0], np.asarray(w)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_matches_numpy_reference(name):
  make, ref = AGGREGATORS[name]
  for seed, k in ((0, K), (5, 7)):              # even and odd numbers of finite clients
    out = make_outputs(seed=seed, k=k)
    got, w = aggregate_of(make(), out)
    np.testing.assert_allclose(got, ref(np_out(out)), rtol=2e-5, atol=1e-6)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6 and w[BAD] == 0


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_permutation_and_padding(name):
  a = AGGREGATORS[name][0]()
  out = make_outputs(seed=4, k=7)
  got, w = aggregate_of(a, out)
  perm = np.array([6, 3, 0, 5, 1, 4, 2])
  got_p, w_p = aggregate_of(a, jax.tree.map(lambda x: x[perm], out))
  np.testing.assert_allclose(got_p, got, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_p, w[perm], rtol=1e-5, atol=1e-7)
  pad = make_outputs(seed=9, k=2, bad=(0, 1))
  got_b, w_b = aggregate_of(a, jax.tree.map(lambda x, y: jnp.concatenate([x, y]), out, pad))
  np.testing.assert_allclose(got_b, got, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_b, np.concatenate([w, [0, 0]]), rtol=1e-5, atol=1e-7)


def test_q_ffl_with_q_zero_is_uniform_fedavg():
  out = make_outputs(seed=6)
  got, _ = aggregate_of(agg.q_ffl(0.0, 0.05), out)
  d, _ = np_finite_rows(np_out(out))
  np.testing.assert_allclose(got, d.mean(0), rtol=1e-5, atol=1e-6)


def test_median_resists_a_scaled_minority():
  out = make_outputs(seed=7, k=7, bad=())
  honest, _ = aggregate_of(agg.median(), out)
  flip = out._replace(delta=jax.tree.map(lambda d: d.at[:2].multiply(-10.0), out.delta))
  attacked, _ = aggregate_of(agg.median(), flip)
  mean_shift = np.abs(aggregate_of(agg.uniform(), flip)[0] - aggregate_of(agg.uniform(), out)[0])
  assert np.max(np.abs(attacked - honest)) < 0.5 * np.max(mean_shift)


def test_krum_needs_enough_clients():
  with pytest.raises(ValueError, match="2f \\+ 3"):
    aggregate_of(agg.krum(2), make_outputs(k=6))


def test_robust_options_that_would_be_the_plain_mean_are_refused():
  with pytest.raises(ValueError, match=r"trims floor\(beta k\) = 0 of the k=5 clients"):
    aggregate_of(agg.trimmed_mean(0.1), make_outputs(k=5))
  aggregate_of(agg.trimmed_mean(0.2), make_outputs(k=5))       # trims one per side
  aggregate_of(agg.trimmed_mean(0.0), make_outputs(k=5))       # explicitly the mean
  with pytest.raises(ValueError, match="m=6 exceeds the k=5 clients"):
    aggregate_of(agg.multi_krum(1, m=6), make_outputs(k=5))


@pytest.mark.parametrize("bad_call, match", [
    (lambda: agg.trimmed_mean(0.5), "beta"),
    (lambda: agg.krum(-1), "f \\(Byzantine"),
    (lambda: agg.q_ffl(-1.0, 0.1), "q \\(q-FFL"),
    (lambda: agg.q_ffl(1.0, 0.0), "learning_rate"),
    (lambda: agg.loss(0.0), "temperature"),
    (lambda: agg.power(agg.uniform(), -1.0), "exponent"),
    (lambda: agg.floor(agg.uniform(), 1.5), "fraction"),
    (lambda: agg.clip_norm(0.0), "max_norm"),
    (lambda: agg.label_divergence(1.0, [0.5, 0.6]), "population"),
    (lambda: agg.fedadp(alpha=0), "alpha"),
    (lambda: agg.scaled_updates(agg.median(), [0, 1], -10.0), "bool mask"),
])
def test_bad_arguments_raise_clear_errors(bad_call, match):
  with pytest.raises(ValueError, match=match):
    bad_call()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 17, 100])
def test_sorting_network_matches_numpy_sort(n):
  x = np.random.default_rng(n).normal(size=(n, 7, 3)).astype(np.float32)
  x[0, 0, 0] = np.inf
  x[n // 2, 1, 1] = -np.inf
  np.testing.assert_array_equal(np.asarray(jax.jit(agg.sort_clients)(x)), np.sort(x, axis=0))


def test_fedadp_smoothed_angle_is_the_running_mean_over_participations():
  """Four rounds over different cohorts: each client's θ̃ is the plain mean of the angles
  of the rounds it took part in (a ½-weight moving average agrees only up to t = 2)."""
  fn = agg.fedadp()
  state = fn.init(N)
  seen = {}
  rng = np.random.default_rng(7)
  for t in range(4):
    o = make_outputs(seed=10 + t, bad=())
    ids = np.sort(rng.permutation(N)[:K]) if t else np.arange(K)
    if t == 3:
      ids = np.arange(K)   # clients 0..K-1 again: some reach three or four participations
    o = o._replace(client_id=jnp.asarray(ids, jnp.int32))
    _, state = weights_of(fn, o, state)
    theta = np.arccos(np.clip(np_cos(np_out(o)), -1, 1))
    for i, th in zip(ids, theta):
      seen.setdefault(int(i), []).append(th)
  assert max(len(v) for v in seen.values()) >= 3
  for i, angles in seen.items():
    assert float(state.angle[i]) == pytest.approx(np.mean(angles), rel=1e-5), i
    assert int(state.count[i]) == len(angles)


def test_label_divergence_at_temperature_zero_is_data_size_whatever_the_population():
  """The issue's case: q gives label 2 probability 0, which client 2 holds."""
  hist = jnp.asarray([[5, 5, 0], [10, 0, 0], [2, 2, 2]], jnp.float32)
  o = make_outputs(k=3, bad=())._replace(label_hist=hist,
                                          num_examples=jnp.asarray([10, 10, 6], jnp.int32))
  w, _ = weights_of(agg.label_divergence(0.0, population=[0.5, 0.5, 0.0]), o)
  np.testing.assert_allclose(w, np.array([10, 10, 6]) / 26, rtol=1e-6)
  with pytest.raises(ValueError, match=r"population gives probability 0 to labels \[2\]"):
    agg.label_divergence(1.0, population=[0.5, 0.5, 0.0])
  w, _ = weights_of(agg.label_divergence(1.0, population=[0.45, 0.45, 0.1]), o)
  assert np.all(np.isfinite(w)) and abs(float(np.sum(w)) - 1) < 1e-6


def test_krum_scores_survive_a_large_common_part_in_float32():
  """5,000 parameters, spread 1e-3 around a common part of norm 30 (the issue's case):
  the scores match float64 arithmetic and Krum picks what float64 picks."""
  rng = np.random.default_rng(0)
  d, k, f = 5000, 10, 2
  picks = 0
  for _ in range(20):
    common = rng.normal(size=d)
    common *= 30 / np.linalg.norm(common)
    x = common[None] + 1e-3 * rng.normal(size=(k, d)) * rng.uniform(0.5, 2.0, (k, 1))
    o = make_outputs(k=k, bad=())._replace(delta={"w": jnp.asarray(x, jnp.float32)},
                                            finite=jnp.ones(k, bool))
    got = np.asarray(agg.krum_scores(o, f), np.float64)
    x32 = np.asarray(np.asarray(x, np.float32), np.float64)   # the same float32 inputs
    dist = ((x32[:, None] - x32[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    want = np.sort(dist, axis=1)[:, :k - f - 2].sum(1)
    np.testing.assert_allclose(got, want, rtol=2e-3)
    picks += int(np.argmin(got) == np.argmin(want))
  assert picks == 20
