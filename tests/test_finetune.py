"""Fine-tuning personalization against a NumPy reference, and its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import logreg_sgd, lpt_makespan
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.core import ClientEval
from fedjax_pers.personalization import (
    PersonalizedEval,
    evaluate_personal,
    personalize,
    summarize_personalization,
)


def setup(seed=0):
  train = small_data(num_clients=5, seed=seed)
  test = small_data(num_clients=5, seed=seed + 10)
  model = logreg()
  params = model.init(jax.random.key(seed))
  return model, params, train, test


def test_zero_steps_is_the_global_model():
  model, params, train, test = setup()
  ev = jax.jit(lambda p: personalize(model, optax.sgd(0.5), p, train, test,
                                     jax.random.key(0), None))(params)
  np.testing.assert_array_equal(ev.personal.accuracy, ev.global_.accuracy)
  np.testing.assert_array_equal(ev.personal.loss, ev.global_.loss)
  glob = fp.core.evaluate(model, params, test)
  np.testing.assert_allclose(ev.global_.accuracy, glob.accuracy, rtol=1e-6)
  s = summarize_personalization(ev)
  assert s["fraction_clients_improved"] == 0.0 and s["mean_client_gain"] == 0.0


@pytest.mark.parametrize("work", [fp.LocalWork(3, steps=1), fp.LocalWork(4, steps=5),
                                  fp.LocalWork(4, epochs=2)])
def test_finetuning_matches_numpy_sgd(work):
  model, params, train, test = setup(1)
  key = jax.random.key(7)
  ev = jax.jit(lambda p: personalize(model, optax.sgd(0.3), p, train, test, key, work))(params)
  w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
  for c in range(train.num_clients):
    k_plan, _ = jax.random.split(jax.random.fold_in(key, c))
    plan = fp.core.batch_plan(k_plan, train.num_examples[c], work,
                              max_examples=train.max_examples, min_examples=train.min_examples)
    w, b, _, _ = logreg_sgd(w0, b0, np.asarray(train.x[c], np.float64), np.asarray(train.y[c]),
                            np.asarray(plan.idx), np.asarray(plan.mask), 0.3)
    xt, yt = test.client(c)
    acc = np.mean(np.argmax(xt @ w + b, axis=1) == yt)
    z = xt @ w + b
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(yt)), yt])
    assert abs(float(ev.personal.accuracy[c]) - acc) < 1e-6
    assert abs(float(ev.personal.loss[c]) - loss) < 1e-4


def test_every_execution_gives_the_same_evaluation():
  model, params, train, test = setup(2)
  work = fp.LocalWork(3, steps=4)
  run = lambda ex: jax.jit(lambda p: personalize(model, optax.sgd(0.2), p, train, test,
                                                 jax.random.key(1), work, execution=ex))(params)
  a = run(None)
  for ex in (fp.Execution(strategy="chunked", client_chunk=2), fp.Execution(strategy="scan"),
             fp.Execution(strategy="lanes", lanes=2), fp.Execution(strategy="vmap"),
             fp.Execution(mesh=fp.distributed.client_mesh(4))):
    b = run(ex)
    np.testing.assert_allclose(a.personal.loss, b.personal.loss, rtol=1e-6)
    np.testing.assert_array_equal(a.personal.accuracy, b.personal.accuracy)


def test_summary_by_hand():
  n = np.array([10, 30, 20, 40])
  glob = ClientEval(np.zeros(4), np.array([0.5, 0.6, 0.7, 0.2]), n)
  pers = ClientEval(np.zeros(4), np.array([0.6, 0.6, 0.5, 0.9]), n)
  s = summarize_personalization(PersonalizedEval(glob, pers))
  assert s["personalized_test_accuracy"] == pytest.approx((6 + 18 + 10 + 36) / 100)
  assert s["fraction_clients_improved"] == 0.5               # 0.6 = 0.6 is not a gain
  assert s["mean_client_gain"] == pytest.approx((0.1 + 0 - 0.2 + 0.7) / 4)
  assert s["worst10_client_personalized_accuracy"] == pytest.approx(0.5)
  assert s["per_client_gain"] == pytest.approx([0.1, 0.0, -0.2, 0.7])


def test_mismatched_clients_raise():
  model, params, train, _ = setup()
  with pytest.raises(ValueError, match="same clients"):
    personalize(model, optax.sgd(0.1), params, train, small_data(num_clients=3),
                jax.random.key(0), None)


@pytest.mark.run
def test_finetune_algorithm_from_the_cli_config(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  c = tiny_config()
  c.algorithm = "finetune"
  c.personalization.finetune_steps = 3
  s = train_and_evaluate(c, str(tmp_path))
  for key in ("personalized_test_accuracy", "mean_client_personalized_accuracy",
              "worst10_client_personalized_accuracy", "fraction_clients_improved",
              "best_personalized_test_accuracy", "per_client_personalized_accuracy",
              "per_client_gain"):
    assert key in s, key
  assert len(s["per_client_gain"]) == 8
  np.testing.assert_allclose(
      np.array(s["per_client_personalized_accuracy"]) - np.array(s["per_client_test_accuracy"]),
      s["per_client_gain"], atol=2e-6)
  c.personalization.finetune_steps = 0
  with pytest.raises(ValueError, match="finetune_steps > 0"):
    train_and_evaluate(c, str(tmp_path / "again"))


@pytest.mark.parametrize("strategy,x64", [("scan", False), ("lanes", False), ("vmap", False),
                                          ("scan", True), ("lanes", True)])
def test_blockwise_evaluation_of_long_padded_clients_matches_numpy(strategy, x64):
  # Each client's rows are read a block at a time, up to its own n.
  with jax.enable_x64(x64):
    _blockwise_case(strategy, x64)


def _blockwise_case(strategy, x64):
  from fedjax_pers.personalization._finetune import eval_block

  block = eval_block(np.array([100, 5, 33]))
  sizes = [block * 2 + 44, 5, block + 1]
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, n) for n in sizes]
  data = fp.FederatedData.from_clients(xs, ys, num_classes=3)
  model = fp.models.logistic_regression((4,), 3)
  params = model.init(jax.random.key(0))
  if x64:
    params = jax.tree.map(lambda p: p.astype(np.float64), params)
  own = jax.tree.map(lambda p: np.stack([p * (1 + 0.1 * c) for c in range(3)]), params)
  ev = jax.jit(lambda p, own: fp.personalization.evaluate_personal(
      model, own, p, data, execution=fp.Execution(strategy=strategy)))(params, own)
  assert ev.global_.loss.dtype == ev.personal.loss.dtype == (np.float64 if x64 else np.float32)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  for c, (x, y) in enumerate(zip(xs, ys)):
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
    assert abs(float(ev.global_.accuracy[c]) - np.mean(np.argmax(z, 1) == y)) < 1e-6
    assert abs(float(ev.global_.loss[c]) - loss) < 1e-5
    zo = x @ (w * (1 + 0.1 * c)) + b * (1 + 0.1 * c)
    zo = zo - zo.max(1, keepdims=True)
    own_loss = np.mean(np.log(np.exp(zo).sum(1)) - zo[np.arange(len(y)), y])
    assert abs(float(ev.personal.accuracy[c]) - np.mean(np.argmax(zo, 1) == y)) < 1e-6
    assert abs(float(ev.personal.loss[c]) - own_loss) < 1e-5


def test_evaluation_reads_blocks_up_to_each_clients_size():
  """The engine runs the evaluation program for Σ ⌈n_c / b⌉ blocks, not N · ⌈max n / b⌉."""
  from fedjax_pers.core._cohort import execute_cohort, pad_cohort
  from fedjax_pers.core._execution import plan
  from fedjax_pers.core._source import cohort_source
  from fedjax_pers.personalization._finetune import eval_program

  sizes = [300, 5, 17, 2, 64]
  rng = np.random.default_rng(0)
  data = fp.FederatedData.from_clients([rng.normal(size=(n, 4)).astype(np.float32)
                                        for n in sizes], [rng.integers(0, 3, n) for n in sizes])
  model = fp.models.logistic_regression((4,), 3)
  params = model.init(jax.random.key(0))
  own = jax.tree.map(lambda p: np.stack([p] * 5), params)
  program = eval_program(model, data.max_examples, 16)
  ids, valid = pad_cohort(np.arange(5), 1)
  blocks = sum(-(-n // 16) for n in sizes)
  for strategy, lanes in (("lanes", 2), ("scan", None)):
    how = plan(fp.Execution(strategy=strategy, lanes=lanes), params, None, 5)
    out = execute_cohort(program, params, cohort_source(data, own, jax.random.key(0)), ids,
                         valid, jax.random.key(0), plan=how)
    assert int(out.real_steps) == blocks
    assert int(out.executed_steps) == (blocks if lanes is None else lanes * lpt_makespan(
        [-(-n // 16) for n in sizes], lanes))
    ref = fp.core.evaluate(model, params, data)
    np.testing.assert_allclose(out.outputs[1], ref.accuracy, atol=1e-6)


def test_summary_keys_and_float64_arithmetic():
  """Every key (with the prefix), each figure in float64 from float32 inputs, the lists
  rounded to 6 digits."""
  n = np.array([7, 13, 3])
  acc_g = np.array([0.41234567, 0.70123456, 0.33333334], np.float32)
  acc_p = np.array([0.52345678, 0.69876543, 0.66666669], np.float32)
  loss_p = np.array([1.2345678, 0.3456789, 2.2222222], np.float32)
  s = summarize_personalization(PersonalizedEval(ClientEval(np.zeros(3, np.float32), acc_g, n),
                                                 ClientEval(loss_p, acc_p, n)), prefix="val")
  p64, g64, n64 = acc_p.astype(np.float64), acc_g.astype(np.float64), n.astype(np.float64)
  gain = p64 - g64
  assert s == {
      "personalized_val_accuracy": float(np.sum(n64 * p64) / np.sum(n64)),
      "personalized_val_loss": float(np.sum(n64 * loss_p.astype(np.float64)) / np.sum(n64)),
      "mean_client_personalized_accuracy": float(p64.mean()),
      "worst10_client_personalized_accuracy": float(p64.min()),
      "fraction_clients_improved": 2 / 3,
      "mean_client_gain": float(gain.mean()),
      "per_client_personalized_accuracy": [round(float(a), 6) for a in p64],
      "per_client_gain": [round(float(g), 6) for g in gain],
  }
  assert s["per_client_personalized_accuracy"][0] == 0.523457


def test_finetune_of_one_client_matches_numpy_sgd():
  from fedjax_pers.personalization import finetune

  model, params, train, _ = setup(3)
  work = fp.LocalWork(3, steps=4)
  key = jax.random.key(5)
  c = 2
  client = fp.core.ClientData(train.x[c], train.y[c], train.num_examples[c])
  got = finetune(model, optax.sgd(0.3), params, client, key, work,
                 max_examples=train.max_examples, min_examples=train.min_examples)
  k_plan, _ = jax.random.split(key)
  plan = fp.core.batch_plan(k_plan, train.num_examples[c], work,
                            max_examples=train.max_examples, min_examples=train.min_examples)
  w, b, _, _ = logreg_sgd(np.asarray(params["Dense_0"]["kernel"], np.float64),
                          np.asarray(params["Dense_0"]["bias"], np.float64),
                          np.asarray(train.x[c], np.float64), np.asarray(train.y[c]),
                          np.asarray(plan.idx), np.asarray(plan.mask), 0.3)
  np.testing.assert_allclose(got["Dense_0"]["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["Dense_0"]["bias"], b, rtol=1e-5, atol=1e-6)


def test_personal_evaluation_messages_name_the_argument():
  model, params, train, test = setup()
  personal = jax.tree.map(lambda p: np.stack([p] * 3), params)
  with pytest.raises(ValueError, match=r"^personal params must be stacked over the 5 clients; "
                     r"got leading sizes \[3\]\.$"):
    evaluate_personal(model, personal, params, test)
  capped = test.with_cap(4)
  assert capped.cap == 4
  personal = jax.tree.map(lambda p: np.stack([p] * 5), params)
  for call in (lambda: evaluate_personal(model, personal, params, capped),
               lambda: personalize(model, optax.sgd(0.1), params, train, capped,
                                   jax.random.key(0), None)):
    with pytest.raises(ValueError, match=r"^test is a capped flat store \(example_cap=4\); "
                       r"personalized evaluation tests every example of padded client rows: "
                       r"build it without a cap\.$"):
      call()


def test_zero_steps_from_per_client_starts_evaluates_the_starts():
  """`work=None` with `starts`: each client's personal model is its own start, evaluated
  on its test rows (by hand), and the global model is `params`."""
  model, params, train, test = setup(4)
  rng = np.random.default_rng(4)
  starts = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(5,) + p.shape), jnp.float32),
                        params)
  ev = personalize(model, optax.sgd(0.1), params, train, test, jax.random.key(0), None,
                   starts=starts)
  for c in range(test.num_clients):
    xt, yt = test.client(c)
    own = jax.tree.map(lambda a, c=c: np.asarray(a[c], np.float64), starts)
    z = np.asarray(xt, np.float64) @ own["Dense_0"]["kernel"] + own["Dense_0"]["bias"]
    assert abs(float(ev.personal.accuracy[c]) - np.mean(np.argmax(z, 1) == yt)) < 1e-6
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(yt)), yt])
    assert abs(float(ev.personal.loss[c]) - loss) < 1e-4
  glob = fp.core.evaluate(model, params, test)
  np.testing.assert_allclose(ev.global_.accuracy, glob.accuracy, rtol=1e-6)
  np.testing.assert_array_equal(ev.personal.num_examples, test.num_examples)


def test_finetuning_from_per_client_starts_matches_numpy_sgd():
  """With `starts`, client c fine-tunes from its own start, not from `params`."""
  model, params, train, test = setup(5)
  rng = np.random.default_rng(5)
  starts = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(5,) + p.shape), jnp.float32),
                        params)
  work = fp.LocalWork(4, steps=3)
  key = jax.random.key(9)
  ev = personalize(model, optax.sgd(0.3), params, train, test, key, work, starts=starts)
  for c in range(train.num_clients):
    k_plan, _ = jax.random.split(jax.random.fold_in(key, c))
    plan = fp.core.batch_plan(k_plan, train.num_examples[c], work,
                              max_examples=train.max_examples, min_examples=train.min_examples)
    own = jax.tree.map(lambda a, c=c: np.asarray(a[c], np.float64), starts)
    w, b, _, _ = logreg_sgd(own["Dense_0"]["kernel"], own["Dense_0"]["bias"],
                            np.asarray(train.x[c], np.float64), np.asarray(train.y[c]),
                            np.asarray(plan.idx), np.asarray(plan.mask), 0.3)
    xt, yt = test.client(c)
    z = np.asarray(xt, np.float64) @ w + b
    assert abs(float(ev.personal.accuracy[c]) - np.mean(np.argmax(z, 1) == yt)) < 1e-6
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(yt)), yt])
    assert abs(float(ev.personal.loss[c]) - loss) < 1e-4


def test_per_client_steps_must_number_one_per_client():
  model, params, train, test = setup()
  with pytest.raises(ValueError, match=r"^per-client local steps must number one per client "
                     r"\(5\); got 3\.$"):
    personalize(model, optax.sgd(0.1), params, train, test, jax.random.key(0),
                fp.LocalWork(2, steps=(1, 2, 3)))


def test_eval_block_is_a_power_of_two_near_a_quarter_of_the_mean_client():
  from fedjax_pers.personalization._finetune import eval_block

  assert eval_block(None) == eval_block(np.array([])) == 16       # 64 / 4 without sizes
  for sizes, want in (([8, 8], 16), ([400, 400], 128), ([200], 64), ([150, 250], 64),
                      ([4000], 256), ([100, 3000], 256), ([60], 16)):
    assert eval_block(np.array(sizes)) == want, sizes


def test_a_client_with_one_test_example_is_scored_on_it():
  from fedjax_pers.core import FederatedData

  rng = np.random.default_rng(6)
  xs = [rng.normal(size=(m, 5)).astype(np.float32) for m in (1, 4)]
  ys = [rng.integers(0, 3, m).astype(np.int32) for m in (1, 4)]
  test = FederatedData.from_clients(xs, ys, num_classes=3)
  model = logreg()
  params = model.init(jax.random.key(1))
  personal = jax.tree.map(lambda p: np.stack([p, p]), params)
  ev = evaluate_personal(model, personal, params, test)
  z = np.asarray(xs[0], np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64) + \
      np.asarray(params["Dense_0"]["bias"], np.float64)
  z = z - z.max(1, keepdims=True)
  loss = float(np.log(np.exp(z).sum(1))[0] - z[0, ys[0][0]])
  assert float(ev.personal.loss[0]) == pytest.approx(loss, rel=1e-5)
  assert float(ev.personal.accuracy[0]) == float(np.argmax(z[0]) == ys[0][0])
