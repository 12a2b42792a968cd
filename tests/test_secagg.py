"""Simulated secure aggregation: the unmasked sum is the plain sum of the encoded updates
exactly, with and without dropouts; fixed point; the aggregate against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_aggregation import make_outputs

from fedjax_pers import privacy
from fedjax_pers.privacy import _secagg


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("alive", [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1]])
def test_unmasked_sum_is_the_plain_sum_exactly(bits, alive):
  rng = np.random.default_rng(bits)
  k, d = 6, 33
  q = rng.integers(0, 2 ** bits, (k, d), dtype=np.uint64)
  ids = np.array([17, 3, 40, 8, 25, 1])
  alive = np.array(alive, bool)
  key = jax.random.key(bits)
  got = jax.jit(_secagg.secure_sum, static_argnums=4)(
      jnp.asarray(q, jnp.uint32), jnp.asarray(ids, jnp.int32), jnp.asarray(alive), key, bits)
  want = q[alive].sum(axis=0) % (2 ** bits)
  np.testing.assert_array_equal(np.asarray(got, np.uint64), want)
  # What the server receives hides each input: the masked vectors are not the q_i, and
  # the masks without the pairwise cancellation do not sum to zero.
  m = np.asarray(_secagg.masks(jnp.asarray(ids, jnp.int32), key, d, bits), np.uint64)
  assert np.all(m < 2 ** bits)
  assert (m != 0).mean() > 0.9


def test_pairwise_masks_cancel_over_the_whole_cohort():
  ids = jnp.asarray([5, 2, 9], jnp.int32)
  key = jax.random.key(0)
  m = np.asarray(_secagg.masks(ids, key, 8, 32), np.uint64)
  own = np.stack([np.asarray(_secagg._prg(jax.random.fold_in(jax.random.split(key)[1], i),
                                          8, 32), np.uint64) for i in (5, 2, 9)])
  np.testing.assert_array_equal((m.sum(0) - own.sum(0)) % 2 ** 32, 0)


@pytest.mark.parametrize("bits", [16, 32])
def test_fixed_point_round_trip_with_negative_sums(bits):
  k, c = 4, 1.0
  s = _secagg.scale(c, bits, k)
  x = jnp.asarray([[-0.9, 0.3, 0.0], [-0.5, -0.2, 0.7], [-0.1, 0.9, -0.7], [-0.3, 0.0, 0.1]])
  q = jax.vmap(lambda v, i: _secagg.encode(v, s, bits, jax.random.key(i)))(x, jnp.arange(k))
  total = jnp.sum(q, axis=0, dtype=jnp.uint32) & _secagg.modulus_mask(bits)
  got = _secagg.decode(total, s, bits)
  np.testing.assert_allclose(got, np.asarray(x).sum(0), atol=2 * k / s)
  assert float(got[0]) < -1.7
  # Unbiased rounding: many draws of one value average to it.
  draws = jax.vmap(lambda kk: _secagg.decode(_secagg.encode(
      jnp.full(1, 0.123456), s, bits, kk), s, bits))(jax.random.split(jax.random.key(1), 4000))
  assert abs(float(jnp.mean(draws)) - 0.123456) < 5 / s / math.sqrt(4000) + 1e-7


def test_secure_aggregate_is_the_clipped_mean_of_the_survivors():
  out = make_outputs(k=6)   # client 2 sends NaN: it counts as dropped
  c = 2.0
  a = privacy.secure_aggregator(c, 32, 6, jax.random.key(3), dropout_rate=0.3)
  delta, w, st = jax.jit(a.apply)(out, a.init(10), None)
  w = np.asarray(w)
  alive = w > 0
  assert not alive[2] and 0 < alive.sum() < 6   # this key drops some of them
  flat = np.concatenate([np.asarray(out.delta["a"]).reshape(6, -1),
                         np.asarray(out.delta["b"])], 1).astype(np.float64)
  d = flat.shape[1]
  inner = c - 2 * math.sqrt(d) / _secagg.scale(c, 32, 6)
  norms = np.linalg.norm(flat, axis=1, keepdims=True)
  clipped = flat * np.minimum(1, inner / np.where(np.isfinite(norms), norms, 1))
  want = clipped[alive].mean(0)
  got = np.concatenate([np.asarray(delta["a"]).ravel(), np.asarray(delta["b"])])
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(w[alive], 1 / alive.sum())
  # The key moves on: the next round draws other dropouts and masks.
  assert not np.array_equal(jax.random.key_data(st.key), jax.random.key_data(a.init(10).key))


def test_secure_aggregate_with_dp_noise_has_std_zc_over_w():
  k, dim, c, z, den = 4, 30_000, 0.5, 1.1, 3.0
  out = make_outputs(k=k, bad=())._replace(delta={"w": jnp.zeros((k, dim))})
  a = privacy.secure_aggregator(c, 32, k, jax.random.key(0), noise_multiplier=z,
                                denominator=den)
  delta, w, _ = jax.jit(a.apply)(out, a.init(10), None)
  x = np.asarray(delta["w"], np.float64)
  from scipy import stats
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], dim)
  assert lo <= np.sum(x ** 2) / (z * c / den) ** 2 <= hi
  np.testing.assert_allclose(w, np.full(k, 1 / den))


@pytest.mark.parametrize("kw,message", [
    (dict(bits=4), r"secure_aggregation.bits must be an int in \[8, 32\]"),
    (dict(dropout_rate=1.0), r"dropout_rate must be a number in \[0, 1\)"),
    (dict(noise_multiplier=1.0), "need its fixed denominator"),
])
def test_refusals(kw, message):
  args = dict(clip_norm=1.0, bits=16, clients_per_round=4, key=jax.random.key(0)) | kw
  with pytest.raises(ValueError, match=message):
    privacy.secure_aggregator(**args)


def test_too_few_bits_for_the_model_is_refused_at_trace():
  out = make_outputs(k=6)
  a = privacy.secure_aggregator(1.0, 8, 60, jax.random.key(0))
  with pytest.raises(ValueError, match="secure_aggregation.bits=8 leaves no room"):
    jax.jit(a.apply)(out, a.init(10), None)
