"""Local optimizer steps (`core._sgd`) against NumPy, one function at a time: the first
state, one step (FedProx's pull, the optimizer's state and the params it reads, batch
normalisation), a client's steps and its output."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import cross_entropy, dropout_logreg, logreg_grad, logreg_sgd, softmax
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.core._batching import work_steps
from fedjax_pers.core._client import ClientData, label_histogram
from fedjax_pers.core._model import BatchStats
from fedjax_pers.core._program import Batch
from fedjax_pers.core._sgd import (
  SGDState,
  client_output,
  fedavg_program,
  sgd_init,
  sgd_program,
  sgd_step,
  sgd_steps,
)

MODEL = fp.models.logistic_regression((3,), 4)
RS = np.random.RandomState(0)
X = RS.normal(size=(5, 3)).astype(np.float32)
Y = np.array([0, 3, 1, 3, 2])
W0 = RS.normal(size=(3, 4)).astype(np.float32)
B0 = RS.normal(size=4).astype(np.float32)


def params(w=W0, b=B0):
  return {"Dense_0": {"bias": jnp.asarray(b), "kernel": jnp.asarray(w)}}


def same(a, b):
  """Two pytrees equal leaf by leaf, PRNG keys by their data."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(x, y)


def wb(p):
  return (np.asarray(p["Dense_0"][k], np.float64) for k in ("kernel", "bias"))


def test_the_first_state_is_the_start_with_nothing_seen():
  p = {"a": jnp.ones(2, jnp.float16), "b": jnp.ones(3, jnp.float32)}
  tx = optax.sgd(0.1, momentum=0.9)
  s = sgd_init(tx, p)
  assert s.w is p
  assert (s.loss_sum.dtype, s.loss_sum.shape, float(s.loss_sum)) == (jnp.float16, (), 0.0)
  assert (s.count.dtype, s.count.shape, int(s.count)) == (jnp.int32, (), 0)
  assert jax.tree.structure(s.opt_state) == jax.tree.structure(tx.init(p))


def test_a_step_is_sgd_on_the_real_rows_with_the_proximal_pull():
  """f_b(w) = mean over the real rows + (μ/2)||w − anchor||²; the loss sum adds the real
  rows' losses (without the proximal term) and the count their number."""
  mask = np.array([True, False, True, True, False])
  x = X.copy()
  x[~mask] = 50.0                                        # padding must not count
  anchor = params(W0 + 0.3, B0 - 0.2)
  tx = optax.sgd(0.5)
  for mu in (None, 0.7):
    start = sgd_init(tx, params())._replace(loss_sum=jnp.float32(1.5), count=jnp.int32(2))
    s = sgd_step(MODEL, tx, start, jnp.asarray(x), jnp.asarray(Y), jnp.asarray(mask),
                 jax.random.key(0), prox_mu=mu, anchor=anchor)
    w, b = wb(params())
    gw, gb = logreg_grad(w, b, X[mask].astype(np.float64), Y[mask])
    if mu is not None:
      aw, ab = wb(anchor)
      gw, gb = gw + mu * (w - aw), gb + mu * (b - ab)
    got_w, got_b = wb(s.w)
    np.testing.assert_allclose(got_w, w - 0.5 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, b - 0.5 * gb, rtol=1e-5, atol=1e-6)
    total = cross_entropy(X[mask] @ w + b, Y[mask]).sum()
    np.testing.assert_allclose(float(s.loss_sum), 1.5 + total, rtol=1e-5)
    assert int(s.count) == 2 + 3 and s.count.dtype == jnp.int32


def test_a_step_keeps_the_loss_sums_dtype():
  tx = optax.sgd(0.1)
  start = sgd_init(tx, params())._replace(loss_sum=jnp.float16(0))
  s = sgd_step(MODEL, tx, start, jnp.asarray(X), jnp.asarray(Y), jnp.ones(5, bool),
               jax.random.key(0))
  assert s.loss_sum.dtype == jnp.float16


def test_the_optimizer_reads_its_state_and_the_params():
  """Two steps of weight decay (which reads the params) then momentum (which reads its
  trace): u_t = g_t + λ w_t, m_t = u_t + β m_{t−1}, w_{t+1} = w_t − η m_t."""
  lam, beta, lr = 0.1, 0.9, 0.2
  tx = optax.chain(optax.add_decayed_weights(lam), optax.sgd(lr, momentum=beta))
  s = sgd_init(tx, params())
  w, b = wb(params())
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  for rows in (slice(0, 3), slice(2, 5)):
    mask = np.zeros(5, bool)
    mask[rows] = True
    s = sgd_step(MODEL, tx, s, jnp.asarray(X), jnp.asarray(Y), jnp.asarray(mask),
                 jax.random.key(0))
    gw, gb = logreg_grad(w, b, X[mask].astype(np.float64), Y[mask])
    mw, mb = gw + lam * w + beta * mw, gb + lam * b + beta * mb
    w, b = w - lr * mw, b - lr * mb
  got_w, got_b = wb(s.w)
  np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_b, b, rtol=1e-5, atol=1e-6)


