"""Personal layers: FedPer and LG-FedAvg against FedAvg and a NumPy reference."""

import jax
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_sgd
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.algorithms import fedavg, fedper, lg_fedavg
from fedjax_pers.personalization._layers import last_layer, merge, path_mask, personal_part

WORK = fp.LocalWork(3, steps=4)


def run(alg, data, rounds=2):
  state = alg.init(jax.random.key(0), data)
  step = jax.jit(alg.round)
  for _ in range(rounds):
    state, m = step(state, data)
  return state, m


def test_empty_personal_set_is_fedavg():
  data = small_data(num_clients=6)
  kw = dict(clients_per_round=3, execution=fp.Execution(strategy="vmap"))
  s1, m1 = run(fedper(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK,
                      personal=lambda path: False, **kw), data)
  s2, m2 = run(fedavg(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, **kw), data)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  assert s1.client_states == ()


def test_default_split_of_a_one_layer_model_is_refused():
  from fedjax_pers.algorithms import fedrep

  args = (logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK)
  for make, match in ((fedper, "fedper: its default personal part"),
                      (lg_fedavg, "lg_fedavg: its default shared part"),
                      (fedrep, "fedrep: its default head part")):
    extra = {"head_work": WORK} if make is fedrep else {}
    part = match.split()[-2]
    with pytest.raises(ValueError, match="^" + match + r", the model's last layer, is all 2 of "
                       "its parameter arrays, so nothing would be "
                       + ("personal" if make is lg_fedavg else "shared")
                       + r" \(a one-layer model such as logistic_regression\)\. Use an mlp or a "
                       rf"cnn, or pass a `{part}` predicate\.$"):
      make(*args, clients_per_round=2, **extra)
  fedper(*args, clients_per_round=2, personal=lambda path: True)   # explicit: local training
  fedrep(*args, clients_per_round=2, head_work=WORK, head=lambda path: False)
  mlp = fp.models.mlp((5,), 3, hidden=(4,))   # two layers: the defaults split them
  for make in (fedper, lg_fedavg, fedrep):
    make(mlp, *args[1:], clients_per_round=2, **({"head_work": WORK} if make is fedrep else {}))


