"""MAML meta-gradients in float64: finite differences, Hessians, NumPy references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import engine_plan, fedavg_round, logreg_grad, softmax
from jax.flatten_util import ravel_pytree
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import per_fedavg, reptile
from fedjax_pers.personalization import (
    adapt,
    batch_loss,
    hvp,
    meta_gradient,
    meta_sgd_model,
    meta_sgd_tx,
)

DIM, CLASSES, B, K = 4, 3, 5, 2


def f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def batches(seed, k=None):
  """`k` stacked batches (or one) of B examples, the last example of each masked out."""
  rs = np.random.RandomState(seed)
  shape = (B,) if k is None else (k, B)
  x = rs.normal(size=shape + (DIM,))
  y = rs.randint(0, CLASSES, shape)
  mask = np.ones(shape, bool)
  mask[..., -1] = False
  return jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.int32), jnp.asarray(mask)


def setup(model_name="logreg"):
  model = (logreg(DIM, CLASSES) if model_name == "logreg"
           else fp.models.mlp((DIM,), CLASSES, hidden=(6,)))
  params = f64(model.init(jax.random.key(0)))
  return model, batch_loss(model), params


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def directional_fd(fn, x, u, eps=1e-6):
  plus = fn(jax.tree.map(lambda a, d: a + eps * d, x, u))
  minus = fn(jax.tree.map(lambda a, d: a - eps * d, x, u))
  return (plus - minus) / (2 * eps)


def random_like(tree, seed):
  flat, unravel = ravel_pytree(tree)
  return unravel(jnp.asarray(np.random.RandomState(seed).normal(size=flat.shape), flat.dtype))


def dot(a, b):
  return float(sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("model_name", ["logreg", "mlp"])
@pytest.mark.parametrize("remat", [False, True])
def test_second_order_meta_gradient_matches_finite_differences(model_name, remat):
  with jax.enable_x64(True):
    model, loss_fn, params = setup(model_name)
    support, query, lr = batches(1, K), batches(2), 0.3
    objective = lambda p, a: loss_fn(adapt(loss_fn, p, a, support), query)
    mg = meta_gradient(loss_fn, params, lr, support, query, remat=remat)
    assert jax.tree.leaves(mg.params)[0].dtype == jnp.float64
    np.testing.assert_allclose(mg.loss, objective(params, lr), rtol=1e-12)
    # Every coordinate of θ, and α.
    flat, unravel = ravel_pytree(params)
    at = jax.jit(lambda v: objective(unravel(v), lr))   # compiled once, called 2 per coordinate
    fd = np.array([directional_fd(at, flat, jnp.eye(flat.size)[i]) for i in range(flat.size)])
    assert rel_err(ravel_pytree(mg.params)[0], fd) < 1e-4
    fd_lr = directional_fd(lambda a: objective(params, a), jnp.float64(lr), jnp.float64(1.0))
    assert rel_err(mg.inner_lr, fd_lr) < 1e-4


def test_meta_sgd_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    lr = jax.tree.map(lambda p: 0.1 + 0.2 * jnp.abs(p), params)
    support, query = batches(3, K), batches(4)
    objective = lambda p, a: loss_fn(adapt(loss_fn, p, a, support), query)
    for method in ("second_order", "hessian_free"):
      mg = meta_gradient(loss_fn, params, lr, support, query, method=method)
      for seed in range(3):
        u = random_like(lr, 10 + seed)
        fd = directional_fd(lambda a: objective(params, a), lr, u)
        assert abs(dot(mg.inner_lr, u) - fd) < 1e-4 * max(abs(fd), 1e-3), method


def test_exact_hvp_matches_the_hessian():
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    batch = batches(5)
    v = random_like(params, 6)
    flat, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda z: loss_fn(unravel(z), batch))(flat)
    got = ravel_pytree(hvp(loss_fn, params, batch, v))[0]
    np.testing.assert_allclose(got, hess @ ravel_pytree(v)[0], rtol=1e-10, atol=1e-12)


def test_finite_difference_hvp_converges_to_the_exact_one():
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    batch, v = batches(7), random_like(params, 8)
    exact = ravel_pytree(hvp(loss_fn, params, batch, v))[0]
    errs = [rel_err(ravel_pytree(hvp(loss_fn, params, batch, v, method="finite_difference",
                                     delta=d))[0], exact) for d in (1e-1, 1e-2, 1e-3)]
    # Central differences: error O(δ²), so ~100x smaller per decade.
    assert errs[1] < errs[0] / 30 and errs[2] < errs[1] / 30, errs
    assert errs[2] < 1e-5, errs


def numpy_sgd(w, b, x, y, mask, lr):
  for xb, yb, mb in zip(x, y, mask):
    gw, gb = logreg_grad(w, b, xb[mb], yb[mb])
    w, b = w - lr * gw, b - lr * gb
  return w, b


def numpy_hvp(w, b, x, y, vw, vb):
  """∇²f(w, b) (vw, vb) of the mean cross-entropy of softmax regression."""
  p = softmax(x @ w + b)
  dz = x @ vw + vb
  dp = p * dz - p * np.sum(p * dz, axis=1, keepdims=True)
  return x.T @ dp / len(y), dp.sum(0) / len(y)


def unpack(batch):
  return tuple(np.asarray(a) for a in batch)


def test_first_order_is_the_query_gradient_at_the_adapted_point():
  with jax.enable_x64(True):
    _, loss_fn, params = setup()
    support, query, lr = batches(9, K), batches(10), 0.2
    mg = meta_gradient(loss_fn, params, lr, support, query, method="first_order")
    w, b = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    wk, bk = numpy_sgd(w, b, *unpack(support), lr)
    qx, qy, qm = unpack(query)
    gw, gb = logreg_grad(wk, bk, qx[qm], qy[qm])
    np.testing.assert_allclose(mg.params["Dense_0"]["kernel"], gw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mg.params["Dense_0"]["bias"], gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("independent", [False, True])
def test_second_order_matches_numpy_product_of_jacobians(independent):
  with jax.enable_x64(True):
    _, loss_fn, params = setup()
    support, query, lr = batches(11, K), batches(12), 0.2
    curvature = batches(13, K) if independent else None
    w, b = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    sx, sy, sm = unpack(support)
    cx, cy, cm = unpack(curvature if independent else support)
    ws = [(w, b)]
    for j in range(K):
      ws.append(numpy_sgd(*ws[-1], sx[j:j + 1], sy[j:j + 1], sm[j:j + 1], lr))
    qx, qy, qm = unpack(query)
    vw, vb = logreg_grad(*ws[-1], qx[qm], qy[qm])
    for j in reversed(range(K)):
      hw, hb = numpy_hvp(*ws[j], cx[j][cm[j]], cy[j][cm[j]], vw, vb)
      vw, vb = vw - lr * hw, vb - lr * hb
    for method in ("second_order", "hessian_free"):
      mg = meta_gradient(loss_fn, params, lr, support, query, curvature, method=method)
      np.testing.assert_allclose(mg.params["Dense_0"]["kernel"], vw, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(mg.params["Dense_0"]["bias"], vb, rtol=1e-9, atol=1e-12)


def test_hessian_free_exact_equals_second_order_and_fd_is_close():
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    support, query, curvature = batches(14, K), batches(15), batches(16, K)
    for lr in (0.3, jax.tree.map(lambda p: 0.1 + 0.1 * jnp.abs(p), params)):
      so = meta_gradient(loss_fn, params, lr, support, query, curvature)
      hf = meta_gradient(loss_fn, params, lr, support, query, curvature, method="hessian_free")
      fd = meta_gradient(loss_fn, params, lr, support, query, curvature, method="hessian_free",
                         hvp_method="finite_difference", delta=1e-5)
      for a, b in zip(jax.tree.leaves(hf), jax.tree.leaves(so)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
      for a, b in zip(jax.tree.leaves(fd), jax.tree.leaves(so)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bad_options_are_named():
  model = logreg(DIM, CLASSES)
  loss_fn, params = batch_loss(model), model.init(jax.random.key(0))
  with pytest.raises(ValueError, match="method must be one of"):
    meta_gradient(loss_fn, params, 0.1, (), (), method="third_order")
  with pytest.raises(ValueError, match="delta"):
    meta_gradient(loss_fn, params, 0.1, (), (), delta=0.0)
  with pytest.raises(ValueError, match="steps"):
    per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=1),
               inner_lr=0.1, clients_per_round=1)
  with pytest.raises(ValueError, match="hessian must be one of"):
    per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, steps=1),
               inner_lr=0.1, clients_per_round=1, hessian="hf")


# ------------------------------------------------------------------------ Per-FedAvg


def client_batches(state, data, work, per_step):
  """The engine's batches of client 0 (a one-client population), per meta-step."""
  plan = engine_plan(state.rng, data,
                     fp.LocalWork(work.batch_size, steps=work.steps * per_step), split=False)
  idx = np.asarray(plan.idx).reshape(work.steps, per_step, -1)
  mask = np.asarray(plan.mask).reshape(work.steps, per_step, -1)
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])
  return [[(x[i[m]], y[i[m]]) for i, m in zip(ii, mm)] for ii, mm in zip(idx, mask)]


