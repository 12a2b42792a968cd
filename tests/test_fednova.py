"""FedNova: ‖a_i‖₁ against optax's momentum, the aggregate against NumPy, equal τ_i is
FedAvg, unequal τ_i in a round, the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import client_deltas
from test_aggregation import make_outputs
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers.algorithms import fedavg, fednova
from fedjax_pers.experiment import train_and_evaluate


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_norm_a_is_the_displacement_of_unit_gradients(rho):
  """τ steps of optax.sgd(1, momentum=ρ) on a constant gradient 1 move by ‖a‖₁."""
  tx = optax.sgd(1.0, momentum=rho or None)
  for tau in (1, 2, 7):
    w, s = jnp.zeros(()), tx.init(jnp.zeros(()))
    for _ in range(tau):
      u, s = tx.update(jnp.ones(()), s, w)
      w = w + u
    assert float(agg.norm_a(jnp.asarray(tau), rho)) == pytest.approx(-float(w), rel=1e-5)


def test_aggregate_against_numpy():
  out = make_outputs(k=6)._replace(num_steps=jnp.asarray([3, 1, 4, 0, 5, 2], jnp.int32))
  a = agg.fednova()
  delta, w, _ = jax.jit(a.apply)(out, a.init(10), None)
  n = np.asarray(out.num_examples, np.float64)
  tau = np.array([3, 1, 4, 0, 5, 2], np.float64)
  keep = np.asarray(out.finite) & (tau > 0)                 # client 2 is NaN, client 3 idle
  p = np.where(keep, n, 0) / np.where(keep, n, 0).sum()
  tau_eff = (p * tau).sum()
  want_w = np.where(keep, tau_eff * p / np.where(keep, tau, 1), 0)
  np.testing.assert_allclose(w, want_w, rtol=1e-5)
  d = {k: np.nan_to_num(np.asarray(v, np.float64)) for k, v in out.delta.items()}
  for k in d:
    np.testing.assert_allclose(delta[k], np.tensordot(want_w, d[k], axes=1), rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match=r"momentum \(the clients' ρ\) must be a number"):
    agg.fednova(momentum=1.0)


def test_equal_local_steps_is_fedavg():
  data = small_data(num_clients=6)
  work = fp.LocalWork(3, steps=4)                            # τ_i = 4 for everyone
  kw = dict(clients_per_round=4)
  a = fednova(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, **kw)
  b = fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, **kw)
  sa, sb = a.init(jax.random.key(0), data), b.init(jax.random.key(0), data)
  step_a, step_b = jax.jit(a.round), jax.jit(b.round)
  for _ in range(2):
    sa, ma = step_a(sa, data)
    sb, mb = step_b(sb, data)
  assert step_a._cache_size() == 1
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ma.weights, mb.weights, rtol=1e-6)


def test_unequal_local_steps_are_normalised_in_a_round():
  """Epochs over unequal clients: τ_i grows with n_i; Δ = τ_eff Σ p_i Δ_i / τ_i."""
  data = small_data(num_clients=5, sizes=[3, 11, 6, 9, 4])
  work = fp.LocalWork(2, epochs=2)
  alg = fednova(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=5)
  s0 = alg.init(jax.random.key(1), data)
  s1, m = jax.jit(alg.round)(s0, data)
  w, b, clients = client_deltas(s0.params, data, s0.rng, work, 0.1, 5)
  n = np.array([c["n"] for c in clients], np.float64)
  tau = np.array([c["steps"] for c in clients], np.float64)
  assert len(set(tau)) > 1
  p = n / n.sum()
  eff = (p * tau).sum() * p / tau
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"],
                             w + sum(e * c["dw"] for e, c in zip(eff, clients)), atol=1e-5)


@pytest.mark.run
def test_fednova_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "fednova"
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["rounds"] == 4 and np.isfinite(s["final_test_loss"])


def test_fednova_refusals(tmp_path):
  c = tiny_config()
  c.algorithm = "fednova"
  c.client.optimizer = "adam"
  with pytest.raises(ValueError, match="algorithm='fednova' normalises SGD or momentum"):
    train_and_evaluate(c, str(tmp_path / "adam"))
  c.client.optimizer = "sgd"
  c.aggregation.weighting = "median"
  with pytest.raises(ValueError, match="normalises a weighted mean"):
    train_and_evaluate(c, str(tmp_path / "median"))


def test_fednova_factory_refuses_an_aggregator():
  with pytest.raises(ValueError, match="^fednova normalises a weighted mean: weighting must "
                     "be a WeightFn .* not Aggregator"):
    fednova(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1),
            clients_per_round=2, weighting=agg.median())


def test_the_factory_normalises_by_its_momentum_and_weighting():
  """`fednova(..., momentum=ρ, weighting=p)` is FedAvg with `aggregation.fednova(p, ρ)`."""
  data = small_data(num_clients=4, sizes=[5, 9, 7, 4])
  work = fp.LocalWork(3, epochs=2)
  tx = optax.sgd(0.1, momentum=0.9)
  kw = dict(clients_per_round=3)
  a = fednova(logreg(), tx, optax.sgd(1.0), work, momentum=0.9, weighting=agg.uniform(), **kw)
  b = fedavg(logreg(), tx, optax.sgd(1.0), work, weighting=agg.fednova(agg.uniform(), 0.9),
             **kw)
  c = fedavg(logreg(), tx, optax.sgd(1.0), work, weighting=agg.fednova(None, 0.0), **kw)
  s = [jax.jit(x.round)(x.init(jax.random.key(0), data), data)[0].params for x in (a, b, c)]
  for x, y, z in zip(*(jax.tree.leaves(p) for p in s)):
    np.testing.assert_array_equal(x, y)
    assert np.abs(np.asarray(x) - np.asarray(z)).max() > 1e-5