@pytest.mark.run
def test_a_one_layer_model_in_the_config_is_refused(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  c = tiny_config()
  c.algorithm = "fedper"                           # the base config's logistic regression
  with pytest.raises(ValueError, match="Use an mlp or a cnn"):
    train_and_evaluate(c, str(tmp_path))


def test_predicates_and_merge():
  params = fp.models.mlp((4,), 3, hidden=(5,)).init(jax.random.key(0))
  head = last_layer(params)
  assert head("['Dense_1']['kernel']") and not head("['Dense_0']['bias']")
  mask = path_mask(params, head)
  assert sum(mask) == 2
  own = tuple(p + 1.0 for p in personal_part(params, mask))
  merged = merge(params, own, mask)
  np.testing.assert_array_equal(merged["Dense_1"]["kernel"], params["Dense_1"]["kernel"] + 1)
  np.testing.assert_array_equal(merged["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_fedper_one_client_matches_numpy_and_keeps_the_head_local():
  data = small_data(num_clients=1, sizes=[7])
  work = fp.LocalWork(3, steps=2)
  alg = fedper(logreg(), optax.sgd(0.2), optax.sgd(1.0), work, clients_per_round=1,
               personal=lambda path: "bias" in path)           # the bias is personal
  s0 = alg.init(jax.random.key(2), data)
  s0 = s0._replace(client_states=(s0.client_states[0] + 0.5,))
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b_own = np.asarray(s0.client_states[0][0], np.float64)
  wl, bl, _, _ = logreg_sgd(w, b_own, np.asarray(data.x[0], np.float64), np.asarray(data.y[0]),
                            np.asarray(plan.idx), np.asarray(plan.mask), 0.2)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], wl, atol=1e-5)   # shared: averaged
  np.testing.assert_array_equal(s1.params["Dense_0"]["bias"], s0.params["Dense_0"]["bias"])
  np.testing.assert_allclose(s1.client_states[0][0], bl, atol=1e-5)           # personal: kept


def test_unsampled_clients_keep_their_layers_and_personal_models_evaluate():
  data = small_data(num_clients=6)
  model = fp.models.mlp((5,), 3, hidden=(4,))
  alg = lg_fedavg(model, optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=2,
                  execution=fp.Execution(strategy="vmap"))
  state = alg.init(jax.random.key(0), data)
  before = [np.asarray(x) for x in state.client_states]
  state, m = jax.jit(alg.round)(state, data)
  sampled = set(np.asarray(m.clients).tolist())
  for c in range(6):
    same = all(np.array_equal(b[c], np.asarray(a)[c]) for a, b in zip(state.client_states,
                                                                          before))
    assert same == (c not in sampled)
  assert len(state.client_states) == 2          # LG: the lower layer (kernel, bias) is local
  ev = fp.personalization.evaluate_personal(model, alg.personal(state), state.params, data)
  assert ev.personal.accuracy.shape == (6,)


@pytest.mark.run
def test_personal_layer_algorithms_from_the_config(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  for name in ("fedper", "lg_fedavg", "fedrep", "apfl"):
    c = tiny_config()
    c.algorithm = name
    c.model.name = "mlp"
    c.model.hidden = (8,)
    s = train_and_evaluate(c, str(tmp_path / name))
    assert len(s["per_client_personalized_accuracy"]) == 8, name


def test_fedrep_one_client_trains_head_then_body_like_numpy():
  data = small_data(num_clients=1, sizes=[7])
  body_work, head_work = fp.LocalWork(3, steps=2), fp.LocalWork(4, steps=3)
  alg = fp.algorithms.fedrep(logreg(), optax.sgd(0.2), optax.sgd(1.0), body_work,
                             clients_per_round=1, head_work=head_work,
                             head=lambda path: "bias" in path,
                             execution=fp.Execution(strategy="vmap"))
  s0 = alg.init(jax.random.key(4), data)
  s0 = s0._replace(client_states=(s0.client_states[0] - 0.3,))
  s1, m = jax.jit(alg.round)(s0, data)
  _, _, k_clients = jax.random.split(s0.rng, 3)
  k_plan, _, k_body = jax.random.split(jax.random.fold_in(k_clients, 0), 3)
  x, y = np.asarray(data.x[0], np.float64), np.asarray(data.y[0])
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.client_states[0][0], np.float64)
  hp = fp.core.batch_plan(k_plan, 7, head_work, max_examples=7)
  w1, b1, _, _ = logreg_sgd(w, b, x, y, np.asarray(hp.idx), np.asarray(hp.mask), 0.2,
                            train_w=False)
  bp = fp.core.batch_plan(jax.random.split(k_body)[0], 7, body_work, max_examples=7)
  w2, b2, body_loss, _ = logreg_sgd(w1, b1, x, y, np.asarray(bp.idx), np.asarray(bp.mask), 0.2,
                                    train_b=False)
  np.testing.assert_array_equal(w1, w)
  np.testing.assert_allclose(m.client_train_loss[0], body_loss, rtol=1e-5)   # the body phase's
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w2, atol=1e-5)
  np.testing.assert_allclose(s1.client_states[0][0], b2, atol=1e-5)
  np.testing.assert_array_equal(s1.params["Dense_0"]["bias"], s0.params["Dense_0"]["bias"])