def _centring_model():
  """A hand-made model with batch statistics: logits s (x − μ_b/2) W in training, where μ_b
  is the mean of the batch's real rows and s = 1 + u, u uniform from the step's key; the
  running mean m ← (m + μ_b)/2 is written back."""

  def batch_mean(x, mask):
    return jnp.sum(jnp.where(mask[:, None], x, 0.0), 0, keepdims=True) / jnp.maximum(
        jnp.sum(mask), 1)

  def train(p, x, mask, key=None):
    mu = batch_mean(x, mask)
    return (1 + jax.random.uniform(key)) * ((x - mu / 2) @ p["w"]), (p["m"] + mu[0]) / 2

  return fp.core.Model(
      init=None, apply=lambda p, x, key=None, train=False: (x - p["m"][None]) @ p["w"],
      loss=fp.core.softmax_cross_entropy, metrics=fp.core.accuracy,
      batch_stats=BatchStats(train=train, put=lambda p, m: {**p, "m": m}))


def test_a_step_with_batch_statistics_normalises_by_the_real_rows_and_writes_them():
  model = _centring_model()
  tx = optax.sgd(0.5)
  p = {"w": jnp.asarray(W0), "m": jnp.float32([1.0, -2.0, 0.5])}
  anchor = {"w": jnp.asarray(W0 - 0.4), "m": jnp.zeros(3)}
  for mask, mu in (([True, False, True, True, False], None),
                   ([False, False, True, False, False], None),   # one row: the mean over 1
                   ([True, True, False, True, False], 0.6)):
    mask = np.array(mask)
    x = X.copy()
    x[~mask] = 40.0
    key = jax.random.key(len(mask) + mask.sum())
    s = sgd_step(model, tx, sgd_init(tx, p), jnp.asarray(x), jnp.asarray(Y), jnp.asarray(mask),
                 key, prox_mu=mu, anchor=anchor)
    scale = 1 + float(jax.random.uniform(key))
    xr = X[mask].astype(np.float64)
    mean = xr.mean(0)
    z = scale * (xr - mean / 2) @ W0.astype(np.float64)
    pr = softmax(z)
    pr[np.arange(len(xr)), Y[mask]] -= 1.0
    gw = scale * (xr - mean / 2).T @ pr / len(xr)
    if mu is not None:
      gw = gw + mu * (W0 - np.asarray(anchor["w"]))
    np.testing.assert_allclose(s.w["w"], W0 - 0.5 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.w["m"], (np.asarray(p["m"]) + mean) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s.loss_sum), cross_entropy(z, Y[mask]).sum(), rtol=1e-5)
    assert int(s.count) == mask.sum()


def _client(n=4):
  x = X.copy()
  x[n:] = 30.0
  y = Y.copy()
  y[n:] = 1
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.int32(n), None, jnp.int32(3))


def test_a_clients_steps_are_its_batch_plan_and_a_key_per_step():
  work = fp.LocalWork(3, epochs=2)
  key = jax.random.key(7)
  steps = sgd_steps(key, _client(4), work, max_examples=5, min_examples=2)
  k_plan, k_train = jax.random.split(key)
  plan = fp.core.batch_plan(k_plan, 4, work, max_examples=5, min_examples=2, client_id=3)
  np.testing.assert_array_equal(steps.idx, plan.idx)
  np.testing.assert_array_equal(steps.mask, plan.mask)
  np.testing.assert_array_equal(jax.random.key_data(steps.extra),
                                jax.random.key_data(jax.random.split(k_train, plan.idx.shape[0])))


def test_the_sgd_program_starts_where_told_and_pulls_towards_its_anchor():
  work, tx, client = fp.LocalWork(2, steps=3), optax.sgd(0.3), _client(4)
  shift = lambda p, c: jax.tree.map(lambda a: a + c.num_examples, p)
  anchor = params(W0 * 0, B0 * 0)
  batch = Batch(jnp.asarray(X), jnp.asarray(Y), jnp.ones(5, bool), jax.random.key(1))
  for start_from, anchor_arg in ((None, None), (shift, anchor)):
    program = sgd_program(MODEL, tx, work, max_examples=5, min_examples=2, prox_mu=0.8,
                          anchor=anchor_arg, start_from=start_from)
    state, steps = program.start(params(), client, jax.random.key(3))
    start = params() if start_from is None else shift(params(), client)
    same(state, sgd_init(tx, start))
    want_steps = sgd_steps(jax.random.key(3), client, work, max_examples=5, min_examples=2)
    np.testing.assert_array_equal(steps.idx, want_steps.idx)
    assert program.num_steps(client) == 3
    same(program.step(params(), state, batch),
         sgd_step(MODEL, tx, state, batch.x, batch.y, batch.mask, batch.extra, prox_mu=0.8,
                  anchor=params() if anchor_arg is None else anchor))
    assert program.finish(params(), client, state) is state
  epochs = sgd_program(MODEL, tx, fp.LocalWork(3, epochs=2), max_examples=5)
  assert int(epochs.num_steps(client)) == work_steps(fp.LocalWork(3, epochs=2), 4) == 4


