"""Compressed updates: the rotation against the Hadamard matrix, unbiased quantisation
(Monte Carlo), top-k and its error feedback against NumPy, bits on the wire."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg
from test_aggregation import make_outputs

from fedjax_pers import aggregation as agg
from fedjax_pers import privacy
from fedjax_pers.privacy import Compressor


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_hadamard_is_the_orthonormal_walsh_matrix(d):
  x = np.random.default_rng(d).normal(size=d).astype(np.float32)
  want = linalg.hadamard(d) @ x.astype(np.float64) / math.sqrt(d)
  np.testing.assert_allclose(privacy.hadamard(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(privacy.hadamard(privacy.hadamard(jnp.asarray(x))), x,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [1, 5, 37, 128])
def test_rotation_preserves_norms_and_inverts(d):
  rng = np.random.default_rng(d)
  x = jnp.asarray(rng.normal(size=d) * 3.0, jnp.float32)
  key = jax.random.key(d)
  z = privacy.rotate(x, key)
  assert z.shape == (privacy.padded_size(d),)
  assert float(jnp.linalg.norm(z)) == pytest.approx(float(jnp.linalg.norm(x)), rel=1e-5)
  np.testing.assert_allclose(privacy.unrotate(z, key, d), x, rtol=1e-5, atol=1e-5)
  # The signs come from the key: another key, another rotation.
  if d > 1:
    assert not np.allclose(privacy.rotate(x, jax.random.key(d + 1)), z)


@pytest.mark.parametrize("bits,rot", [(1, False), (2, False), (4, True)])
def test_quantisation_is_unbiased_and_on_its_grid(bits, rot):
  rng = np.random.default_rng(bits)
  d, trials = 24, 40_000
  x = jnp.asarray(rng.normal(size=d), jnp.float32)
  k_rot = jax.random.key(99)

  def one(key):
    if rot:
      return privacy.unrotate(privacy.quantize(privacy.rotate(x, k_rot), bits, key), k_rot, d)
    return privacy.quantize(x, bits, key)

  ys = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(bits), trials)),
                  np.float64)
  se = ys.std(axis=0) / math.sqrt(trials)
  assert np.all(np.abs(ys.mean(axis=0) - np.asarray(x)) <= 5 * se + 1e-6)
  if not rot:   # every value is one of the 2^b levels between min and max
    lo, hi = float(x.min()), float(x.max())
    levels = lo + np.arange(2 ** bits) * (hi - lo) / (2 ** bits - 1)
    assert np.all(np.min(np.abs(ys[:100, :, None] - levels), axis=-1) < 1e-5)
    # Rounding only to the two neighbouring levels: the error is below one step.
    assert np.all(np.abs(ys - np.asarray(x)) <= (hi - lo) / (2 ** bits - 1) + 1e-5)


def test_quantisation_of_a_constant_vector_is_exact():
  x = jnp.full(7, 0.25, jnp.float32)
  np.testing.assert_array_equal(privacy.quantize(x, 2, jax.random.key(0)), x)


def test_rotation_shrinks_the_quantisation_error_of_a_spiky_update():
  """Suresh et al. §4: one large coordinate on Gaussian ones; rotated, the range is
  O(‖x‖ √(log d / d)) instead of the spike's."""
  d = 1024
  x = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32).at[3].set(100.0)
  keys = jax.random.split(jax.random.key(0), 64)
  plain = jax.vmap(lambda k: privacy.quantize(x, 2, k))(keys)
  rotd = jax.vmap(lambda k: privacy.unrotate(
      privacy.quantize(privacy.rotate(x, jax.random.key(5)), 2, k), jax.random.key(5), d))(keys)
  mse = lambda y: float(jnp.mean(jnp.sum((y - x[None]) ** 2, axis=1)))
  assert mse(rotd) < mse(plain) / 5


def test_top_k_keeps_the_largest_magnitudes():
  x = np.array([0.5, -3.0, 2.0, 0.1, -2.5], np.float32)
  np.testing.assert_array_equal(privacy.top_k(jnp.asarray(x), 2), [0, -3.0, 0, 0, -2.5])


def test_top_k_with_error_feedback_matches_numpy_over_rounds():
  """Two rounds, the same cohort: client i sends top_k(x_i + e_i), keeps the rest."""
  out = make_outputs(k=4, bad=())
  d = 10
  c = Compressor("top_k", fraction=0.3)
  a = privacy.compressed(agg.uniform(), c, jax.random.key(0), num_params=d)
  st = a.init(50)
  flat = np.concatenate([np.asarray(out.delta["a"]).reshape(4, -1),
                         np.asarray(out.delta["b"])], axis=1).astype(np.float64)
  mem = np.zeros((4, d))
  for _ in range(2):
    delta, w, st = jax.jit(a.apply)(out, st, None)
    full = flat + mem
    sent = np.zeros_like(full)
    for i in range(4):
      top = np.argsort(-np.abs(full[i]))[:3]
      sent[i, top] = full[i, top]
    mem = full - sent
    got = np.concatenate([np.asarray(delta["a"]).ravel(), np.asarray(delta["b"])])
    np.testing.assert_allclose(got, sent.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(st.memory)[np.asarray(out.client_id)], mem,
                               rtol=1e-5, atol=1e-6)
  others = np.setdiff1d(np.arange(50), np.asarray(out.client_id))
  assert not np.asarray(st.memory)[others].any()


def test_compressed_aggregate_is_unbiased_and_skips_nonfinite_clients():
  out = make_outputs(k=6)   # client BAD sends NaN: weight 0, as without compression
  a = privacy.compressed(agg.uniform(), Compressor("quantize", bits=2, rotate=True),
                         jax.random.key(1))
  st, runs = a.init(50), []
  apply = jax.jit(a.apply)
  for _ in range(3000):
    delta, w, st = apply(out, st, None)
    runs.append(np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(delta)]))
  base = privacy.compressed(agg.uniform(), Compressor("quantize", bits=16), jax.random.key(1))
  ref, w_ref, _ = jax.jit(base.apply)(out, base.init(50), None)
  ref = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(ref)])
  runs = np.asarray(runs)
  assert np.all(np.isfinite(runs))
  np.testing.assert_allclose(w, w_ref)
  assert float(w[np.where(~np.asarray(out.finite))[0][0]]) == 0.0
  se = runs.std(axis=0) / math.sqrt(len(runs))
  assert np.all(np.abs(runs.mean(axis=0) - ref) <= 5 * se + 1e-4)


def test_bits_per_client():
  d = 1000
  assert privacy.bits_per_client(None, d) == 32_000
  assert privacy.bits_per_client(Compressor("quantize", bits=4), d) == 4 * 1000 + 64
  assert privacy.bits_per_client(Compressor("quantize", bits=4, rotate=True), d) == 4 * 1024 + 64
  assert privacy.bits_per_client(Compressor("top_k", fraction=0.01), d) == 10 * (32 + 10)


@pytest.mark.parametrize("c,kw,message", [
    (Compressor("gzip"), {}, "compression.method must be one of"),
    (Compressor("quantize", bits=0), {}, r"compression.bits must be an int in \[1, 16\]"),
    (Compressor("quantize", bits=2.0), {}, r"compression.bits must be an int"),
    (Compressor("top_k", fraction=0.0), {"num_params": 3}, r"fraction must be a number in"),
    (Compressor("top_k"), {}, "num_params must be the model's parameter count"),
])
def test_refusals(c, kw, message):
  with pytest.raises(ValueError, match=message):
    privacy.compressed(agg.uniform(), c, jax.random.key(0), **kw)