def numpy_adamw(lr, decay, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adamw's step on a list of float64 arrays: `step(params, grads) -> params`."""
  moments, t = {}, [0]

  def step(params, grads):
    t[0] += 1
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
      m, v = moments.get(i, (0.0, 0.0))
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      moments[i] = (m, v)
      m_hat, v_hat = m / (1 - b1 ** t[0]), v / (1 - b2 ** t[0])
      out.append(p - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay * p))
    return out

  return step


@pytest.mark.parametrize("hessian,tx", [("exact", "sgd"), ("autodiff", "sgd"),
                                        ("finite_difference", "sgd"), ("none", "sgd"),
                                        ("exact", "adamw")])
def test_per_fedavg_one_client_matches_numpy(hessian, tx):
  """τ = 3 meta-steps; with AdamW (a state, and a decay that reads the params) as well as
  the paper's SGD as the outer optimizer."""
  data = small_data(num_clients=1, sizes=[11])
  work, alpha, beta = fp.LocalWork(3, steps=3), 0.3, 0.5
  client_tx, outer = ((optax.sgd(beta), lambda p, g: [a - beta * b for a, b in zip(p, g)])
                      if tx == "sgd" else (optax.adamw(0.05, weight_decay=0.5),
                                           numpy_adamw(0.05, 0.5)))
  alg = per_fedavg(logreg(), client_tx, optax.sgd(1.0), work, inner_lr=alpha,
                   clients_per_round=1, hessian=hessian, delta=1e-3)
  s0 = alg.init(jax.random.key(0), data)
  s1, m = jax.jit(alg.round)(s0, data)
  per_step = 2 if hessian == "none" else 3
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  query_losses = []
  for step in client_batches(s0, data, work, per_step):
    (dx, dy), (qx, qy) = step[0], step[1]
    gw, gb = logreg_grad(w, b, dx, dy)
    tw, tb = w - alpha * gw, b - alpha * gb
    vw, vb = logreg_grad(tw, tb, qx, qy)
    p = softmax(qx @ tw + tb)
    query_losses.append(-np.log(p[np.arange(len(qy)), qy]).mean())
    if hessian != "none":
      hx, hy = step[2]
      hw, hb = numpy_hvp(w, b, hx, hy, vw, vb)
      vw, vb = vw - alpha * hw, vb - alpha * hb
    w, b = outer([w, b], [vw, vb])
  tol = 2e-4 if hessian == "finite_difference" else 1e-5
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w, atol=tol)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b, atol=tol)
  np.testing.assert_allclose(m.train_loss, np.mean(query_losses), rtol=1e-5)


