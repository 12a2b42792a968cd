"""Ditto against a NumPy reference, per-client state invariants, and its limits in λ."""

import jax
import numpy as np
import optax
import pytest
from _reference import logreg_sgd
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import ditto

WORK = fp.LocalWork(3, steps=4)


def make(lam, k=3, lr=0.1, work=WORK, personal_work=None):
  return ditto(logreg(), optax.sgd(lr), optax.sgd(1.0), work, lam=lam, clients_per_round=k,
               execution=fp.Execution(strategy="vmap"), personal_work=personal_work)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_unsampled_clients_keep_their_personal_models_bit_for_bit():
  data = small_data(num_clients=6)
  alg = make(0.5)
  state = alg.init(jax.random.key(0), data)
  step = jax.jit(alg.round)
  for _ in range(3):
    before = leaves(state.client_states)
    state, m = step(state, data)
    after = leaves(state.client_states)
    sampled = set(np.asarray(m.clients).tolist())
    for c in range(6):
      same = all(np.array_equal(a[c], b[c]) for a, b in zip(before, after))
      assert same == (c not in sampled), c
  assert step._cache_size() == 1


def test_one_client_one_round_matches_numpy():
  data = small_data(num_clients=1, sizes=[7])
  work, personal_work = fp.LocalWork(3, steps=1), fp.LocalWork(2, steps=3)
  lam, lr = 0.7, 0.2
  alg = make(lam, k=1, lr=lr, work=work, personal_work=personal_work)
  s0 = alg.init(jax.random.key(3), data)
  # Give the personal model a different start than the global one.
  s0 = s0._replace(client_states=jax.tree.map(lambda v: v + 0.3, s0.client_states))
  s1, _ = jax.jit(alg.round)(s0, data)
  _, _, k_clients = jax.random.split(s0.rng, 3)
  key = jax.random.fold_in(k_clients, 0)
  k_global, k_plan, _ = jax.random.split(key, 3)
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])
  gplan = fp.core.batch_plan(jax.random.split(k_global)[0], 7, work, max_examples=7)
  wg, bg, _, _ = logreg_sgd(w, b, x, y, np.asarray(gplan.idx), np.asarray(gplan.mask), lr)
  pplan = fp.core.batch_plan(k_plan, 7, personal_work, max_examples=7)
  v = np.asarray(s0.client_states["Dense_0"]["kernel"][0], np.float64)
  c = np.asarray(s0.client_states["Dense_0"]["bias"][0], np.float64)
  wv, bv, _, _ = logreg_sgd(v, c, x, y, np.asarray(pplan.idx), np.asarray(pplan.mask), lr,
                            mu=lam, anchor=(w, b))
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], wg, atol=1e-5)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["kernel"][0], wv, atol=1e-5)
  np.testing.assert_allclose(s1.client_states["Dense_0"]["bias"][0], bv, atol=1e-5)
  assert alg.personal(s1) is s1.client_states                # the v_k


def test_large_lambda_pins_personal_models_to_the_global_one():
  # Each personal step is v ← v − η∇F(v) − ηλ(v − w_t); with ηλ = 1 it lands at
  # w_t − η∇F(v) = w_t − ∇F(v)/λ, so the gap to the global model shrinks like 1/λ.
  data = small_data(num_clients=4)
  gaps = []
  for lam in (10.0, 100.0, 1000.0, 10000.0):
    alg = ditto(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, lam=lam, clients_per_round=4,
                personal_tx=optax.sgd(1.0 / lam), execution=fp.Execution(strategy="vmap"))
    state = alg.init(jax.random.key(1), data)
    params0 = state.params
    state, _ = jax.jit(alg.round)(state, data)
    gaps.append(max(float(np.max(np.abs(np.asarray(v) - np.asarray(w)[None])))
                    for v, w in zip(jax.tree.leaves(state.client_states),
                                    jax.tree.leaves(params0))))
  ratios = [a / b for a, b in zip(gaps, gaps[1:])]
  assert all(5 < r < 20 for r in ratios), (gaps, ratios)
  assert gaps[-1] < 1e-3, gaps


