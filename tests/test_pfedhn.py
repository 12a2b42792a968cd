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
                    jax.tree.leaves(generate(s1.params, s1.client_states[i]))):
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