def test_per_fedavg_clients_report_their_labels():
  """A label weighting sees each client's label histogram: `label_entropy(τ)` gives
  w_i ∝ n_i exp(τ H(p_i) / log C), computed here from the clients' labels."""
  data = small_data(num_clients=3, sizes=[5, 9, 7])
  alg = per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1),
                   inner_lr=0.1, clients_per_round=3, weighting=fp.aggregation.label_entropy(2.0))
  _, m = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  score = []
  for i in np.asarray(m.clients):
    n = int(data.num_examples[i])
    p = np.bincount(np.asarray(data.y[i])[:n], minlength=3) / n
    h = -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(3)
    score.append(n * np.exp(2.0 * h))
  np.testing.assert_allclose(m.weights, np.asarray(score) / np.sum(score), rtol=1e-5)


def test_each_meta_step_draws_its_own_dropout_keys():
  """Per-FedAvg's documented keys on a model with dropout: the client's key k (used
  whole for the batch plan) gives split(fold_in(k, 1), τ), one key per meta-step, each
  split into one per batch of the step (D, D′, D″). τ = 3: the third step has its own."""
  from _reference import dropout_logreg

  data = small_data(num_clients=1, sizes=[11])
  work, alpha, beta = fp.LocalWork(3, steps=3), 0.3, 0.5
  model = dropout_logreg(rate=0.5)
  alg = per_fedavg(model, optax.sgd(beta), optax.sgd(1.0), work, inner_lr=alpha,
                   clients_per_round=1)
  s0 = alg.init(jax.random.key(0), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, fp.LocalWork(3, steps=9), split=False)
  idx, mask = (np.asarray(a).reshape(3, 3, 3) for a in (plan.idx, plan.mask))
  k_client = jax.random.fold_in(jax.random.split(s0.rng, 3)[2], 0)
  step_keys = jax.random.split(jax.random.fold_in(k_client, 1), 3)
  loss_fn, w = batch_loss(model), s0.params
  for t in range(3):
    x, y = data.x[0][idx[t]], data.y[0][idx[t]]
    b = (x, y, jnp.asarray(mask[t]), jax.random.split(step_keys[t], 3))
    part = lambda s, b=b: jax.tree.map(lambda a: a[s], b)
    g = meta_gradient(loss_fn, w, alpha, part(slice(0, 1)), part(1), part(slice(2, 3)),
                      method="hessian_free").params
    w = jax.tree.map(lambda p, d: p - beta * d, w, g)
  for got, want in zip(jax.tree.leaves(s1.params), jax.tree.leaves(w), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_fedavg_batches_are_disjoint_within_a_step():
  # 24 examples: 6 batches an epoch, so each meta-step's 3 batches lie in one epoch.
  data = small_data(num_clients=1, sizes=[24])
  work = fp.LocalWork(4, steps=3)
  alg = per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), work, inner_lr=0.1,
                   clients_per_round=1)
  s0 = alg.init(jax.random.key(1), data)
  plan = engine_plan(s0.rng, data, fp.LocalWork(4, steps=9), split=False)
  for step in np.asarray(plan.idx).reshape(3, 12):
    assert len(set(step.tolist())) == 12   # D, D′, D″ share no example


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_per_fedavg_strategies_agree_and_do_not_recompile(strategy):
  data = small_data(num_clients=6)
  mk = lambda s: per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=2),
                            inner_lr=0.1, clients_per_round=4, execution=fp.Execution(strategy=s))
  ref, alg = mk("vmap"), mk(strategy)
  s_ref = s = alg.init(jax.random.key(0), data)
  step = jax.jit(alg.round)
  for _ in range(3):
    s, _ = step(s, data)
    s_ref, _ = jax.jit(ref.round)(s_ref, data)
  assert step._cache_size() == 1
  for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(s_ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_meta_sgd_learns_rates_and_adapts_with_them():
  data = small_data(num_clients=4, sizes=[12] * 4)
  alpha = 0.1
  model = meta_sgd_model(logreg(), alpha)
  for flag, net, why in ((True, logreg(), "a meta_sgd_model: the model's params are not"),
                         (False, model, "no meta_sgd_model: the model's params are")):
    with pytest.raises(ValueError, match=rf"^meta_sgd={flag} needs {why} MetaSGDParams\.$"):
      per_fedavg(net, optax.sgd(0.5), optax.sgd(1.0), fp.LocalWork(3, steps=2),
                 inner_lr=alpha, clients_per_round=4, meta_sgd=flag)
  alg = per_fedavg(model, optax.sgd(0.5), optax.sgd(1.0), fp.LocalWork(3, steps=2),
                   inner_lr=alpha, clients_per_round=4, meta_sgd=True)
  s0 = alg.init(jax.random.key(0), data)
  assert all(np.all(a == alpha) for a in jax.tree.leaves(s0.params.inner_lr))
  s1, _ = jax.jit(alg.round)(s0, data)
  moved = [np.max(np.abs(np.asarray(a) - alpha)) for a in jax.tree.leaves(s1.params.inner_lr)]
  assert min(moved) > 0
  # The evaluation model and the Meta-SGD step: θ − α ∘ ∇θ, α unchanged.
  x, y = data.client(0)
  grads = jax.grad(lambda p: jnp.mean(model.loss(model.apply(p, x), y)))(s1.params)
  upd, _ = meta_sgd_tx().update(grads, meta_sgd_tx().init(s1.params), s1.params)
  new = optax.apply_updates(s1.params, upd)
  for t, a, g, n in zip(*(jax.tree.leaves(v) for v in (s1.params.model, s1.params.inner_lr,
                                                       grads.model, new.model))):
    np.testing.assert_allclose(n, t - a * g, rtol=1e-6, atol=1e-7)
  assert jax.tree.all(jax.tree.map(np.array_equal, new.inner_lr, s1.params.inner_lr))


@pytest.mark.parametrize("weighting", ["loss_improvement", "q_ffl"])
def test_weightings_needing_client_losses_are_refused(weighting):
  make = {"loss_improvement": lambda: fp.aggregation.loss_improvement(1.0),
          "q_ffl": lambda: fp.aggregation.q_ffl(1.0, 0.1)}[weighting]
  with pytest.raises(ValueError, match="per_fedavg does not report the clients' losses"):
    per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1),
               inner_lr=0.1, clients_per_round=2, weighting=make())
  with pytest.raises(ValueError, match="apfl does not report the clients' losses"):
    fp.algorithms.apfl(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1),
                       alpha=0.5, clients_per_round=2, weighting=make())


