"""Batch statistics in the params (`Model.batch_stats`), masked from padding; FedBN keeps the
normalisation layers with the clients, and without them is FedAvg bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import small_data

import fedjax_pers as fp
from configs.mnist_dirichlet_personal import get_config as mnist_personal
from fedjax_pers.algorithms import fedavg, fedbn
from fedjax_pers.core._sgd import sgd_init, sgd_step
from fedjax_pers.experiment import train_and_evaluate

BN = fp.models.cnn_bn((6, 6), 3, features=(2, 3), dense=5)


def _images(num_clients=5, seed=0):
  rs = np.random.RandomState(seed)
  sizes = rs.randint(4, 9, num_clients)
  xs = [rs.normal(size=(n, 6, 6)).astype(np.float32) + c for c, n in enumerate(sizes)]
  ys = [rs.randint(0, 3, n) for n in sizes]
  return fp.FederatedData.from_clients(xs, ys, num_classes=3)


def test_the_statistics_live_in_the_params_and_ignore_padding():
  p = BN.init(jax.random.key(0))
  assert list(p) == ["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Dense_0", "Dense_1"]
  assert set(p["BatchNorm_0"]) == {"scale", "bias", "mean", "var"}
  rs = np.random.RandomState(1)
  x = rs.normal(size=(4, 6, 6)).astype(np.float32)
  junk = np.concatenate([x, 100 * rs.normal(size=(3, 6, 6)).astype(np.float32)])
  mask = np.r_[np.ones(4, bool), np.zeros(3, bool)]
  logits, stats = BN.batch_stats.train(p, jnp.asarray(x), jnp.ones(4, bool))
  padded, padded_stats = BN.batch_stats.train(p, jnp.asarray(junk), jnp.asarray(mask))
  np.testing.assert_allclose(padded[:4], logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(padded_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Running mean: momentum 0.99 from 0 towards the real rows' mean of the first conv.
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(x)[..., None], p["Conv_0"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  real_mean = np.asarray(conv).mean(axis=(0, 1, 2)) + np.asarray(p["Conv_0"]["bias"])
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], 0.01 * real_mean, rtol=1e-4,
                             atol=1e-6)
  # Evaluation normalises with the running statistics: they change its output.
  moved = BN.batch_stats.put(p, stats)
  assert not np.allclose(BN.apply(moved, jnp.asarray(x)), BN.apply(p, jnp.asarray(x)))


def test_a_local_step_writes_the_batch_statistics_and_trains_the_rest():
  p = BN.init(jax.random.key(0))
  x = jnp.asarray(np.random.RandomState(2).normal(size=(5, 6, 6)), jnp.float32)
  y, mask = jnp.asarray([0, 1, 2, 0, 1]), jnp.asarray([True] * 4 + [False])
  tx = optax.sgd(0.1)
  s = sgd_step(BN, tx, sgd_init(tx, p), x, y, mask, jax.random.key(0))
  _, stats = BN.batch_stats.train(p, x, mask)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(s.w["BatchNorm_1"][k], stats["BatchNorm_1"][k])
  assert not np.allclose(s.w["Conv_0"]["kernel"], p["Conv_0"]["kernel"])
  assert not np.allclose(s.w["BatchNorm_0"]["scale"], p["BatchNorm_0"]["scale"])


def test_fedbn_without_normalisation_layers_is_fedavg_bit_for_bit():
  mlp = fp.models.mlp((5,), 3, hidden=(4,))
  data = small_data(num_clients=6)
  work = fp.LocalWork(3, epochs=2)
  a = fedbn(mlp, optax.sgd(0.1), optax.adam(0.05), work, clients_per_round=3)
  b = fedavg(mlp, optax.sgd(0.1), optax.adam(0.05), work, clients_per_round=3)
  sa, sb = a.init(jax.random.key(0), data), b.init(jax.random.key(0), data)
  for _ in range(3):
    sa, _ = jax.jit(a.round)(sa, data)
    sb, _ = jax.jit(b.round)(sb, data)
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_array_equal(x, y)


def test_fedbn_keeps_the_normalisation_layers_with_the_clients():
  data = _images()
  alg = fedbn(BN, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=1),
              clients_per_round=2)
  s0 = alg.init(jax.random.key(1), data)
  state, step = s0, jax.jit(alg.round)
  seen = set()
  for _ in range(3):
    state, m = step(state, data)
    seen |= set(np.asarray(m.clients).tolist())
  for k in ("scale", "bias", "mean", "var"):   # the server's copy never moves
    np.testing.assert_array_equal(state.params["BatchNorm_0"][k], s0.params["BatchNorm_0"][k])
  assert not np.array_equal(state.params["Conv_0"]["kernel"], s0.params["Conv_0"]["kernel"])
  pers = alg.personal(state)
  for c in range(data.num_clients):   # each client's own statistics (0 if it never trained)
    mean = np.asarray(pers["BatchNorm_0"]["mean"][c])
    assert (np.abs(mean).max() > 0) == (c in seen)
  np.testing.assert_array_equal(pers["Conv_0"]["kernel"][0], state.params["Conv_0"]["kernel"])
  assert step._cache_size() == 1


def test_fedavg_averages_the_statistics_and_refusals(tmp_path):
  data = _images()
  alg = fedavg(BN, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=1),
               clients_per_round=2)
  s0 = alg.init(jax.random.key(1), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  assert np.abs(np.asarray(s1.params["BatchNorm_1"]["mean"])).max() > 0
  assert np.all(np.asarray(s1.params["BatchNorm_1"]["var"]) > 0)
  c = mnist_personal()
  c.algorithm, c.model.name, c.personalization.finetune_steps = "ditto", "cnn_bn", 0
  with pytest.raises(ValueError, match="keeps batch statistics, which algorithm='ditto'"):
    train_and_evaluate(c, str(tmp_path / "ditto"))


def test_norm_layers_are_found_at_any_depth():
  from fedjax_pers.algorithms._fedbn import norm_layers

  assert norm_layers("['BatchNorm_0']['scale']") and norm_layers("['LayerNorm_2']['bias']")
  assert norm_layers("['GroupNorm_1']['scale']") and norm_layers("['BatchNorm_3']['mean']")
  assert norm_layers("['ResBlock_1']['BatchNorm_0']['var']")   # nested in a block
  assert not norm_layers("['Dense_0']['kernel']") and not norm_layers("['Conv_1']['bias']")
  assert not norm_layers("['Dense_0']['kernel_Norm_']")   # a leaf's name is not a layer
  assert not norm_layers("['XBatchNorm_0']['scale']")   # the part must begin with the name
