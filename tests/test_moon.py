"""MOON: the contrastive loss against NumPy, representations of the models, one local step
against a NumPy objective's finite-difference gradient, μ = 0 is FedAvg, the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import dropout_logreg
from test_engine import small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import fedavg, moon
from fedjax_pers.algorithms._moon import model_contrastive_loss
from fedjax_pers.experiment import train_and_evaluate


def np_cos(a, b):
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def np_con(z, zg, zp, tau):
  a, b = np_cos(z, zg) / tau, np_cos(z, zp) / tau
  return -(a - np.logaddexp(a, b))


def test_contrastive_loss_against_numpy():
  rng = np.random.default_rng(0)
  z, zg, zp = (rng.normal(size=(5, 4)) for _ in range(3))
  got = model_contrastive_loss(*(jnp.asarray(v, jnp.float32) for v in (z, zg, zp)), 0.5)
  np.testing.assert_allclose(got, np_con(z, zg, zp, 0.5), rtol=1e-5)
  # Representations with more leading axes (a sequence model's per-position z): cosines
  # over the last axis only.
  z3, zg3, zp3 = (rng.normal(size=(2, 5, 4)) for _ in range(3))
  got = model_contrastive_loss(*(jnp.asarray(v, jnp.float32) for v in (z3, zg3, zp3)), 0.5)
  np.testing.assert_allclose(got, np_con(z3, zg3, zp3, 0.5), rtol=1e-5)
  # Equal to the global representation and orthogonal to the previous one: small loss.
  assert float(model_contrastive_loss(jnp.ones((1, 2)), jnp.ones((1, 2)),
                                      jnp.asarray([[1.0, -1.0]]), 0.5)[0]) < 0.2


def test_models_expose_their_penultimate_layer():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  m = fp.models.mlp((5,), 3, hidden=(4,))
  p = m.init(jax.random.key(0))
  want = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
  np.testing.assert_allclose(m.represent(p, x), want, rtol=1e-6)
  lr = fp.models.logistic_regression((5,), 3)
  np.testing.assert_array_equal(lr.represent(lr.init(jax.random.key(0)), x), x)
  c = fp.models.cnn((8, 8), 3, features=(2,), dense=6)
  assert c.represent(c.init(jax.random.key(0)), jnp.zeros((2, 8, 8))).shape == (2, 6)
  # apply is unchanged by the sown representation.
  np.testing.assert_allclose(
      m.apply(p, x), want @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None], rtol=1e-5)


def mlp_np(p, x):
  h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  return h, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


@pytest.mark.parametrize("n,seed", [(6, 0), (1, 2)])
def test_one_local_step_against_a_numpy_objective(n, seed):
  """One SGD step on a batch of 6 slots: w − η ∇(CE + μ mean ℓ_con) over the client's n
  real examples (n = 1: one real example, five masked slots), the gradient by central
  differences of a float64 NumPy objective, the previous model a perturbed w_0 (seed 2:
  an example whose hidden units are not all off, so ℓ_con has a gradient)."""
  data = small_data(num_clients=1, sizes=[n], dim=3, seed=seed)
  model = fp.models.mlp((3,), 3, hidden=(4,))
  eta, mu, tau = 0.5, 2.0, 0.5
  alg = moon(model, optax.sgd(eta), optax.sgd(1.0), fp.LocalWork(6, steps=1), mu=mu,
             temperature=tau, clients_per_round=1)
  s0 = alg.init(jax.random.key(3), data)
  prev = jax.tree.map(lambda a: a + 0.3 * jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0),
                      s0.params)
  s0 = s0._replace(client_states=jax.tree.map(lambda a: a[None], prev))
  s1, _ = jax.jit(alg.round)(s0, data)
  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  w0, pv = f64(s0.params), f64(prev)
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])

  def objective(w):
    h, logits = mlp_np(w, x)
    ce = -(logits[np.arange(n), y] - np.log(np.exp(logits).sum(-1))).mean()
    return ce + mu * np_con(h, mlp_np(w0, x)[0], mlp_np(pv, x)[0], tau).mean()

  want = {}
  for layer in w0:
    want[layer] = {}
    for name, a in w0[layer].items():
      g = np.zeros_like(a)
      for idx in np.ndindex(a.shape):
        for sign in (1, -1):
          w = jax.tree.map(np.copy, w0)
          w[layer][name][idx] += sign * 1e-6
          g[idx] += sign * objective(w) / 2e-6
      want[layer][name] = a - eta * g
  for layer in want:
    for name in want[layer]:
      np.testing.assert_allclose(s1.params[layer][name], want[layer][name], atol=2e-4)
  # The client keeps its new local model for the next round.
  for a, b in zip(jax.tree.leaves(s1.client_states), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a[0], b, atol=1e-6)


def test_the_contrastive_term_uses_the_dropout_key():
  """One step's contrastive gradient, (w(μ=0) − w(μ=2)) / (η μ) from the same state: the
  local representation z = R_w(x) is taken in training mode, so dropout changes it."""
  data = small_data(num_clients=1, sizes=[6], dim=5)
  g_con = []
  for rate in (0.5, 0.0):
    w = []
    for mu in (0.0, 2.0):
      a = moon(dropout_logreg(rate=rate, hidden=4), optax.sgd(0.5), optax.sgd(1.0),
               fp.LocalWork(6, steps=1), mu=mu, clients_per_round=1)
      s0 = a.init(jax.random.key(3), data)
      s0 = s0._replace(client_states=jax.tree.map(lambda t: t + 0.3, s0.client_states))
      w.append(jax.jit(a.round)(s0, data)[0].params)
    g_con.append(jax.tree.map(lambda u, v: (u - v) / (0.5 * 2.0), *w))
  far = max(float(np.max(np.abs(u - v))) for u, v in zip(*map(jax.tree.leaves, g_con)))
  assert far > 1e-3, far


def test_mu_zero_is_fedavg():
  data = small_data(num_clients=6)
  model = fp.models.mlp((5,), 3, hidden=(4,))
  work = fp.LocalWork(3, epochs=1)
  a = moon(model, optax.sgd(0.1), optax.sgd(1.0), work, mu=0.0, clients_per_round=3)
  b = fedavg(model, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)
  sa, sb = a.init(jax.random.key(0), data), b.init(jax.random.key(0), data)
  step_a, step_b = jax.jit(a.round), jax.jit(b.round)
  for _ in range(2):
    sa, _ = step_a(sa, data)
    sb, _ = step_b(sb, data)
  assert step_a._cache_size() == 1
  for u, v in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


@pytest.mark.run
def test_moon_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "moon"
  c.model.name = "mlp"
  c.model.hidden = (8,)
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["rounds"] == 4 and np.isfinite(s["final_test_loss"])


def test_moon_refusals():
  bare = fp.Model(init=lambda k: {}, apply=None, loss=None, metrics=None)
  with pytest.raises(ValueError, match=r"^moon needs a model with a representation \(Model."
                     r"represent\): the models of fedjax_pers.models have one; a flax module "
                     r"gets one by sowing it \(self.sow\('intermediates', REPRESENTATION, "
                     r"h\)\).$"):
    moon(bare, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1), mu=1.0,
         clients_per_round=1)
  mlp, args = fp.models.mlp((5,), 3), (optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1))
  for kw, match in ((dict(mu=1.0, temperature=0.0), r"temperature \(MOON's τ\) must be a "
                     "number > 0; got 0.0"),
                    (dict(mu=-0.1), r"mu \(MOON's μ\) must be a number >= 0; got -0.1"),
                    (dict(mu="1"), r"mu \(MOON's μ\) must be a number >= 0; got '1'")):
    with pytest.raises(ValueError, match="^" + match):
      moon(mlp, *args, clients_per_round=1, **kw)
  moon(mlp, *args, mu=0, clients_per_round=1)   # μ = 0 is allowed (FedAvg)
  # The paper's τ = 0.5 by default: the same rounds as τ = 0.5 given, not as τ = 1.5 (from
  # the second round on: in the first the previous model is the global one, ℓ_con = log 2).
  data = small_data(num_clients=3, dim=5)

  def two_rounds(**kw):
    a = moon(mlp, *args, mu=1.0, clients_per_round=3, **kw)
    state, step = a.init(jax.random.key(0), data), jax.jit(a.round)
    for _ in range(2):
      state, _ = step(state, data)
    return jax.tree.leaves(state.params)

  default = two_rounds()
  for x, y in zip(default, two_rounds(temperature=0.5)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(default, two_rounds(temperature=1.5)))