def test_per_fedavg_and_reptile_refuse_bad_numbers():
  args = (logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1))
  for k in (0, 1.5):
    with pytest.raises(ValueError, match=rf"^inner_steps \(K\) must be an int >= 1; got {k}"):
      per_fedavg(*args, inner_lr=0.1, clients_per_round=2, inner_steps=k)
  per_fedavg(*args, inner_lr=0.1, clients_per_round=2, inner_steps=1)
  for eps in (0, -0.5, "1"):
    with pytest.raises(ValueError, match=rf"^outer_lr \(Reptile's epsilon\) must be > 0; got "
                       rf"{eps!r}"):
      reptile(logreg(), optax.sgd(0.1), args[3], outer_lr=eps, clients_per_round=2)
  reptile(logreg(), optax.sgd(0.1), args[3], outer_lr=1, clients_per_round=2)   # an int


def test_per_fedavg_refusals_in_full():
  """Each refusal, raised by the factory (before any data) with its whole message."""
  args = (logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(2, steps=1))
  whole = lambda msg: "^" + re.escape(msg) + "$"
  work = fp.LocalWork(4, epochs=1)
  with pytest.raises(ValueError, match=whole(
      "Per-FedAvg counts local meta-steps: work must set steps (τ), one int for every "
      f"client; got {work}.")):
    per_fedavg(*args[:3], work, inner_lr=0.1, clients_per_round=1)
  # δ reaches the check even though only the finite-difference HVP reads it
  with pytest.raises(ValueError, match=whole(
      "delta (finite-difference step) must be a finite number > 0; got 0.")):
    per_fedavg(*args, inner_lr=0.1, clients_per_round=1, hessian="finite_difference",
               delta=0)
  for lr in (0, 0.0, -0.5, np.inf, np.nan, np.array([0.1])):
    with pytest.raises(ValueError, match=whole(
        f"inner_lr (alpha) must be a finite number > 0; got {lr!r}.")):
      per_fedavg(*args, inner_lr=lr, clients_per_round=1)
  for lr in (1e-6, 0.5, 3, np.float32(2.0)):
    per_fedavg(*args, inner_lr=lr, clients_per_round=1)


