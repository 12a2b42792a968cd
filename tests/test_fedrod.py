"""FedRoD: the balanced softmax and both heads' steps against NumPy, the personalized model
as the sum of the heads, the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import dropout_logreg, engine_plan, softmax
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import fedrod
from fedjax_pers.algorithms._fedrod import balanced_softmax_loss
from fedjax_pers.experiment import train_and_evaluate


def test_balanced_softmax_matches_its_definition():
  z = np.array([[0.3, -1.0, 2.0], [1.0, 0.5, -0.5]])
  y = np.array([0, 1])
  n = np.array([4.0, 1.0, 0.0])   # label 2 absent: probability 0
  got = balanced_softmax_loss(logreg(2, 3), jnp.asarray(z), jnp.asarray(y), jnp.asarray(n))
  want = [-np.log(n[t] * np.exp(r[t]) / np.sum(n * np.exp(r))) for r, t in zip(z, y)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _ref_client(w, b, phi_w, phi_b, x, y, plan, lr, num_classes):
  """FedRoD's local steps on logistic regression (the whole model is the head), float64."""
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  log_n = np.where(counts > 0, np.log(np.maximum(counts, 1)), -np.inf)
  for idx, m in zip(np.asarray(plan.idx), np.asarray(plan.mask)):
    sel = idx[m]
    if not len(sel):
      continue
    xb, yb, k = x[sel], y[sel], len(sel)
    p = softmax(xb @ w + b + log_n)            # the generic head, balanced softmax
    p[np.arange(k), yb] -= 1
    q = softmax(xb @ (w + phi_w) + b + phi_b)  # the personal prediction
    q[np.arange(k), yb] -= 1
    w, b, phi_w, phi_b = (w - lr * xb.T @ p / k, b - lr * p.sum(0) / k,
                          phi_w - lr * xb.T @ q / k, phi_b - lr * q.sum(0) / k)
  return w, b, phi_w, phi_b


@pytest.mark.parametrize("sizes", [None, [4, 7, 10, 4, 7]])
def test_a_round_matches_numpy(sizes):
  """With `sizes` ≡ 1 (mod 3), each epoch ends on a batch of one real example."""
  data = small_data(num_clients=5, num_classes=4, seed=3, sizes=sizes)
  work, lr = fp.LocalWork(3, epochs=2), 0.2
  alg = fedrod(logreg(5, 4), optax.sgd(lr), optax.sgd(1.0), work, clients_per_round=2)
  s0 = alg.init(jax.random.key(0), data)
  s1, m = jax.jit(alg.round)(s0, data)
  w0 = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  n = np.asarray(data.num_examples)
  ids = np.asarray(m.clients)
  dw, db = 0.0, 0.0
  for c in ids:
    x, y = (np.asarray(a)[: n[c]] for a in (data.x[c], data.y[c]))
    x = np.asarray(x, np.float64)
    plan = engine_plan(s0.rng, data, work, c)
    w, b, pw, pb = _ref_client(w0, b0, w0, b0, x, y, plan, lr, 4)   # φ starts at ψ_0
    dw, db = dw + n[c] * (w - w0), db + n[c] * (b - b0)
    np.testing.assert_allclose(s1.client_states[0][c], pb, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(s1.client_states[1][c], pw, rtol=2e-5, atol=2e-6)
  total = n[ids].sum()
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w0 + dw / total, rtol=2e-5,
                             atol=2e-6)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b0 + db / total, rtol=2e-5,
                             atol=2e-6)
  # Unsampled clients keep φ = ψ_0 bit for bit; the personal model's head is ψ + φ_i.
  rest = np.setdiff1d(np.arange(5), ids)
  np.testing.assert_array_equal(np.asarray(s1.client_states[1])[rest],
                                np.broadcast_to(s0.params["Dense_0"]["kernel"], (len(rest), 5, 4)))
  pers = alg.personal(s1)
  np.testing.assert_allclose(pers["Dense_0"]["kernel"],
                             np.asarray(s1.params["Dense_0"]["kernel"])[None]
                             + np.asarray(s1.client_states[1]), rtol=1e-6)


