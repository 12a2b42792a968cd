"""The example cap: a flat store, a fresh random subset per round, true-n weights,
evaluation over all examples, and uncapped data unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import fedavg_round

import fedjax_pers as fp
from fedjax_pers.core import FederatedData

SIZES = [3, 50, 7, 23]


def make(cap=None, seed=0, id_scale=1.0):
  rng = np.random.default_rng(seed)
  # Feature 0 is a unique example id (client * 1000 + index) times id_scale, feature 1 noise.
  xs = [np.stack([(c * 1000 + np.arange(n)) * id_scale, rng.normal(size=n)], 1).astype(
      np.float32) for c, n in enumerate(SIZES)]
  ys = [rng.integers(0, 3, n) for n in SIZES]
  return FederatedData.from_clients(xs, ys, num_classes=3, example_cap=cap), xs, ys


def test_flat_store_holds_every_example_once():
  d, xs, ys = make(cap=10)
  assert d.cap == 10 and d.max_examples == 10 and d.padding_fraction == 0.0
  assert d.x.shape == (sum(SIZES), 2) and d.min_examples == 3
  for c in range(4):
    x, y = d.client(c)
    order = np.argsort(x[:, 0])
    np.testing.assert_array_equal(x[order], xs[c])
    np.testing.assert_array_equal(y[order], ys[c])
  assert d.stored_bytes < make()[0].stored_bytes


def test_cohort_subsets_distinct_fresh_and_covering():
  d, xs, _ = make(cap=10)
  cohort = jax.jit(d.cohort)
  idx = jnp.array([1, 0, 3])
  seen, subsets = set(), []
  for r in range(60):
    x, y, n = cohort(idx, jax.random.key(r))
    np.testing.assert_array_equal(n, [50, 3, 23])            # the TRUE sizes
    ids = np.asarray(x[0, :, 0]).astype(int)                  # client 1: 10 of its 50
    assert len(set(ids)) == 10 and all(1000 <= i < 1050 for i in ids)
    subsets.append(frozenset(ids))
    seen |= set(ids)
    small = np.asarray(x[1, :3, 0]).astype(int)               # client 0: all 3 of them
    assert sorted(small) == [0, 1, 2]
  assert len(set(subsets)) > 20                               # changes across rounds
  assert seen == set(range(1000, 1050))                       # all visited


def test_cohort_positions_by_their_definition():
  """Client c > cap: the circle of its n examples rotated by r uniform in [0, n), cut
  into strata [⌊j n / cap⌋, ⌊(j + 1) n / cap⌋), one uniform pick in each, all drawn
  from fold_in(key, c). Client c ≤ cap: its examples in order, then its first one in
  the padding slots. Clients 1 (50 > 10) and 3 (23), 2 (7 < 10), and a cap of 7 where
  client 2 fills it exactly and client 3's strata are 3 or 4 wide."""
  for cap, idx in ((10, [1, 0, 3, 2]), (7, [2, 3]), (5, [2, 0])):   # cap 5: strata 1 or 2 wide
    d, _, _ = make(cap=cap)
    key = jax.random.key(11)
    got = np.asarray(jax.jit(d.cohort_positions)(jnp.int32(idx), key))
    for row, c in zip(got, idx):
      n, start = SIZES[c], int(d.offsets[c])
      k_rot, k_pick = jax.random.split(jax.random.fold_in(key, c))
      if n > cap:
        edge = np.array([j * n // cap for j in range(cap + 1)])
        pick = np.asarray(jax.random.randint(k_pick, (cap,), 0, jnp.asarray(np.diff(edge))))
        rot = int(jax.random.randint(k_rot, (), 0, n))
        want = (rot + edge[:-1] + pick) % n
      else:
        want = np.where(np.arange(cap) < n, np.arange(cap), 0)
      np.testing.assert_array_equal(row, start + want)


def test_round_weights_use_true_sizes_and_training_sees_cap():
  d, _, _ = make(cap=10)
  model = fp.models.logistic_regression((2,), 3)
  alg = fp.algorithms.fedavg(model, optax.sgd(0.01), optax.sgd(1.0),
                             fp.core.LocalWork(batch_size=5, epochs=1), clients_per_round=4)
  state = alg.init(jax.random.key(0), d)
  state, m = jax.jit(alg.round)(state, d)
  sizes = np.asarray(SIZES, np.float64)[np.asarray(m.clients)]
  np.testing.assert_allclose(np.asarray(m.weights), sizes / sizes.sum(), rtol=1e-6)
  ev = fp.core.evaluate(model, state.params, d)
  np.testing.assert_array_equal(ev.num_examples, SIZES)


def test_evaluation_of_capped_covers_all_examples():
  capped, _, _ = make(cap=10)
  padded, _, _ = make()
  model = fp.models.logistic_regression((2,), 3)
  params = model.init(jax.random.key(3))
  a = fp.core.evaluate(model, params, capped)
  b = fp.core.evaluate(model, params, padded)
  np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
  np.testing.assert_allclose(a.accuracy, b.accuracy, rtol=1e-6)


def test_uncapped_round_matches_numpy_fedavg_and_cap_above_largest_is_a_no_op():
  padded, _, _ = make(id_scale=1e-3)          # features of order 1: no saturated softmax
  assert padded.with_cap(50) is padded and padded.cap is None
  model = fp.models.logistic_regression((2,), 3)
  alg = fp.algorithms.fedavg(model, optax.sgd(0.05), optax.sgd(1.0),
                             fp.core.LocalWork(batch_size=5, epochs=1), clients_per_round=2)
  s0 = alg.init(jax.random.key(0), padded)
  s1, _ = jax.jit(alg.round)(s0, padded)
  # The uncapped round is still the plain FedAvg round (NumPy reference).
  w, b, _, _ = fedavg_round(s0.params, padded, s0.rng, fp.core.LocalWork(batch_size=5,
                                                                          epochs=1), 0.05, 2)
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w, atol=1e-5)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], b, atol=1e-5)


