"""Clients held out of training (`data.holdout_clients`) and their `unseen_*` report."""

import jax
import numpy as np
import pytest

from fedjax_pers import data
from fedjax_pers.core import FederatedData
from fedjax_pers.experiment import _algorithms, _checkpoint, _registry, train_and_evaluate
from fedjax_pers.experiment.default_config import get_config


def _population(sizes, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, dim)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 4, size=n) for n in sizes]
  return xs, ys, FederatedData.from_clients(xs, ys, num_classes=4)


def test_holdout_clients_moves_whole_clients_and_keeps_the_order():
  xs, ys, train = _population([5, 2, 7, 3, 4, 6, 1, 8, 2, 3])
  txs, tys, test = _population([2, 1, 3, 1, 2, 2, 1, 3, 1, 1], seed=1)
  seen_tr, seen_te, un_tr, un_te, mask = data.holdout_clients(train, test, 0.3, seed=4)
  assert mask.sum() == 3 and mask.shape == (10,)
  ids_seen, ids_unseen = np.flatnonzero(~mask), np.flatnonzero(mask)
  for part, ids, arrays in ((seen_tr, ids_seen, (xs, ys)), (un_tr, ids_unseen, (xs, ys)),
                            (seen_te, ids_seen, (txs, tys)), (un_te, ids_unseen, (txs, tys))):
    assert part.num_clients == len(ids)
    for j, c in enumerate(ids):
      x, y = part.client(j)
      np.testing.assert_array_equal(x, arrays[0][c])
      np.testing.assert_array_equal(y, arrays[1][c])
    # Padded to the subset's own largest client.
    assert part.max_examples == max(len(arrays[1][c]) for c in ids)
  assert seen_tr.num_classes == un_te.num_classes == 4
  # Seeded: the same clients again; another seed, others.
  assert (data.holdout_clients(train, test, 0.3, seed=4)[4] == mask).all()


@pytest.mark.parametrize("fraction, match", [
    (0.0, r"holdout fraction must be in \(0, 1\); got 0.0"),
    (1.0, r"holdout fraction must be in \(0, 1\); got 1.0"),
    (0.99, r"holds out every client"),
])
def test_holdout_clients_refuses_bad_fractions(fraction, match):
  *_, train = _population([3, 3, 3])
  with pytest.raises(ValueError, match=match):
    data.holdout_clients(train, train, fraction)


def _config():
  c = get_config()
  c.num_rounds = 3
  c.eval_every = 3
  c.data.num_clients = 10
  c.clients_per_round = 3
  c.client.local_epochs = 1
  c.data.holdout_clients = 0.2
  c.personalization.finetune_steps = 3
  c.progress = False
  c.tensorboard = False
  c.execution.num_devices = 1
  return c


@pytest.mark.run
def test_held_out_clients_leave_training_bitwise_unchanged_and_are_reported(tmp_path):
  c = _config()
  summary = train_and_evaluate(c, str(tmp_path))
  # The same run without the unseen clients' evaluation: rounds of the algorithm alone.
  prepared = _registry.prepare_data(c)
  assert prepared.train.num_clients == 8
  model = _algorithms.make_run_model(c, prepared.train.feature_shape, prepared.train.num_classes)
  alg = _algorithms.make_algorithm(c, model, prepared.train)
  state = alg.init(jax.random.key(c.seed), prepared.train)
  round_fn = jax.jit(alg.round)
  for _ in range(c.num_rounds):
    state, _ = round_fn(state, prepared.train)
  saved = _checkpoint.restore_latest(_checkpoint.manager(str(tmp_path)), state)
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  assert summary["unseen_clients"] == prepared.unseen_ids.tolist() and len(
      summary["unseen_clients"]) == 2
  # The global model on the unseen clients' test splits, by NumPy (logistic regression).
  u_train, u_test = prepared.unseen
  w, b = (np.asarray(v, np.float64) for v in (state.params["Dense_0"]["kernel"],
                                              state.params["Dense_0"]["bias"]))
  hits, total, per_client = 0, 0, []
  for j in range(u_test.num_clients):
    x, y = u_test.client(j)
    right = np.argmax(x @ w + b, axis=1) == y
    hits, total = hits + right.sum(), total + len(y)
    per_client.append(right.mean())
  assert summary["unseen_test_accuracy"] == pytest.approx(hits / total, abs=1e-6)
  np.testing.assert_allclose(summary["unseen_per_client_test_accuracy"], per_client, atol=1e-6)
  gain = (np.asarray(summary["unseen_per_client_personalized_accuracy"])
          - np.asarray(summary["unseen_per_client_test_accuracy"]))
  np.testing.assert_allclose(summary["unseen_per_client_gain"], gain, atol=1e-5)
  assert summary["unseen_fraction_clients_improved"] == pytest.approx(np.mean(gain > 1e-9))
  # The seen clients' report covers the training clients only.
  assert len(summary["per_client_test_accuracy"]) == 8


@pytest.mark.run
def test_personal_algorithm_needs_fine_tuning_for_unseen_clients(tmp_path):
  c = _config()
  c.algorithm, c.personalization.finetune_steps = "ditto", 0
  with pytest.raises(ValueError, match=r"unseen clients fine-tune the global model; set "
                     r"personalization.finetune_steps > 0 \(got 0\)"):
    train_and_evaluate(c, str(tmp_path))
