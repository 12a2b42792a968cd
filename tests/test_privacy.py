"""Client-level DP-FedAvg: accounting against dp-accounting and the Gaussian mechanism's
closed form, calibration, clipping, the noise's scale, the aggregate in a round."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import client_deltas
from dp_accounting import pld, rdp
from scipy import optimize, stats
from test_aggregation import make_outputs
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers import privacy
from fedjax_pers.algorithms import fedavg

GRID = [(q, z, t, d) for q in (0.01, 0.2) for z in (0.7, 1.5) for t in (1, 150)
        for d in (1e-5, 1e-3)]


@pytest.mark.parametrize("q,z,t,delta", GRID)
def test_epsilon_is_dp_accounting_called_directly(q, z, t, delta):
  poisson = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
  assert privacy.epsilon(z, q, t, delta) == rdp.RdpAccountant().compose(
      poisson).get_epsilon(delta)
  assert privacy.epsilon(z, q, t, delta, "pld") == pld.PLDAccountant().compose(
      poisson).get_epsilon(delta)
  # Fixed size m of N: one client replaced moves the sum by 2C, so z / 2 per sensitivity.
  n = 500
  wor = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      n, round(q * n), dp_accounting.GaussianDpEvent(z / 2)), t)
  replace = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  assert privacy.epsilon(z, q, t, delta, sampling="fixed", num_clients=n) == (
      replace.compose(wor).get_epsilon(delta))


def gaussian_epsilon(z, delta):
  """ε of one Gaussian mechanism of multiplier z at δ, from the exact tradeoff
  (Balle & Wang, ICML 2018, Theorem 8): δ(ε) = Φ(1/(2z) − εz) − e^ε Φ(−1/(2z) − εz)."""
  dlt = lambda e: (stats.norm.cdf(1 / (2 * z) - e * z)
                   - math.exp(e) * stats.norm.cdf(-1 / (2 * z) - e * z) - delta)
  return optimize.brentq(dlt, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("z", [0.8, 2.0])
def test_one_unsampled_round_is_the_exact_gaussian_mechanism(z):
  exact = gaussian_epsilon(z, 1e-5)
  assert privacy.epsilon(z, 1.0, 1, 1e-5, "pld") == pytest.approx(exact, rel=2e-3)
  assert exact <= privacy.epsilon(z, 1.0, 1, 1e-5, "rdp") <= 1.5 * exact   # RDP: a bound


def test_epsilon_grows_with_rounds_and_falls_with_noise():
  eps = [privacy.epsilon(1.0, 0.05, t, 1e-5) for t in (0, 1, 10, 100, 1000)]
  assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:]))
  assert privacy.epsilon(2.0, 0.05, 100, 1e-5) < eps[3]
  assert privacy.epsilon(0.0, 0.05, 100, 1e-5) == math.inf


@pytest.mark.parametrize("accountant,sampling", [("rdp", "poisson"), ("pld", "poisson"),
                                                 ("rdp", "fixed")])
def test_calibration_returns_the_smallest_noise_meeting_the_target(accountant, sampling):
  kw = dict(accountant=accountant, sampling=sampling, num_clients=1000)
  z = privacy.calibrate_noise(2.0, 0.02, 60, 1e-5, **kw)
  assert privacy.epsilon(z, 0.02, 60, 1e-5, **kw) <= 2.0
  assert privacy.epsilon(z * 0.99, 0.02, 60, 1e-5, **kw) > 2.0
  assert privacy.epsilon(z * 1.01, 0.02, 60, 1e-5, **kw) < 2.0


@pytest.mark.parametrize("call,message", [
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, "pld", "fixed", 100), "no event for sampling"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, "moments"), "accountant must be one of"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, sampling="shuffle"), "sampling must be"),
    (lambda: privacy.epsilon(1.0, 0.0, 10, 1e-5), "sampling_rate must be a number in"),
    (lambda: privacy.epsilon(-1.0, 0.1, 10, 1e-5), "noise_multiplier must be a number >= 0"),
    (lambda: privacy.epsilon(1.0, 0.1, 2.5, 1e-5), "steps must be an int >= 0; got 2.5"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1.0), "delta must be a number in (0, 1)"),
    (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, sampling="fixed"), "needs num_clients"),
    (lambda: privacy.epsilon(1.0, 0.015, 10, 1e-5, sampling="fixed", num_clients=100),
     "whole number of clients"),
    (lambda: privacy.calibrate_noise(0.0, 0.1, 10, 1e-5), "target_epsilon must be"),
    (lambda: privacy.dp_fedavg_aggregator(0.0, 1.0, 5.0, jax.random.key(0)),
     "clip_norm must be a finite number > 0; got 0.0"),
    (lambda: privacy.dp_fedavg_aggregator(1.0, math.nan, 5.0, jax.random.key(0)),
     "noise_multiplier must be a finite number >= 0"),
    (lambda: privacy.dp_fedavg_aggregator(1.0, 1.0, 5.0, jax.random.key(0), example_cap=0),
     "example_cap must be None or an int >= 1; got 0"),
])
def test_bad_input_is_named(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    call()


def test_clipping_keeps_small_updates_and_maps_large_ones_to_norm_c():
  rng = np.random.default_rng(0)
  d = {"a": rng.normal(size=(6, 3, 2)).astype(np.float32),
       "b": rng.normal(size=(6, 4)).astype(np.float32)}
  d["a"][1] *= 1e-3
  d["b"][1] *= 1e-3
  norms = np.sqrt((d["a"].reshape(6, -1) ** 2).sum(1) + (d["b"] ** 2).sum(1))
  c = float(np.median(norms))
  clipped, got = privacy.clip_updates(jax.tree.map(jnp.asarray, d), c)
  np.testing.assert_allclose(got, norms, rtol=1e-6)
  for i in range(6):
    if norms[i] <= c:   # unchanged, bit for bit
      for k in d:
        np.testing.assert_array_equal(np.asarray(clipped[k][i]), d[k][i])
    else:
      new = math.sqrt(sum(float(np.sum(np.asarray(clipped[k][i], np.float64) ** 2))
                          for k in d))
      assert new == pytest.approx(c, rel=1e-6)
      np.testing.assert_allclose(clipped["a"][i], d["a"][i] * c / norms[i], rtol=1e-6)


def np_dp_mean(out, c, w_cap, denominator):
  """Σ w_i clip(Δ_i, C) / W with NumPy, non-finite clients left out (no noise)."""
  keep = np.asarray(out.finite)
  n = np.asarray(out.num_examples, np.float64)
  w = np.ones_like(n) if w_cap is None else np.minimum(n / w_cap, 1.0)
  w = np.where(keep, w, 0.0)
  leaves = {k: np.where(keep.reshape(-1, *([1] * (v.ndim - 1))), np.asarray(v, np.float64), 0)
            for k, v in out.delta.items()}
  norm = np.sqrt(sum((v.reshape(len(n), -1) ** 2).sum(1) for v in leaves.values()))
  scale = np.minimum(1.0, c / np.maximum(norm, 1e-30))
  return {k: np.tensordot(w * scale, v, axes=1) / denominator for k, v in leaves.items()}, w


@pytest.mark.parametrize("cap", [None, 20])
def test_aggregate_without_noise_matches_numpy(cap):
  out = make_outputs(seed=1)
  a = privacy.dp_fedavg_aggregator(1.2, 0.0, 4.5, jax.random.key(0), example_cap=cap)
  delta, weights, _ = jax.jit(a.apply)(out, a.init(10), None)
  ref, w = np_dp_mean(out, 1.2, cap, 4.5)
  for k in ref:
    np.testing.assert_allclose(delta[k], ref[k], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(weights, w / 4.5, rtol=1e-6)


def test_noise_of_zero_updates_has_std_zc_over_denominator():
  k, dim, c, z, den = 5, 40_000, 0.7, 1.3, 3.0
  out = make_outputs(k=k, bad=())._replace(delta={"w": jnp.zeros((k, dim))})
  a = privacy.dp_fedavg_aggregator(c, z, den, jax.random.key(7))
  delta, _, st = jax.jit(a.apply)(out, a.init(10), None)
  x = np.asarray(delta["w"], np.float64)
  sd = z * c / den
  # dim · s² / σ² ~ χ²(dim) (mean known to be 0): a two-sided 1e-6 interval.
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], dim)
  assert lo <= np.sum(x ** 2) / sd ** 2 <= hi
  assert abs(x.mean()) < 6 * sd / math.sqrt(dim)
  # The key moves on: the next round's noise is fresh; the same key, the same noise.
  again, _, _ = jax.jit(a.apply)(out, a.init(10), None)
  np.testing.assert_array_equal(again["w"], delta["w"])
  nxt, _, _ = jax.jit(a.apply)(out, st, None)
  assert abs(np.corrcoef(np.asarray(nxt["w"]), x)[0, 1]) < 0.05


def test_dp_round_without_noise_and_with_a_large_clip_is_the_uniform_mean():
  """z = 0 and C above every update: DP-FedAvg is FedAvg with uniform weights, W = k."""
  data, k = small_data(), 5
  work = fp.LocalWork(4, epochs=2)
  make = lambda w: fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work,
                          clients_per_round=k, weighting=w)
  dp = make(privacy.dp_fedavg_aggregator(1e6, 0.0, float(k), jax.random.key(1)))
  s0 = dp.init(jax.random.key(3), data)
  s1, m = jax.jit(dp.round)(s0, data)
  w, b, clients = client_deltas(s0.params, data, s0.rng, work, 0.1, k)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             w + sum(c["dw"] for c in clients) / k, atol=1e-5)
  np.testing.assert_allclose(m.weights, np.full(k, 1 / k), rtol=1e-6)
  plain = make(agg.uniform())
  p1, _ = jax.jit(plain.round)(plain.init(jax.random.key(3), data), data)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], p1.params["Dense_0"]["bias"],
                             atol=1e-6)


def test_dp_round_adds_noise_of_std_zc_over_w_and_carries_its_key():
  """The same round with z = 1 and z = 0 differs by the noise alone (server SGD at lr 1):
  N(0, (zC/W)²) per parameter; the key in the server state moves on every round."""
  data, k, c, den = small_data(), 4, 0.5, 4.0
  make = lambda z: fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=1),
                          clients_per_round=k, weighting=privacy.dp_fedavg_aggregator(
                              c, z, den, jax.random.key(9)))
  noisy, quiet = make(1.0), make(0.0)
  s0 = noisy.init(jax.random.key(2), data)
  s1, _ = jax.jit(noisy.round)(s0, data)
  q1, _ = jax.jit(quiet.round)(quiet.init(jax.random.key(2), data), data)
  diff = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                         for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(q1.params))])
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], diff.size)
  assert lo <= np.sum((diff / (c / den)) ** 2) <= hi
  assert not np.array_equal(np.asarray(jax.random.key_data(s1.weight_state.key)),
                            np.asarray(jax.random.key_data(s0.weight_state.key)))
  s2, _ = jax.jit(noisy.round)(s1, data)
  assert not np.array_equal(np.asarray(jax.random.key_data(s2.weight_state.key)),
                            np.asarray(jax.random.key_data(s1.weight_state.key)))


def test_update_noise_multiplier_leaves_the_total_at_z():
  """Andrew et al., Theorem 1: z_Δ⁻² + (2σ_b)⁻² = z⁻²; σ_b ≤ z / 2 is refused."""
  for z, sb in ((1.0, 1.0), (0.7, 5.0), (3.0, 1.6)):
    zd = privacy.update_noise_multiplier(z, sb)
    assert zd > z
    assert zd ** -2 + (2 * sb) ** -2 == pytest.approx(z ** -2, rel=1e-12)
  assert privacy.update_noise_multiplier(0.0, 0.0) == 0.0
  with pytest.raises(ValueError, match=r"count_stddev must exceed noise_multiplier / 2 = 0.5"):
    privacy.update_noise_multiplier(1.0, 0.5)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_adaptive_clipping_without_noise_converges_to_the_quantile(gamma):
  """z = 0, σ_b = 0, every round the same 400 update norms (log-normal): C ends where a
  fraction γ of them is not clipped (to the grain of one client in 400 per step)."""
  rng = np.random.default_rng(0)
  k = 400
  norms = np.exp(rng.normal(0.0, 1.0, k))
  out = make_outputs(k=k, bad=())._replace(
      delta={"w": jnp.asarray(norms[:, None] * np.eye(1, 3)[0], jnp.float32)},
      finite=jnp.ones(k, bool))
  a = privacy.dp_fedavg_aggregator(0.01, 0.0, float(k), jax.random.key(0),
                                   target_quantile=gamma, count_stddev=0.0,
                                   expected_clients=float(k))
  apply = jax.jit(a.apply)
  st = a.init(k)
  for _ in range(300):
    _, _, st = apply(out, st, None)
  c = float(st.clip_norm)
  assert abs(np.mean(norms <= c) - gamma) <= 2 / k + 1e-9
  # The NumPy reference of the same 300 geometric steps.
  ref = 0.01
  for _ in range(300):
    ref *= math.exp(-0.2 * (np.mean(norms <= ref) - gamma))
  assert c == pytest.approx(ref, rel=1e-4)


def test_adaptive_clipping_noises_the_update_at_z_delta_c_and_the_count_at_sigma_b():
  k, dim, c0, z, sb, den = 5, 40_000, 0.7, 1.3, 2.0, 3.0
  out = make_outputs(k=k, bad=())._replace(delta={"w": jnp.zeros((k, dim))})
  a = privacy.dp_fedavg_aggregator(c0, z, den, jax.random.key(7), target_quantile=0.5,
                                   count_stddev=sb, expected_clients=4.0)
  delta, _, st = jax.jit(a.apply)(out, a.init(10), None)
  x = np.asarray(delta["w"], np.float64)
  sd = privacy.update_noise_multiplier(z, sb) * c0 / den
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], dim)
  assert lo <= np.sum(x ** 2) / sd ** 2 <= hi
  # All five zero updates are unclipped: C moves by exp(−0.2 ((5 + noise) / 4 − 0.5)).
  counts = []
  st = a.init(10)
  for _ in range(400):
    _, _, nxt = jax.jit(a.apply)(out, st, None)
    counts.append(4.0 * (-math.log(float(nxt.clip_norm) / float(st.clip_norm)) / 0.2 + 0.5)
                  - 5.0)
    st = nxt._replace(clip_norm=jnp.float32(c0))
  assert abs(np.mean(counts)) < 4 * sb / math.sqrt(400)
  assert np.std(counts) == pytest.approx(sb, rel=0.15)


def test_adaptive_clipping_refusals():
  mk = lambda **kw: privacy.dp_fedavg_aggregator(1.0, 1.0, 5.0, jax.random.key(0), **kw)
  with pytest.raises(ValueError, match=r"target_quantile must be a number in \(0, 1\)"):
    mk(target_quantile=1.0, expected_clients=5.0)
  with pytest.raises(ValueError, match="expected_clients must be a finite number > 0"):
    mk(target_quantile=0.5)
  with pytest.raises(ValueError, match="count_stddev must exceed"):
    mk(target_quantile=0.5, expected_clients=5.0, count_stddev=0.5)


def test_local_dp_noises_each_client_and_accounts_without_amplification():
  """Σ_i w_i (0 + N(0, (zC)²)) / W: std zC √(Σ w_i²) / W; ε: T releases of z / 2."""
  k, dim, c, z, den, cap = 5, 40_000, 0.7, 1.3, 3.0, 20
  out = make_outputs(k=k, bad=())._replace(delta={"w": jnp.zeros((k, dim))})
  a = privacy.dp_fedavg_aggregator(c, z, den, jax.random.key(7), example_cap=cap, local=True)
  delta, w, _ = jax.jit(a.apply)(out, a.init(10), None)
  wi = np.minimum(np.asarray(out.num_examples) / cap, 1.0)
  sd = z * c * np.sqrt(np.sum(wi ** 2)) / den
  x = np.asarray(delta["w"], np.float64)
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], dim)
  assert lo <= np.sum(x ** 2) / sd ** 2 <= hi
  gauss = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), 7)
  assert privacy.local_epsilon(z, 7, 1e-5) == pytest.approx(
      rdp.RdpAccountant().compose(gauss).get_epsilon(1e-5), rel=1e-12)
  with pytest.raises(ValueError, match="under local DP is not built"):
    privacy.dp_fedavg_aggregator(c, z, den, jax.random.key(0), local=True,
                                 target_quantile=0.5, expected_clients=5.0)