def test_label_shuffling_keeps_the_cap_and_the_feature_dtype():
  capped, _, _ = make(cap=10)
  noisy = np.zeros(capped.num_clients, bool)
  noisy[0] = True
  out = fp.data.shuffle_labels(capped, noisy, seed=0)
  assert out.cap == 10 and out.x.dtype == capped.x.dtype
  np.testing.assert_array_equal(out.num_examples, capped.num_examples)
  ints = FederatedData.from_clients([np.arange(6).reshape(3, 2)] * 2, [np.arange(3)] * 2,
                                    dtype=np.int32)
  assert fp.data.shuffle_labels(ints, np.array([True, False])).x.dtype == np.int32


def test_cap_errors():
  d, _, _ = make()
  with pytest.raises(ValueError, match="cap"):
    d.with_cap(0)
  with pytest.raises(ValueError, match="exclude"):
    FederatedData.from_clients([np.zeros((3, 1))], [np.zeros(3, int)], max_examples=4,
                               example_cap=2)


def test_padded_flat_and_row_evaluations_agree_on_a_heavily_padded_split():
  """A padded store is evaluated over its real examples only, as its flat (capped) copy is,
  and as the padded rows of data built without host sizes are."""
  xs = [np.ones((n, 2), np.float32) * n for n in (1, 2, 30)]
  ys = [np.arange(n) % 3 for n in (1, 2, 30)]
  d = FederatedData.from_clients(xs, ys, num_classes=3)
  assert d.padding_fraction > 0.5
  flat = d.with_cap(1)
  rows = FederatedData(x=d.x, y=d.y, num_examples=d.num_examples, num_classes=3,
                       min_examples=d.min_examples)
  assert flat.cap is not None and rows.sizes is None
  model = fp.models.logistic_regression((2,), 3)
  params = model.init(jax.random.key(0))
  a = fp.core.evaluate(model, params, d)
  for other in (flat, rows):
    b = fp.core.evaluate(model, params, other)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)


