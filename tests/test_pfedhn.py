"""pFedHN: the hypernetwork's update against central differences in float64, a round against
the paper's update, the embedding fit of a newcomer, the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import pfedhn
from fedjax_pers.algorithms._pfedhn import hyper_gradient, hypernetwork
from fedjax_pers.core import ClientData
from fedjax_pers.core._client import full_loss
from fedjax_pers.experiment import train_and_evaluate

MLP = fp.models.mlp((5,), 3, hidden=(4,))


def test_hyper_gradient_matches_central_differences_in_float64():
  """(∇_φ θ)ᵀ(θ − θ̃) and (∇_v θ)ᵀ(θ − θ̃) are the gradients of s = ½‖h(v; φ) − θ̃‖²."""
  with jax.enable_x64(True):
    init, generate = hypernetwork(MLP, 3, 6, 2)
    phi = jax.tree.map(lambda a: a.astype(jnp.float64), init(jax.random.key(0)))
    phi = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), phi)
    v = jnp.asarray([0.4, -1.2, 0.7])
    theta = generate(phi, v)
    trained = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                           theta)
    g_phi, g_v = hyper_gradient(generate, phi, v, trained)
    surrogate = lambda p, u: 0.5 * sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(generate(p, u)), jax.tree.leaves(trained)))
    eps = 1e-6
    for i in range(3):
      e = jnp.zeros(3).at[i].set(eps)
      fd = (surrogate(phi, v + e) - surrogate(phi, v - e)) / (2 * eps)
      np.testing.assert_allclose(g_v[i], fd, rtol=1e-7, atol=1e-10)
    rs = np.random.RandomState(1)
    for _ in range(4):   # random directions through every leaf of φ
      d = jax.tree.map(lambda a: jnp.asarray(rs.normal(size=a.shape)), phi)
      shift = lambda t, d=d: jax.tree.map(lambda a, b: a + t * b, phi, d)
      fd = (surrogate(shift(eps), v) - surrogate(shift(-eps), v)) / (2 * eps)
      dot = sum(jnp.sum(g * u) for g, u in zip(jax.tree.leaves(g_phi), jax.tree.leaves(d)))
      np.testing.assert_allclose(dot, fd, rtol=1e-7)


def test_a_round_is_the_papers_update():
  """One client, SGD without momentum: φ⁺ = φ − α g_φ and v⁺ = v − η_v g_v for the client,
  with θ̃ its local training from h(v; φ); the other embeddings bit for bit unchanged."""
  data = small_data(num_clients=4)
  work = fp.LocalWork(3, epochs=1)
  alg = pfedhn(MLP, optax.sgd(0.1), work, clients_per_round=1, outer_lr=0.05,
               outer_momentum=0.0, embed_lr=0.2, hidden=8, num_hidden=1)
  s0 = alg.init(jax.random.key(0), data)
  assert s0.client_states.shape == (4, 2)   # e = 1 + N/4
  s1, m = jax.jit(alg.round)(s0, data)
  c = int(m.clients[0])
  _, generate = hypernetwork(MLP, 2, 8, 1)
  theta = generate(s0.params, s0.client_states[c])
  _, _, k_clients = jax.random.split(s0.rng, 3)
  client = ClientData(data.x[c], data.y[c], data.num_examples[c], None, jnp.asarray(c))
  trained = fp.core.local_train(MLP, optax.sgd(0.1), theta, client,
                                jax.random.fold_in(k_clients, c), work,
                                max_examples=data.max_examples,
                                min_examples=data.min_examples).w
  g_phi, g_v = hyper_gradient(generate, s0.params, s0.client_states[c], trained)
  for new, old, g in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params),
                         jax.tree.leaves(g_phi)):
    np.testing.assert_allclose(new, old - 0.05 * g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1.client_states[c], s0.client_states[c] - 0.2 * g_v, rtol=1e-5,
                             atol=1e-6)
  rest = np.arange(4) != c
  np.testing.assert_array_equal(s1.client_states[rest], s0.client_states[rest])
  assert not np.allclose(g_v, 0.0)
  # Every client's personalized model is generated from its embedding.
  pers = alg.personal(s1)
  for i in range(4):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda p, i=i: p[i], pers)),
                    jax.tree.leaves(generate(s1.params, s1.client_states[i])), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_newcomer_fits_its_embedding_with_the_hypernetwork_frozen():
  data = small_data(num_clients=4)
  alg = pfedhn(MLP, optax.sgd(0.1), fp.LocalWork(3, epochs=1), clients_per_round=2,
               hidden=8, num_hidden=1, adapt_steps=30, adapt_lr=0.5)
  state = alg.init(jax.random.key(1), data)
  adapted = alg.adapt(state, data, jax.random.key(0))
  start = alg.serve(state)
  for c in range(4):
    client = ClientData(data.x[c], data.y[c], data.num_examples[c])
    mine = jax.tree.map(lambda p, c=c: p[c], adapted)
    assert float(full_loss(MLP, mine, client)) < float(full_loss(MLP, start, client))


@pytest.mark.run
def test_pfedhn_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "pfedhn", "mlp", (8,)
  c.pfedhn.hidden, c.pfedhn.num_hidden = 16, 1
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert "personalized_test_accuracy" in s and s["rounds"] == 4


def test_pfedhn_refusals(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "pfedhn", "mlp", (8,)
  c.server.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"server.learning_rate must be 1.0; got 0.5"):
    train_and_evaluate(c, str(tmp_path / "other"))
  work = fp.LocalWork(3, steps=1)
  for kw, match in ((dict(adapt_steps=0), "adapt_steps must be an int >= 1; got 0"),
                    (dict(hidden=2.0), "hidden must be an int >= 1; got 2.0"),
                    (dict(num_hidden=0), "num_hidden must be an int >= 1; got 0"),
                    (dict(outer_lr=0.0), "outer_lr must be > 0; got 0.0"),
                    (dict(adapt_lr=-0.1), "adapt_lr must be > 0; got -0.1"),
                    (dict(adapt_lr="1"), "adapt_lr must be > 0; got '1'"),
                    (dict(weighting=fp.aggregation.median()),
                     r"pfedhn averages the hypernetwork's gradients with a weight function "
                     r"\(uniform, num_examples, ...\); got Aggregator")):
    with pytest.raises(ValueError, match="^" + ("pfedhn: " if "weighting" not in kw else "")
                       + match):
      pfedhn(MLP, optax.sgd(0.1), work, clients_per_round=1, **kw)
  pfedhn(MLP, optax.sgd(0.1), work, clients_per_round=1, outer_lr=1, adapt_lr=1, hidden=1,
         num_hidden=1, adapt_steps=1)


@pytest.mark.parametrize("num_hidden", [1, 2])
def test_the_hypernetwork_starts_and_generates_as_documented(num_hidden):
  """`init(key)`, its key split into num_hidden + 2 (one per layer, none shared): LeCun
  normal hidden layers N(0, 1/fan_in) with zero biases, an output layer of std 0.01/√hidden
  whose bias is the target model's own init; `generate` is the MLP e → hidden → θ (NumPy,
  on a perturbed φ so that every bias counts)."""
  from jax.flatten_util import ravel_pytree

  e, hidden = 3, 7
  init, generate = hypernetwork(MLP, e, hidden, num_hidden)
  key = jax.random.key(4)
  phi = init(key)
  keys = jax.random.split(key, num_hidden + 2)
  dims = [e] + [hidden] * num_hidden
  assert len(phi["hidden"]) == num_hidden
  for k, a, b, layer in zip(keys, dims[:-1], dims[1:], phi["hidden"]):
    np.testing.assert_allclose(layer["w"], jax.random.normal(k, (a, b)) / np.sqrt(a), rtol=1e-6)
    np.testing.assert_array_equal(layer["b"], np.zeros(b))
  flat, unravel = ravel_pytree(MLP.init(keys[-1]))
  np.testing.assert_allclose(phi["out"]["w"], 0.01 * jax.random.normal(
      keys[-2], (hidden, flat.size)) / np.sqrt(hidden), rtol=1e-6)
  np.testing.assert_array_equal(phi["out"]["b"], flat)
  phi = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), phi)
  v = np.array([0.4, -1.2, 0.7])
  h = v
  for layer in phi["hidden"]:
    h = np.maximum(h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"]), 0.0)
  want = h @ np.asarray(phi["out"]["w"], np.float64) + np.asarray(phi["out"]["b"])
  got, _ = ravel_pytree(generate(phi, jnp.asarray(v, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(generate(phi, v)) == jax.tree.structure(unravel(flat))


def test_the_server_keeps_momentum_and_embeddings_default_to_its_rate():
  """α with momentum μ (the paper's SGD): a second round differs from μ = 0; without
  `embed_lr`, the embeddings move at α (the same round as embed_lr = α)."""
  data = small_data(num_clients=4)
  work = fp.LocalWork(3, steps=2)
  make = lambda **kw: pfedhn(MLP, optax.sgd(0.1), work, clients_per_round=2, outer_lr=0.05,
                             hidden=8, num_hidden=1, **kw)
  runs = {}
  for name, a in (("default", make()), ("explicit", make(embed_lr=0.05)),
                  ("no_momentum", make(outer_momentum=0.0))):
    state = a.init(jax.random.key(0), data)
    step = jax.jit(a.round)
    for _ in range(2):
      state, _ = step(state, data)
    runs[name] = state
  default, explicit = runs["default"], runs["explicit"]
  for x, y in zip(jax.tree.leaves(default.params), jax.tree.leaves(explicit.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(runs["default"].client_states, runs["explicit"].client_states)
  far = max(float(np.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(runs["default"].params), jax.tree.leaves(runs["no_momentum"].params)))
  assert far > 1e-6


def test_a_newcomers_embedding_is_gradient_descent_from_the_mean():
  """`adapt`: exactly `adapt_steps` steps v ← v − η ∇_v L(h(v; φ)) from the mean embedding."""
  data = small_data(num_clients=3)
  alg = pfedhn(MLP, optax.sgd(0.1), fp.LocalWork(3, epochs=1), clients_per_round=2,
               hidden=8, num_hidden=1, adapt_steps=3, adapt_lr=0.5)
  state = alg.init(jax.random.key(1), data)
  adapted = alg.adapt(state, data, jax.random.key(0))
  _, generate = hypernetwork(MLP, 2, 8, 1)
  for c in range(3):
    client = ClientData(data.x[c], data.y[c], data.num_examples[c])
    loss = lambda v, client=client: full_loss(MLP, generate(state.params, v), client)
    v = jnp.mean(state.client_states, axis=0)
    for _ in range(3):
      v = v - 0.5 * jax.grad(loss)(v)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda p, c=c: p[c], adapted)),
                    jax.tree.leaves(generate(state.params, v))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pfedhn_defaults_are_the_papers():
  """The paper's hypernetwork (3 hidden layers of 100) and optimizer (SGD, α = 0.01,
  momentum 0.9), a newcomer's fit of 50 steps of rate 0.1: the defaults run as those values
  given (two rounds and a fit), and differently from others."""
  data = small_data(num_clients=4)
  make = lambda **kw: pfedhn(MLP, optax.sgd(0.1), fp.LocalWork(3, steps=2),
                             clients_per_round=2, **kw)
  given = dict(outer_lr=0.01, outer_momentum=0.9, hidden=100, num_hidden=3, adapt_steps=50,
               adapt_lr=0.1)

  def outcome(alg):
    state = alg.init(jax.random.key(0), data)
    step = jax.jit(alg.round)
    for _ in range(2):
      state, _ = step(state, data)
    return jax.tree.leaves((state.params, alg.adapt(state, data, jax.random.key(0))))

  default = outcome(make())
  for x, y in zip(default, outcome(make(**given))):
    np.testing.assert_array_equal(x, y)
  for change in (dict(outer_lr=0.02), dict(outer_momentum=0.5), dict(adapt_steps=49),
                 dict(adapt_lr=0.2)):
    other = outcome(make(**{**given, **change}))
    assert any(not np.array_equal(x, y) for x, y in zip(default, other)), change
  shapes = [a.shape for a in jax.tree.leaves(make().init(jax.random.key(0), data).params)]
  assert shapes[:6] == [(100,), (2, 100), (100,), (100, 100), (100,), (100, 100)]
  assert len(shapes) == 8   # 3 hidden layers and the output layer


def test_a_client_whose_hyper_gradient_overflows_is_dropped():
  """Embeddings scaled to 1e15 and a client rate of 1e20: each client's local training
  stays finite, but g_φ = (∂θ/∂φ)ᵀ (θ − θ̃) overflows float32. Such a client counts as
  non-finite, so φ and the embeddings keep their values instead of turning to inf."""
  data = small_data(num_clients=4)
  alg = pfedhn(MLP, optax.sgd(1e20), fp.LocalWork(3, steps=1), clients_per_round=2,
               outer_lr=0.05, hidden=8, num_hidden=1)
  s0 = alg.init(jax.random.key(0), data)
  s0 = s0._replace(client_states=s0.client_states * 1e15)
  s1, m = jax.jit(alg.round)(s0, data)
  assert int(m.num_nonfinite) == 2
  for a, b in zip(jax.tree.leaves((s0.params, s0.client_states)),
                  jax.tree.leaves((s1.params, s1.client_states)), strict=True):
    np.testing.assert_array_equal(a, b)