def test_the_personal_heads_step_uses_the_dropout_key():
  """After one local step φ_i has moved by the personal loss's gradient at the model
  before the step, so dropout in that loss alone tells rate 0.5 from rate 0."""
  data = small_data(num_clients=4)
  phis = []
  for rate in (0.5, 0.0):
    alg = fedrod(dropout_logreg(rate=rate, hidden=4), optax.sgd(0.5), optax.sgd(1.0),
                 fp.LocalWork(3, steps=1), clients_per_round=4)
    s, _ = jax.jit(alg.round)(alg.init(jax.random.key(1), data), data)
    phis.append(np.asarray(s.client_states[1]))
  assert np.max(np.abs(phis[0] - phis[1])) > 1e-5


def test_a_non_finite_personal_head_excludes_the_client():
  """φ_i is the client's result too: a client whose φ_i is NaN (here from the start) is
  counted non-finite, its Δ weighs nothing and its φ_i is not written back."""
  data = small_data(num_clients=4)
  alg = fedrod(logreg(), optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
               clients_per_round=4)
  s0 = alg.init(jax.random.key(1), data)
  s0 = s0._replace(client_states=(s0.client_states[0].at[0].set(jnp.nan),
                                  s0.client_states[1]))
  s1, m = jax.jit(alg.round)(s0, data)
  assert int(m.num_nonfinite) == 1 and float(m.weights[list(m.clients).index(0)]) == 0.0
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(s1.params))
  np.testing.assert_array_equal(s1.client_states[1][0], s0.client_states[1][0])


def test_the_personal_prediction_is_the_sum_of_the_heads():
  """On an MLP: the model with head ψ + φ gives G_ψ(f(x)) + P_φ(f(x))."""
  model = fp.models.mlp((5,), 3, hidden=(4,))
  data = small_data(num_clients=4)
  alg = fedrod(model, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
               clients_per_round=2)
  s, _ = jax.jit(alg.round)(alg.init(jax.random.key(1), data), data)
  c = int(np.argmax(np.any(np.asarray(s.client_states[1]) != np.asarray(
      s.params["Dense_1"]["kernel"])[None], axis=(1, 2))))
  x = data.x[c]
  r = np.asarray(model.represent(s.params, x))
  head = jax.tree.map(np.asarray, s.params["Dense_1"])
  phi_b, phi_w = np.asarray(s.client_states[0][c]), np.asarray(s.client_states[1][c])
  want = (r @ head["kernel"] + head["bias"]) + (r @ phi_w + phi_b)
  pers = jax.tree.map(lambda a: a[c], alg.personal(s))
  np.testing.assert_allclose(model.apply(pers, x), want, rtol=1e-5, atol=1e-5)


def test_a_head_predicate_names_the_heads():
  """`head=` picks the layers that get a personal copy φ_i (here both: the whole MLP)."""
  model = fp.models.mlp((5,), 3, hidden=(4,))
  data = small_data(num_clients=4)
  alg = fedrod(model, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
               clients_per_round=2, head=lambda path: "Dense" in path)
  shapes = [a.shape for a in jax.tree.leaves(alg.init(jax.random.key(1), data).client_states)]
  assert shapes == [(4,) + a.shape for a in jax.tree.leaves(model.init(jax.random.key(0)))]


@pytest.mark.run
def test_fedrod_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "fedrod", "mlp", (8,)
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert "personalized_test_accuracy" in s and s["rounds"] == 4
  assert np.isfinite(s["final_test_loss"])
  with pytest.raises(ValueError, match="finetune_steps=3 would be ignored"):
    c.personalization.finetune_steps = 3
    train_and_evaluate(c, str(tmp_path / "other"))