def test_per_fedavg_defaults_are_the_documented_ones():
  """δ = 1e-3: the default gives the round of an explicit δ = 1e-3 bit for bit (and
  another δ another round); remat is off: only `remat=True` puts a checkpoint in the
  round's program."""
  data = small_data(num_clients=1, sizes=[11])
  make = lambda **kw: per_fedavg(logreg(), optax.sgd(0.5), optax.sgd(1.0),
                                 fp.LocalWork(3, steps=2), inner_lr=0.3, clients_per_round=1,
                                 **kw)
  s0 = make().init(jax.random.key(0), data)
  kernel = lambda **kw: np.asarray(
      jax.jit(make(hessian="finite_difference", **kw).round)(s0, data)[0]
      .params["Dense_0"]["kernel"])
  default = kernel()
  np.testing.assert_array_equal(default, kernel(delta=1e-3))
  assert np.abs(default - kernel(delta=1.0)).max() > 1e-6
  # jax.checkpoint's primitive (remat2 in jax 0.10)
  remats = lambda **kw: re.findall(r"\b(?:remat\w*|checkpoint)\[", str(
      jax.make_jaxpr(make(hessian="autodiff", **kw).round)(s0, data)))
  assert remats() == remats(remat=False) == [] and remats(remat=True)


def test_reptile_round_matches_numpy():
  data = small_data(num_clients=6)
  work, lr, eps = fp.LocalWork(4, steps=3), 0.1, 0.4
  alg = reptile(logreg(), optax.sgd(lr), work, outer_lr=eps, clients_per_round=4)
  s0 = alg.init(jax.random.key(0), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  # φ + ε · mean_i (W_i − φ): FedAvg's uniform mean, scaled by ε.
  w_avg, b_avg, _, _ = fedavg_round(s0.params, data, s0.rng, work, lr, 4, weighting="uniform")
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w + eps * (w_avg - w), atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b + eps * (b_avg - b), atol=1e-5)


