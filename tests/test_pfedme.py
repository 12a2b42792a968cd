"""pFedMe against a NumPy reference; every client personalizes, k are averaged."""

import jax
import numpy as np
import pytest
from _reference import engine_plan, logreg_grad, logreg_loss
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import pfedme


def test_one_client_one_local_round_matches_numpy():
  data = small_data(num_clients=1, sizes=[7])
  work = fp.LocalWork(4, steps=1)
  eta, eta_p, lam, k_inner, beta = 0.05, 0.1, 3.0, 2, 0.7
  alg = pfedme(logreg(), work, learning_rate=eta, personal_learning_rate=eta_p, lam=lam,
               inner_steps=k_inner, beta=beta, clients_per_round=1)
  s0 = alg.init(jax.random.key(0), data)
  s1, m = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  sel = np.asarray(plan.idx[0])[np.asarray(plan.mask[0])]
  x, y = np.asarray(data.x[0], np.float64)[sel], np.asarray(data.y[0])[sel]
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  tw, tb = w.copy(), b.copy()
  for _ in range(k_inner):
    gw, gb = logreg_grad(tw, tb, x, y)
    tw, tb = tw - eta_p * (gw + lam * (tw - w)), tb - eta_p * (gb + lam * (tb - b))
  lw, lb = w - eta * lam * (w - tw), b - eta * lam * (b - tb)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["kernel"][0], tw, atol=1e-5)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["bias"][0], tb, atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], (1 - beta) * w + beta * lw,
                             atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], (1 - beta) * b + beta * lb, atol=1e-5)


def test_every_client_personalizes_and_k_are_averaged():
  data = small_data(num_clients=5)
  alg = pfedme(logreg(), fp.LocalWork(3, steps=2), learning_rate=0.05,
               personal_learning_rate=0.05, lam=5.0, inner_steps=2, clients_per_round=2)
  state = alg.init(jax.random.key(1), data)
  step = jax.jit(alg.round)
  for _ in range(2):
    before = np.asarray(state.client_states["Dense_0"]["kernel"])
    state, m = step(state, data)
    after = np.asarray(state.client_states["Dense_0"]["kernel"])
    assert all(not np.array_equal(before[c], after[c]) for c in range(5))
    w = np.asarray(m.weights)
    assert (w > 0).sum() == 2 and abs(w.sum() - 1) < 1e-6
    np.testing.assert_allclose(w[w > 0], [0.5, 0.5])          # the paper's (1/S) Σ w_i
  assert step._cache_size() == 1
  by_size = pfedme(logreg(), fp.LocalWork(3, steps=2), learning_rate=0.05,
                   personal_learning_rate=0.05, lam=5.0, inner_steps=2, clients_per_round=2,
                   average="num_examples")                    # the authors' code
  _, m = jax.jit(by_size.round)(by_size.init(jax.random.key(1), data), data)
  w, n = np.asarray(m.weights), np.asarray(data.num_examples, np.float64)
  np.testing.assert_allclose(w[w > 0], n[w > 0] / n[w > 0].sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="average must be one of"):
    pfedme(logreg(), fp.LocalWork(3, steps=2), learning_rate=0.1, personal_learning_rate=0.1,
           lam=1.0, inner_steps=1, clients_per_round=1, average="loss")
  with pytest.raises(ValueError, match="steps=R"):
    pfedme(logreg(), fp.LocalWork(3, epochs=1), learning_rate=0.1,
           personal_learning_rate=0.1, lam=1.0, inner_steps=1, clients_per_round=1)