def test_fedrep_steps_are_the_head_plan_then_the_body_plan():
  """One client's steps: the head phase's real steps with their own keys, then the body
  phase's, widened to one batch width (here the head's batch is wider, the body has
  more steps than its batch width), then masked slots."""
  from fedjax_pers.algorithms._fedper import _fedrep_program
  from fedjax_pers.core._sgd import sgd_steps

  data = small_data(num_clients=1, sizes=[7])
  head_work, body_work = fp.LocalWork(4, steps=3), fp.LocalWork(2, steps=5)
  program = _fedrep_program(logreg(), optax.sgd(0.1), optax.sgd(0.1), head_work, body_work,
                            data, False)
  client = fp.core.ClientData(data.x[0], data.y[0], data.num_examples[0], None,
                              np.int32(0))
  key = jax.random.key(3)
  _, steps = program.start(logreg().init(key), client, key)
  k_plan, k_train, k_body = jax.random.split(key, 3)
  hp = fp.core.batch_plan(k_plan, 7, head_work, max_examples=7)
  body = sgd_steps(k_body, client, body_work, max_examples=7, min_examples=7)
  keys, in_head = steps.extra
  assert steps.idx.shape == (8, 4) and list(np.asarray(in_head)) == [True] * 3 + [False] * 5
  np.testing.assert_array_equal(steps.idx[:3], hp.idx)
  np.testing.assert_array_equal(steps.mask[:3], hp.mask)
  np.testing.assert_array_equal(steps.idx[3:, :2], body.idx)
  np.testing.assert_array_equal(steps.mask[3:, :2], body.mask)
  assert not np.any(steps.mask[3:, 2:])
  data_of = jax.random.key_data
  np.testing.assert_array_equal(data_of(keys[:3]), data_of(jax.random.split(k_train, 3)))
  np.testing.assert_array_equal(data_of(keys[3:]), data_of(body.extra))


def test_fedrep_with_a_stateful_optimizer():
  """AdamW (moments, and weight decay that reads the params) in both phases: each phase
  steps its own part with its own moments; the round is finite and moves both parts."""
  data = small_data(num_clients=3)
  adamw = optax.adamw(0.05, weight_decay=0.1)
  alg = fp.algorithms.fedrep(fp.models.mlp((5,), 3, hidden=(4,)), adamw, optax.sgd(1.0),
                             fp.LocalWork(3, steps=2), clients_per_round=3,
                             head_work=fp.LocalWork(3, steps=2))
  s0 = alg.init(jax.random.key(0), data)
  s1, m = jax.jit(alg.round)(s0, data)
  assert np.isfinite(float(m.train_loss)) and int(m.num_nonfinite) == 0
  assert not np.array_equal(s1.params["Dense_0"]["kernel"], s0.params["Dense_0"]["kernel"])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1.client_states),
                                                     jax.tree.leaves(s0.client_states))]
  assert all(moved)


def test_fedrep_checks_both_phases_steps_against_the_population():
  data = small_data(num_clients=4)
  short, fixed = fp.LocalWork(3, steps=(1, 2)), fp.LocalWork(3, steps=2)
  for work, head_work in ((short, fixed), (fixed, short)):
    alg = fp.algorithms.fedrep(fp.models.mlp((5,), 3, hidden=(4,)), optax.sgd(0.1),
                               optax.sgd(1.0), work, clients_per_round=2, head_work=head_work)
    with pytest.raises(ValueError, match=r"^per-client local steps must number one per "
                       r"client \(4\); got 2"):
      alg.round(alg.init(jax.random.key(0), data), data)


def test_lg_fedavg_one_client_keeps_the_lower_part_and_averages_the_head():
  # Logistic regression has one layer; call its bias the "head" (shared) and its
  # kernel the personal "lower layer".
  data = small_data(num_clients=1, sizes=[7])
  work = fp.LocalWork(3, steps=2)
  alg = lg_fedavg(logreg(), optax.sgd(0.2), optax.sgd(1.0), work, clients_per_round=1,
                  shared=lambda path: "bias" in path)
  s0 = alg.init(jax.random.key(5), data)
  s0 = s0._replace(client_states=(s0.client_states[0] * 0.5,))
  s1, _ = jax.jit(alg.round)(s0, data)
  plan = engine_plan(s0.rng, data, work)
  w_own = np.asarray(s0.client_states[0][0], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  wl, bl, _, _ = logreg_sgd(w_own, b, np.asarray(data.x[0], np.float64), np.asarray(data.y[0]),
                            np.asarray(plan.idx), np.asarray(plan.mask), 0.2)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], bl, atol=1e-5)      # shared head
  np.testing.assert_allclose(s1.client_states[0][0], wl, atol=1e-5)            # own layer
  np.testing.assert_array_equal(s1.params["Dense_0"]["kernel"], s0.params["Dense_0"]["kernel"])