@pytest.mark.parametrize("algorithm,meta_sgd", [
    ("per_fedavg", False), ("per_fedavg_fo", False), ("per_fedavg_hf", True), ("reptile", False)])
@pytest.mark.run
def test_meta_algorithms_run_from_configs(tmp_path, algorithm, meta_sgd):
  from configs.synthetic_per_fedavg import get_config
  from fedjax_pers.experiment import train_and_evaluate
  c = get_config()
  c.algorithm, c.per_fedavg.meta_sgd = algorithm, meta_sgd
  c.num_rounds, c.eval_every, c.progress = 3, 3, False
  c.execution.num_devices = 1
  c.data.num_clients, c.clients_per_round, c.client.local_steps = 8, 3, 2
  s = train_and_evaluate(c, str(tmp_path))
  assert s["rounds"] == 3
  assert 0.0 <= s["personalized_test_accuracy"] <= 1.0
  c.personalization.finetune_steps = 0
  with pytest.raises(ValueError, match="finetune_steps > 0"):
    train_and_evaluate(c, str(tmp_path / "no_adaptation"))
  if algorithm in ("per_fedavg_fo", "per_fedavg_hf"):   # the name fixes the Hessian term
    c.personalization.finetune_steps, c.per_fedavg.hessian = 1, "autodiff"
    with pytest.raises(ValueError, match="per_fedavg.hessian must be left at 'exact'"):
      train_and_evaluate(c, str(tmp_path / "hessian"))
    c.per_fedavg.hessian = "none" if algorithm == "per_fedavg_fo" else "finite_difference"
    c.num_rounds = 1                                    # its own value is accepted
    assert train_and_evaluate(c, str(tmp_path / "own_hessian"))["rounds"] == 1
  if algorithm == "reptile":   # its server step is reptile.outer_lr, not config.server
    c.personalization.finetune_steps, c.server.learning_rate = 1, 0.5
    with pytest.raises(ValueError, match="server.learning_rate must be 1.0; got 0.5"):
      train_and_evaluate(c, str(tmp_path / "server_lr"))


def test_hessian_free_fd_follows_the_paper_at_a_small_alpha_in_float32():
  # Per-FedAvg (HF) steps by δ along g itself: at α = 0.005, δ = 1e-3 in float32 the
  # Hessian term α·H g must stay accurate (a step of δα would drown in rounding).
  model = logreg(DIM, CLASSES)
  loss_fn = batch_loss(model)
  params = model.init(jax.random.key(0))
  with jax.enable_x64(True):
    sup, q, cur = batches(20, 1), batches(21), batches(22, 1)
  f32 = lambda b: tuple(jnp.asarray(a, jnp.float32) if a.dtype == jnp.float64 else a
                        for a in b)
  sup, q, cur = f32(sup), f32(q), f32(cur)
  alpha = 0.005
  fo = meta_gradient(loss_fn, params, alpha, sup, q, method="first_order").params
  hf = meta_gradient(loss_fn, params, alpha, sup, q, cur, method="hessian_free",
                     hvp_method="finite_difference", delta=1e-3).params
  ex = meta_gradient(loss_fn, params, alpha, sup, q, cur, method="hessian_free").params
  term = lambda g: ravel_pytree(jax.tree.map(jnp.subtract, g, fo))[0]
  assert rel_err(term(hf), term(ex)) < 1e-2


def test_inner_lr_must_be_a_scalar_or_shaped_like_the_params():
  model = logreg(DIM, CLASSES)
  loss_fn, params = batch_loss(model), model.init(jax.random.key(0))
  per_layer = {"Dense_0": {"kernel": 0.1, "bias": 0.1}}
  with pytest.raises(ValueError, match="inner_lr must be a scalar"):
    meta_gradient(loss_fn, params, per_layer, (), ())
  with pytest.raises(ValueError, match="inner_lr"):
    per_fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, steps=1),
               inner_lr=np.float32(-1.0), clients_per_round=1)
  with pytest.raises(ValueError, match="inner_lr"):
    meta_sgd_model(logreg(), 0.0)