@pytest.mark.run
def test_pfedme_from_the_config(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  c = tiny_config()
  c.algorithm = "pfedme"
  c.client.local_epochs = None
  c.client.local_steps = 2
  s = train_and_evaluate(c, str(tmp_path))
  assert len(s["per_client_personalized_accuracy"]) == 8
  assert s["client_state_bytes"] == 8 * (60 * 10 + 10) * 4


@pytest.mark.parametrize("key,value,match", [
    ("aggregation.weighting", "loss", "averages by one of"),
    ("sampling", "num_examples", "sampling must be"),
    ("server.learning_rate", 0.5, "server.learning_rate must be"),
    ("client.optimizer", "adam", "client.optimizer must be"),
    ("corruption.attack_fraction", 0.5, "corruption.attack_fraction must be")])
def test_pfedme_refuses_settings_it_would_ignore(key, value, match):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import make_algorithm, make_model, prepare_data

  c = tiny_config()
  c.algorithm = "pfedme"
  c.client.local_epochs, c.client.local_steps = None, 2
  data = prepare_data(c)
  model = make_model(c.model, data.train.x.shape[2:], data.train.num_classes)
  make_algorithm(c, model, data.train)     # 'default' weighting: pFedMe's uniform mean
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    make_algorithm(c, model, data.train)


def test_several_local_rounds_carry_theta_and_anchor_it_at_the_local_w():
  """R = 3 local rounds of one client against NumPy: θ continues from the previous local
  round's θ (it does not restart from w) and its proximal term pulls towards the local
  w_{i,r}, not the round's w_t. With R = 1 these could not be told apart."""
  data = small_data(num_clients=1, sizes=[9])
  rounds = 3
  work = fp.LocalWork(3, steps=rounds)
  eta, eta_p, lam, k_inner, beta = 0.1, 0.15, 2.0, 3, 1.0
  alg = pfedme(logreg(), work, learning_rate=eta, personal_learning_rate=eta_p, lam=lam,
               inner_steps=k_inner, beta=beta, clients_per_round=1)
  s0 = alg.init(jax.random.key(2), data)
  s1, m = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  xs, ys = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  tw, tb, lw, lb = w.copy(), b.copy(), w.copy(), b.copy()
  loss_sum = count = 0
  for r in range(rounds):
    sel = np.asarray(plan.idx[r])[np.asarray(plan.mask[r])]
    x, y = xs[sel], ys[sel]
    loss_sum, count = loss_sum + logreg_loss(tw, tb, x, y) * len(sel), count + len(sel)
    for _ in range(k_inner):
      gw, gb = logreg_grad(tw, tb, x, y)
      tw, tb = tw - eta_p * (gw + lam * (tw - lw)), tb - eta_p * (gb + lam * (tb - lb))
    lw, lb = lw - eta * lam * (lw - tw), lb - eta * lam * (lb - tb)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["kernel"][0], tw, atol=1e-5)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["bias"][0], tb, atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], lw, atol=1e-5)   # β = 1
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], lb, atol=1e-5)
  # The reported loss: each minibatch's loss at θ before its inner steps, over the examples.
  np.testing.assert_allclose(m.client_train_loss[0], loss_sum / count, rtol=1e-5)
  np.testing.assert_allclose(m.train_loss, loss_sum / count, rtol=1e-5)
  assert alg.personal(s1) is s1.client_states                  # the θ_k


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=0.0), "learning_rate must be a number > 0; got 0.0"),
    (dict(personal_learning_rate=-1), "personal_learning_rate must be a number > 0; got -1"),
    (dict(lam="5"), "lam must be a number > 0; got '5'"),
    (dict(inner_steps=0), r"inner_steps \(K\) must be an int >= 1; got 0"),
    (dict(inner_steps=2.0), r"inner_steps \(K\) must be an int >= 1; got 2.0"),
    (dict(beta=0.0), r"beta must be in \(0, 2\); got 0.0"),
    (dict(beta=2), r"beta must be in \(0, 2\); got 2"),
    (dict(execution=fp.Execution(sampling_probs=np.ones(5))),
     "pfedme: every client trains every round; execution.sampling_probs and poisson_rate"),
    (dict(execution=fp.Execution(poisson_rate=0.5)), "pfedme: every client trains every round"
     r"; execution.sampling_probs and poisson_rate must be None \(the averaged clients are "
     r"drawn uniformly\).$"),
])
def test_pfedme_refuses_bad_arguments(kwargs, match):
  ok = dict(learning_rate=0.1, personal_learning_rate=0.1, lam=1.0, inner_steps=1,
            clients_per_round=1)
  with pytest.raises(ValueError, match="^" + match):
    pfedme(logreg(), fp.LocalWork(3, steps=2), **{**ok, **kwargs})
  pfedme(logreg(), fp.LocalWork(3, steps=2), **{**ok, "beta": 1.999})


def test_sampled_mean_against_numpy():
  """`sampled_mean` on hand-made outputs: the clients its key draws count, equally by
  default (from key 0) or by n_i; a drawn client whose update is not finite drops out."""
  from fedjax_pers.algorithms._pfedme import sampled_mean
  from fedjax_pers.core._client import ClientOutput
  from fedjax_pers.core._sampling import sample_clients

  n = np.array([1, 1, 2, 4], np.int32)
  delta = np.array([1.0, 2.0, 3.0, np.nan], np.float32)
  outputs = ClientOutput(delta=delta, num_examples=n, train_loss=np.zeros(4, np.float32),
                         num_steps=np.ones(4, np.int32), label_hist=np.zeros((4, 2), np.int32),
                         finite=np.isfinite(delta), client_id=np.arange(4, dtype=np.int32))
  agg = sampled_mean(3, 4)
  state = agg.init(4)
  assert np.array_equal(jax.random.key_data(state.key), jax.random.key_data(jax.random.key(0)))
  for average in ("uniform", "num_examples"):
    agg = sampled_mean(3, 4) if average == "uniform" else sampled_mean(3, 4, average)
    key, sub = jax.random.split(state.key)
    chosen = np.asarray(sample_clients(sub, 4, 3))
    keep = np.isin(np.arange(4), chosen) & np.isfinite(delta)
    u = np.where(keep, 1.0 if average == "uniform" else n, 0.0)
    want = u / u.sum()
    mean, w, new = agg.apply(outputs, state, None)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    np.testing.assert_allclose(mean, (want * np.nan_to_num(delta)).sum(), rtol=1e-6)
    assert np.array_equal(jax.random.key_data(new.key), jax.random.key_data(key))


@pytest.mark.parametrize("hidden, strategy", [((), "vmap"), ((4000,), "scan")])
def test_the_plan_a_feed_asks_for_reads_the_models_size(hidden, strategy):
  """`auto` on CPU runs every client's equal steps side by side (vmap) for logistic
  regression and one client at a time (scan) for an MLP of 36,003 parameters: the plan
  must see the params it is given."""
  data = small_data(num_clients=4)
  model = fp.models.mlp((5,), 3, hidden=hidden) if hidden else logreg()
  alg = pfedme(model, fp.LocalWork(3, steps=2), learning_rate=0.1,
               personal_learning_rate=0.1, lam=1.0, inner_steps=1, clients_per_round=2,
               execution=fp.Execution(strategy="auto", mesh=None))
  params = model.init(jax.random.key(0))
  assert alg.plan(params, data).strategy == strategy