@pytest.mark.run
def test_ditto_from_the_config_reports_personal_accuracy(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  c = tiny_config()
  c.algorithm = "ditto"
  c.ditto.lam = 0.1
  s = train_and_evaluate(c, str(tmp_path))
  assert 0 <= s["personalized_test_accuracy"] <= 1 and len(s["per_client_gain"]) == 8
  c.personalization.finetune_steps = 3      # tested with its own models: refused, not ignored
  with pytest.raises(ValueError, match="finetune_steps=3 would be ignored"):
    train_and_evaluate(c, str(tmp_path / "finetune"))


def test_bad_lambda_and_personal_steps():
  with pytest.raises(ValueError, match=r"^lam \(Ditto's λ\) must be a number >= 0; got -1.0"):
    make(-1.0)
  make(0.0)   # λ = 0: personal models train on their own data alone
  data = small_data(num_clients=4)
  short, fixed = fp.LocalWork(3, steps=(1, 2)), fp.LocalWork(3, steps=2)
  for alg in (make(0.5, personal_work=short), make(0.5, work=short, personal_work=fixed)):
    with pytest.raises(ValueError, match=r"^per-client local steps must number one per "
                       r"client \(4\); got 2"):
      alg.round(alg.init(jax.random.key(0), data), data)


@pytest.mark.parametrize("work,personal_work", [
    (fp.LocalWork(3, steps=(1, 3, 2, 4)), fp.LocalWork(3, steps=2)),
    (fp.LocalWork(3, steps=2), fp.LocalWork(3, steps=(1, 3, 2, 4)))])
def test_a_client_runs_the_longer_of_its_two_step_counts(work, personal_work):
  """Per-client steps on one side and a fixed count on the other: client i runs
  max(K_i, K'_i) steps (its global and personal steps run side by side)."""
  data = small_data(num_clients=4)
  alg = make(0.5, k=4, work=work, personal_work=personal_work)
  _, m = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  assert int(m.real_steps) == 2 + 3 + 2 + 4


@pytest.mark.parametrize("epochs_on", ["global", "personal"])
def test_epochs_count_each_clients_own_examples(epochs_on):
  """One epoch on one side and 2 steps on the other, sizes (2, 7, 4, 9) at B = 3: client
  i runs max(⌈n_i / 3⌉, 2) = 2, 3, 2, 3 steps."""
  data = small_data(num_clients=4, sizes=[2, 7, 4, 9])
  epoch, steps = fp.LocalWork(3, epochs=1), fp.LocalWork(3, steps=2)
  work, personal_work = (epoch, steps) if epochs_on == "global" else (steps, epoch)
  alg = make(0.5, k=4, work=work, personal_work=personal_work)
  _, m = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  assert int(m.real_steps) == 2 + 3 + 2 + 3


def test_each_personal_step_draws_its_own_dropout_key():
  """With input dropout, client c's personal model after 4 steps equals 4 SGD steps with
  the documented keys: the client's key fold_in(k_clients, c) splits into (global plan,
  personal plan, personal training), and the last into one key per personal step."""
  from _reference import dropout_logreg

  from fedjax_pers.core._sgd import sgd_init, sgd_step

  data = small_data(num_clients=1, sizes=[7])
  model, personal_work = dropout_logreg(rate=0.5), fp.LocalWork(3, steps=4)
  alg = ditto(model, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1), lam=0.5,
              clients_per_round=1, personal_work=personal_work)
  s0 = alg.init(jax.random.key(0), data)
  s1, _ = jax.jit(alg.round)(s0, data)
  _, _, k_clients = jax.random.split(s0.rng, 3)
  _, k_plan, k_train = jax.random.split(jax.random.fold_in(k_clients, 0), 3)
  plan = fp.core.batch_plan(k_plan, data.num_examples[0], personal_work,
                            max_examples=data.max_examples, min_examples=data.min_examples,
                            client_id=0)
  keys = jax.random.split(k_train, 4)
  s = sgd_init(optax.sgd(0.1), s0.params)
  for i in range(4):
    x, y = data.x[0][plan.idx[i]], data.y[0][plan.idx[i]]
    s = sgd_step(model, optax.sgd(0.1), s, x, y, plan.mask[i], keys[i], prox_mu=0.5,
                 anchor=s0.params)
  for got, want in zip(leaves(s1.client_states), leaves(s.w), strict=True):
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
