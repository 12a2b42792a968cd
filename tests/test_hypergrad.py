"""Gradients through whole rounds against central finite differences, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import logreg

import fedjax_pers as fp
from fedjax_pers.hypergrad import (
    RoundHyperparams,
    fedavg_with,
    held_out_loss,
    hypergradient,
    unrolled_objective,
)

N, K = 6, 4


def setup(strategy="vmap", rounds=2, remat=False):
  rs = np.random.RandomState(0)
  sizes = [7, 9, 5, 11, 8, 6]
  xs = [rs.normal(size=(n, 5)) for n in sizes]
  ys = [rs.randint(0, 3, n) for n in sizes]
  data = fp.FederatedData.from_clients(xs, ys, num_classes=3, dtype=jnp.float64)
  xv, yv = rs.normal(size=(40, 5)), rs.randint(0, 3, 40)
  model = logreg()
  work = fp.LocalWork(3, steps=4)
  build = lambda h: fedavg_with(model, work, h, clients_per_round=K,
                                execution=fp.Execution(strategy=strategy))
  hyper = RoundHyperparams(
      client_lr=jnp.float64(0.2), server_lr=jnp.float64(0.8),
      weight_logits=jnp.asarray(rs.normal(size=N) * 0.5), prox_mu=jnp.float64(0.3))
  state = build(hyper).init(jax.random.key(3), data)
  state = state._replace(params=jax.tree.map(lambda a: a.astype(jnp.float64), state.params))
  objective = held_out_loss(model, xv, yv)
  # Jitted once: the finite differences call it 2 (3 + N) times.
  f = jax.jit(lambda h: unrolled_objective(build, h, state, data, objective,
                                           num_rounds=rounds, remat=remat))
  return build, hyper, state, data, objective, f


def fd(f, hyper, field, i=None, eps=1e-6):
  def at(s):
    v = getattr(hyper, field)
    v = v + s if i is None else v.at[i].add(s)
    return f(hyper._replace(**{field: v}))
  return (at(eps) - at(-eps)) / (2 * eps)


@pytest.mark.parametrize("strategy,remat", [("vmap", False), ("scan", True)])
def test_round_gradient_matches_finite_differences(strategy, remat):
  with jax.enable_x64(True):
    build, hyper, state, data, objective, f = setup(strategy, remat=remat)
    value, g = jax.jit(lambda h: hypergradient(build, h, state, data, objective, num_rounds=2,
                                               remat=remat))(hyper)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, f(hyper), rtol=1e-12)
    for field in ("client_lr", "server_lr", "prox_mu"):
      want = fd(f, hyper, field)
      assert abs(getattr(g, field) - want) <= 1e-4 * abs(want), (field, getattr(g, field), want)
    want = np.array([fd(f, hyper, "weight_logits", i) for i in range(N)])
    np.testing.assert_allclose(g.weight_logits, want, rtol=1e-4, atol=1e-10)
    # Logits move only the weights of clients that were sampled, and the weights
    # are a softmax: shifting every logit changes nothing.
    assert abs(np.sum(g.weight_logits)) < 1e-10


def test_unsampled_client_logit_has_zero_gradient_in_one_round():
  with jax.enable_x64(True):
    build, hyper, state, data, objective, _ = setup(rounds=1)
    _, m = build(hyper).round(state, data)
    _, g = hypergradient(build, hyper, state, data, objective, num_rounds=1)
    unsampled = np.setdiff1d(np.arange(N), np.asarray(m.clients))
    assert len(unsampled) == N - K
    np.testing.assert_array_equal(np.asarray(g.weight_logits)[unsampled], 0.0)
    assert np.all(np.asarray(g.weight_logits)[np.asarray(m.clients)] != 0.0)


def test_one_round_server_lr_gradient_is_the_directional_derivative():
  # w_1 = w_0 + η_s Δ, so dL/dη_s = ∇L(w_1) · Δ exactly.
  with jax.enable_x64(True):
    build, hyper, state, data, objective, _ = setup(rounds=1)
    _, g = hypergradient(build, hyper, state, data, objective, num_rounds=1)
    s1, _ = build(hyper).round(state, data)
    delta = jax.tree.map(lambda a, b: (a - b) / hyper.server_lr, s1.params, state.params)
    grad_w = jax.grad(objective)(s1.params)
    want = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(grad_w), jax.tree.leaves(delta)))
    np.testing.assert_allclose(g.server_lr, want, rtol=1e-10)


def test_bad_rounds_named():
  with jax.enable_x64(True):
    build, hyper, state, data, objective, _ = setup()
    with pytest.raises(ValueError, match="num_rounds"):
      unrolled_objective(build, hyper, state, data, objective, num_rounds=0)


def test_logits_of_the_wrong_length_are_refused():
  with jax.enable_x64(True):
    build, hyper, state, data, objective, _ = setup()
    short = hyper._replace(weight_logits=hyper.weight_logits[:N - 1])
    with pytest.raises(ValueError, match="one logit per client"):
      unrolled_objective(build, short, state, data, objective)
    with pytest.raises(ValueError, match="one logit per client"):
      build(short).init(jax.random.key(0), data)