def test_per_fedavg_two_inner_steps_matches_numpy():
  data = small_data(num_clients=1, sizes=[30])
  work, alpha, beta, k = fp.LocalWork(3, steps=2), 0.3, 0.5, 2
  alg = per_fedavg(logreg(), optax.sgd(beta), optax.sgd(1.0), work, inner_lr=alpha,
                   clients_per_round=1, inner_steps=k)
  s0 = alg.init(jax.random.key(0), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  for step in client_batches(s0, data, work, 2 * k + 1):
    ws = [(w, b)]
    for j in range(k):   # D_1..D_K
      gw, gb = logreg_grad(*ws[-1], *step[j])
      ws.append((ws[-1][0] - alpha * gw, ws[-1][1] - alpha * gb))
    vw, vb = logreg_grad(*ws[-1], *step[k])   # D′
    for j in reversed(range(k)):              # D″_j
      hw, hb = numpy_hvp(*ws[j], *step[k + 1 + j], vw, vb)
      vw, vb = vw - alpha * hw, vb - alpha * hb
    w, b = w - beta * vw, b - beta * vb
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w, atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b, atol=1e-5)


def test_meta_sgd_round_moves_the_rates_by_beta_times_their_meta_gradient():
  data = small_data(num_clients=1, sizes=[12])
  alpha, beta, work = 0.1, 0.5, fp.LocalWork(3, steps=1)
  model = meta_sgd_model(logreg(), alpha)
  alg = per_fedavg(model, optax.sgd(beta), optax.sgd(1.0), work, inner_lr=alpha,
                   clients_per_round=1, meta_sgd=True)
  s0 = alg.init(jax.random.key(0), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, fp.LocalWork(3, steps=3), split=False)
  b = (data.x[0][plan.idx], data.y[0][plan.idx], plan.mask)
  pick = lambda sl: jax.tree.map(lambda a: a[sl], b)
  mg = meta_gradient(batch_loss(logreg()), s0.params.model, s0.params.inner_lr,
                     pick(slice(0, 1)), pick(1), pick(slice(2, 3)), method="hessian_free")
  for new, old, g in zip(*(jax.tree.leaves(t) for t in (s1.params.inner_lr,
                                                        s0.params.inner_lr, mg.inner_lr))):
    np.testing.assert_allclose(new, old - beta * g, rtol=1e-5, atol=1e-7)


def test_meta_sgd_model_passes_train_and_key_and_tx_refuses_no_params():
  """The wrapped model evaluates θ alone, in eval mode by default, with the dropout key
  and `train` passed through; `meta_sgd_tx` starts from optax's empty state."""
  import flax.linen as nn

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))

  x = jnp.ones((4, 5))
  base = fp.core.from_flax(Drop(), x)
  model = meta_sgd_model(base, 0.1)
  params = model.init(jax.random.key(0))
  key = jax.random.key(3)
  np.testing.assert_array_equal(model.apply(params, x), base.apply(params.model, x))
  np.testing.assert_array_equal(model.apply(params, x, key=key, train=True),
                                base.apply(params.model, x, key=key, train=True))
  assert not np.array_equal(model.apply(params, x, key=key, train=True),
                            model.apply(params, x, key=jax.random.key(4), train=True))
  tx = meta_sgd_tx()
  assert tx.init(params) == optax.EmptyState()
  with pytest.raises(ValueError, match=r"^meta_sgd_tx needs params \(the Meta-SGD rates"):
    tx.update(params, tx.init(params), None)


def test_adapt_and_hvp_defaults_are_the_documented_ones():
  """`adapt` differentiates through its inner gradients unless told `first_order`, and
  the finite-difference HVP's default δ is 1e-3 (its O(δ²) error shows at δ ≈ 1)."""
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    support, query = batches(1, k=2), batches(2)
    outer = lambda kw: jax.grad(lambda p: loss_fn(adapt(loss_fn, p, 0.3, support, **kw),
                                                  query))(params)
    flat = lambda t: ravel_pytree(t)[0]
    default, second, first = (flat(outer(kw)) for kw in (
        {}, {"first_order": False}, {"first_order": True}))
    assert rel_err(default, second) == 0 and rel_err(default, first) > 1e-4
    v = random_like(params, 3)
    fd = lambda **kw: flat(hvp(loss_fn, params, query, v, method="finite_difference", **kw))
    assert rel_err(fd(), fd(delta=1e-3)) == 0 and rel_err(fd(), fd(delta=1.001)) > 1e-4