def test_finetuning_reads_a_capped_store_like_training():
  """Each client fine-tunes on the capped rows `cohort` gives it (NumPy SGD on them)."""
  from _reference import logreg_sgd

  from fedjax_pers.personalization import personalize

  d, xs, ys = make(cap=10, id_scale=1e-3)    # features of order 1: a loss that moves
  test, _, _ = make(seed=1, id_scale=1e-3)
  model = fp.models.logistic_regression((2,), 3)
  params = model.init(jax.random.key(0))
  work, key, lr = fp.core.LocalWork(4, steps=3), jax.random.key(5), 0.05
  ev = jax.jit(lambda p: personalize(model, optax.sgd(lr), p, d, test, key, work))(params)
  w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
  for c in range(4):
    key_c = jax.random.fold_in(key, c)
    x, y, n = d.cohort(jnp.array([c]), jax.random.fold_in(key_c, 1))
    ids = set(np.rint(np.asarray(x[0, :min(SIZES[c], 10), 0]) * 1e3).astype(int))
    assert ids <= set(range(c * 1000, c * 1000 + SIZES[c]))   # its own examples only
    k_plan, _ = jax.random.split(key_c)
    plan = fp.core.batch_plan(k_plan, min(SIZES[c], 10), work, max_examples=10,
                              min_examples=d.min_examples)
    w, b, _, _ = logreg_sgd(w0, b0, np.asarray(x[0], np.float64), np.asarray(y[0]),
                            np.asarray(plan.idx), np.asarray(plan.mask), lr)
    xt, yt = test.client(c)
    z = xt @ w + b
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(yt)), yt])
    np.testing.assert_allclose(float(ev.personal.loss[c]), loss, rtol=1e-5)
    assert abs(loss - float(ev.global_.loss[c])) > 1e-3        # fine-tuning moved it
  with pytest.raises(ValueError, match="test is a capped flat store"):
    personalize(model, optax.sgd(lr), params, d, d, key, work)


@pytest.mark.run
def test_driver_fine_tunes_with_an_example_cap(tmp_path):
  from test_experiment import tiny_config

  from fedjax_pers.experiment import train_and_evaluate

  c = tiny_config()
  c.algorithm, c.personalization.finetune_steps = "finetune", 2
  c.data.example_cap = 5
  s = train_and_evaluate(c, str(tmp_path))
  assert s["train_example_cap"] == 5
  assert 0.0 <= s["personalized_test_accuracy"] <= 1.0
  assert len(s["per_client_personalized_accuracy"]) == c.data.num_clients


def test_capped_finetuning_starts_each_client_from_its_own_start():
  """With `starts`, client c's fine-tuning from a capped store equals fine-tuning every
  client from `params = start_c`, for client c (the same rows and keys)."""
  from fedjax_pers.personalization import personalize

  d, _, _ = make(cap=10, id_scale=1e-3)
  test, _, _ = make(seed=1, id_scale=1e-3)
  model = fp.models.logistic_regression((2,), 3)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(2)
  starts = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(d.num_clients,) + p.shape), jnp.float32), params)
  work, key = fp.core.LocalWork(4, steps=3), jax.random.key(6)
  ev = personalize(model, optax.sgd(0.05), params, d, test, key, work, starts=starts)
  plain = personalize(model, optax.sgd(0.05), params, d, test, key, work)
  for c in (0, 2):
    alone = personalize(model, optax.sgd(0.05), jax.tree.map(lambda a, c=c: a[c], starts), d,
                        test, key, work)
    np.testing.assert_allclose(ev.personal.loss[c], alone.personal.loss[c], rtol=1e-6)
    assert abs(float(ev.personal.loss[c]) - float(plain.personal.loss[c])) > 1e-4


def test_capped_finetuning_with_per_client_steps_on_a_mesh():
  """Per-client steps K_c from a capped store: client c's result equals a capped run
  where every client takes K_c steps, on one device and on a mesh of four (which deals
  the clients by their true sizes)."""
  from fedjax_pers.personalization import personalize

  d, _, _ = make(cap=10, id_scale=1e-3)
  test, _, _ = make(seed=1, id_scale=1e-3)
  model = fp.models.logistic_regression((2,), 3)
  params = model.init(jax.random.key(0))
  key, steps = jax.random.key(7), (2, 5, 3, 1)
  work = fp.core.LocalWork(4, steps=steps)
  tx = optax.sgd(0.05)
  ev = personalize(model, tx, params, d, test, key, work)
  meshed = personalize(model, tx, params, d, test, key, work,
                       execution=fp.Execution(mesh=fp.distributed.client_mesh(4)))
  np.testing.assert_allclose(meshed.personal.loss, ev.personal.loss, rtol=1e-6)
  for c in range(4):
    alone = personalize(model, tx, params, d, test, key, fp.core.LocalWork(4, steps=steps[c]))
    np.testing.assert_allclose(ev.personal.loss[c], alone.personal.loss[c], rtol=1e-6)
    assert abs(float(ev.personal.loss[c]) - float(ev.global_.loss[c])) > 1e-4