def test_a_clients_output_by_hand():
  client = _client(4)
  shift = np.arange(4, dtype=np.float32)        # a change of the loss: not the same for every class
  w = params(1.5 * W0, B0 + shift)
  out = client_output(MODEL, params(), client, w, jnp.float32(3.0), jnp.int32(0), 5)
  np.testing.assert_allclose(out.delta["Dense_0"]["kernel"], 0.5 * W0, rtol=1e-6)
  np.testing.assert_allclose(out.delta["Dense_0"]["bias"], shift, atol=1e-6)
  assert out.num_examples is client.num_examples
  assert float(out.train_loss) == 3.0                   # no example seen: the sum over 1
  assert (int(out.num_steps), out.num_steps.dtype) == (0, jnp.int32)
  np.testing.assert_array_equal(out.label_hist, label_histogram(client, 5))
  assert bool(out.finite) and out.loss_before is None and out.loss_after is None
  out = client_output(MODEL, params(), client, w, jnp.float32(3.0), jnp.int32(4), 5,
                      client_losses=True)
  assert float(out.train_loss) == 0.75
  wants = [cross_entropy(X[:4].astype(np.float64) @ pw + pb, Y[:4]).mean()
           for pw, pb in ((W0, B0), (1.5 * W0, B0 + shift))]
  assert abs(wants[0] - wants[1]) > 0.1
  np.testing.assert_allclose([float(out.loss_before), float(out.loss_after)], wants, rtol=1e-5)
  inf = params(np.where(np.eye(3, 4) > 0, np.inf, W0), B0)
  assert not bool(client_output(MODEL, params(), client, inf, jnp.float32(0), jnp.int32(1),
                                5).finite)
  assert not bool(client_output(MODEL, params(), client, w, jnp.float32(0), jnp.int32(1), 5,
                                also_finite={"s": jnp.float32([1.0, np.nan])}).finite)
  assert bool(client_output(MODEL, params(), client, w, jnp.float32(0), jnp.int32(1), 5,
                            also_finite={"s": jnp.float32([1.0, 2.0])}).finite)


def test_fedavgs_client_is_the_sgd_program_with_its_output():
  work, tx, client = fp.LocalWork(2, epochs=1), optax.sgd(0.3), _client(4)
  state = SGDState(params(W0 + 0.1, B0), None, jnp.float32(2.0), jnp.int32(4))
  batch = Batch(jnp.asarray(X), jnp.asarray(Y), jnp.ones(5, bool), jax.random.key(1))
  for mu, losses in ((None, False), (0.4, True)):
    program = fedavg_program(MODEL, tx, work, num_classes=4, max_examples=5, min_examples=2,
                             prox_mu=mu, client_losses=losses)
    sgd = sgd_program(MODEL, tx, work, max_examples=5, min_examples=2, prox_mu=mu)
    same(program.start(params(), client, jax.random.key(2)),
         sgd.start(params(), client, jax.random.key(2)))
    init = sgd_init(tx, params())
    same(program.step(params(W0 * 0, B0 * 0), init, batch),
         sgd.step(params(W0 * 0, B0 * 0), init, batch))
    assert int(program.num_steps(client)) == 2
    out = program.finish(params(), client, state)
    ref = client_output(MODEL, params(), client, state.w, state.loss_sum, state.count, 4,
                        client_losses=losses)
    assert (out.loss_before is None) == (not losses)
    same(out, ref)