def test_hessian_free_finite_differences_use_their_delta():
  """HF with a finite-difference HVP steps by the δ given (default 1e-3): at δ = 0.5 it
  differs from the exact HVP's result, which equals the second-order meta-gradient."""
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    support, query, curvature = batches(30, K), batches(31), batches(32, K)
    flat = lambda **kw: ravel_pytree(meta_gradient(loss_fn, params, 0.3, support, query,
                                                   curvature, **kw).params)[0]
    hf = lambda **kw: flat(method="hessian_free", **kw)
    fd = lambda **kw: hf(hvp_method="finite_difference", **kw)
    assert rel_err(hf(), flat()) < 1e-9
    assert rel_err(fd(), fd(delta=1e-3)) == 0
    assert rel_err(fd(delta=0.5), hf()) > 1e-4 and rel_err(fd(delta=0.5), fd()) > 1e-4


def test_hessian_free_rates_equal_per_parameter_or_scalar_and_zero():
  """A Meta-SGD α equal to a everywhere gives HF's finite-difference result for the
  scalar a (the step is δ along α∘v / mean |α| = v); α = 0 gives the query gradient at θ."""
  with jax.enable_x64(True):
    _, loss_fn, params = setup("mlp")
    support, query, curvature = batches(33, K), batches(34), batches(35, K)
    flat = lambda lr: ravel_pytree(meta_gradient(
        loss_fn, params, lr, support, query, curvature, method="hessian_free",
        hvp_method="finite_difference", delta=0.5).params)[0]
    same = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    assert rel_err(flat(same), flat(0.3)) < 1e-12
    plain = ravel_pytree(jax.grad(loss_fn)(params, query))[0]
    for zero in (0.0, jax.tree.map(jnp.zeros_like, params)):
      assert rel_err(flat(zero), plain) < 1e-12


def test_hessian_free_keeps_the_parameters_dtype():
  """float32 parameters under x64: HF's meta-gradients (θ and a scalar α, given as a
  Python float or an array) stay float32, for a model with one parameter array."""
  with jax.enable_x64(True):
    loss_fn = lambda p, b: jnp.mean(jnp.log1p(jnp.exp(-b[1] * (b[0] @ p["w"]))))
    rs = np.random.RandomState(36)
    data = lambda *s: (jnp.asarray(rs.normal(size=s + (3,)), jnp.float32),
                       jnp.asarray(rs.choice([-1.0, 1.0], size=s), jnp.float32))
    params = {"w": jnp.asarray([0.2, -0.1, 0.4], jnp.float32)}
    for lr in (0.1, jnp.float32(0.1)):
      g = meta_gradient(loss_fn, params, lr, data(2, 4), data(4), method="hessian_free")
      assert g.params["w"].dtype == jnp.float32 and jnp.result_type(g.inner_lr) == jnp.float32
      assert np.all(np.isfinite(np.asarray(g.params["w"])))


def test_inner_lr_and_method_checks_in_full():
  from fedjax_pers.personalization._meta import check_inner_lr, check_method

  # a scalar α with parameters whose first leaf is a scalar: a scalar rate, not Meta-SGD
  params = {"a": jnp.asarray(0.5), "b": jnp.asarray([1.0, -2.0])}
  check_inner_lr(0.1, params)
  loss_fn = lambda p, b: jnp.sum(jnp.square(p["b"] * b)) + p["a"] ** 2
  w = adapt(loss_fn, params, 0.1, jnp.ones((1, 2)))
  np.testing.assert_allclose(w["a"], 0.5 - 0.1 * 2 * 0.5, rtol=1e-6)
  # one array that is not shaped like the parameters
  with pytest.raises(ValueError, match="^" + re.escape(
      "inner_lr must be a scalar or (Meta-SGD) a pytree with the parameters' structure and "
      "shapes {'a': (), 'b': (2,)}; got (2,).") + "$"):
    check_inner_lr(jnp.ones(2), params)
  check_method("second_order")              # the default HVP is a valid one
  check_method("hessian_free", "finite_difference")
  with pytest.raises(ValueError, match="^" + re.escape(
      "hvp must be one of ('exact', 'finite_difference'); got 'hf'.") + "$"):
    check_method("hessian_free", "hf")