@pytest.mark.parametrize("mu", [None, 0.7])
def test_local_train_is_sgd_over_its_batch_plan(mu):
  """`local_train` (fine-tuning's and pFedHN's local steps) against float64 NumPy SGD on
  the plan `batch_plan` draws from the key's first half, with FedProx's pull to the start."""
  data = small_data(num_clients=3, sizes=[7, 4, 9])
  model, work, c = logreg(), fp.LocalWork(3, epochs=2), 2
  params = model.init(jax.random.key(1))
  params = jax.tree.map(lambda p: p + 0.1, params)
  client = fp.core.ClientData(data.x[c], data.y[c], data.num_examples[c], None, jnp.asarray(c))
  key = jax.random.key(5)
  out = fp.core.local_train(model, optax.sgd(0.2), params, client, key, work,
                            max_examples=data.max_examples, min_examples=data.min_examples,
                            prox_mu=mu)
  plan = fp.core.batch_plan(jax.random.split(key)[0], data.num_examples[c], work,
                            max_examples=data.max_examples, min_examples=data.min_examples,
                            client_id=c)
  w0, b0 = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
  x, y = np.asarray(data.x[c], np.float64), np.asarray(data.y[c])
  w, b, loss, steps = logreg_sgd(w0, b0, x, y, np.asarray(plan.idx), np.asarray(plan.mask), 0.2,
                                 mu=mu)
  assert steps == 6 and int(out.count) == 2 * 9     # ⌈9/3⌉ batches per epoch
  np.testing.assert_allclose(out.w["Dense_0"]["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.w["Dense_0"]["bias"], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(out.loss_sum) / int(out.count), loss, rtol=1e-5)


def test_fedavgs_client_by_default_reports_no_losses():
  program = fedavg_program(MODEL, optax.sgd(0.3), fp.LocalWork(2, epochs=2), num_classes=4,
                           max_examples=5)
  state = SGDState(params(), None, jnp.float32(2.0), jnp.int32(4))
  out = program.finish(params(), _client(4), state)
  assert out.loss_before is None and out.loss_after is None


def test_a_step_trains_with_its_key():
  """Dropout draws from the step's key: the same key gives the same step, another key
  another, and no key no step (flax has no rng to draw from)."""
  model = dropout_logreg(dim=3, num_classes=4, rate=0.5)
  p = model.init(jax.random.key(0))
  tx = optax.sgd(0.5)
  step = lambda key: sgd_step(model, tx, sgd_init(tx, p), jnp.asarray(X), jnp.asarray(Y),
                              jnp.ones(5, bool), key)
  a, b, c = step(jax.random.key(1)), step(jax.random.key(1)), step(jax.random.key(2))
  same(a, b)
  assert not np.allclose(a.w["Dense_0"]["kernel"], c.w["Dense_0"]["kernel"])
  program = sgd_program(model, tx, fp.LocalWork(2, steps=1), max_examples=5)
  batch = Batch(jnp.asarray(X), jnp.asarray(Y), jnp.ones(5, bool), jax.random.key(1))
  same(program.step(p, sgd_init(tx, p), batch), a)


def test_per_client_steps_follow_the_clients_id():
  """`LocalWork(steps=(K_0, K_1, ...))`: client c takes K_c steps, found by its id."""
  work = fp.LocalWork(2, steps=(1, 2, 3, 4))
  program = sgd_program(MODEL, optax.sgd(0.1), work, max_examples=5)
  for c in range(4):
    client = _client(5)._replace(id=jnp.int32(c))
    assert int(program.num_steps(client)) == c + 1
    steps = sgd_steps(jax.random.key(c), client, work, max_examples=5, min_examples=1)
    np.testing.assert_array_equal(steps.mask.any(1), np.arange(4) < c + 1)


@pytest.mark.parametrize("work", [fp.LocalWork(2, steps=3), fp.LocalWork(2, epochs=2)])
def test_local_trains_gradient_matches_finite_differences_in_float64(work):
  """d/dθ of a fixed linear read-out of the trained model, through local SGD (3 steps for
  everyone, or 2 epochs: a count known only when traced), against central differences."""
  with jax.enable_x64(True):
    data = small_data(num_clients=2, sizes=[5, 3])
    model = logreg()
    p0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(1)))
    client = fp.core.ClientData(jnp.asarray(data.x[0], jnp.float64), data.y[0],
                                data.num_examples[0], None, jnp.int32(0))
    read = jnp.asarray(np.random.RandomState(3).normal(size=p0["Dense_0"]["kernel"].shape))

    def f(kernel):
      p = {"Dense_0": {**p0["Dense_0"], "kernel": kernel}}
      out = fp.core.local_train(model, optax.sgd(0.7), p, client, jax.random.key(2), work,
                                max_examples=data.max_examples, min_examples=3)
      return jnp.sum(out.w["Dense_0"]["kernel"] * read) + out.loss_sum

    k0 = p0["Dense_0"]["kernel"]
    grad = jax.grad(f)(k0)
    eps = 1e-6
    for i, j in ((0, 0), (2, 1), (4, 2)):
      e = jnp.zeros_like(k0).at[i, j].set(eps)
      fd = (f(k0 + e) - f(k0 - e)) / (2 * eps)
      np.testing.assert_allclose(float(grad[i, j]), float(fd), rtol=1e-6, atol=1e-9)
