"""The issue's scenarios with measured outcomes, shrunk to CI size (README has full runs).

Each runs `experiment.compare` on a shipped comparison config with fewer local
epochs, and asserts the outcome the full-size run shows.
"""

import importlib
import os

import pytest

from fedjax_pers.experiment import compare


def config(name, **over):
  c = importlib.import_module(f"configs.{name}").get_config()
  c.progress = False
  c.execution.num_devices = 1    # (see test_experiment.tiny_config)
  c.eval_train, c.tensorboard = False, False   # the assertions read test metrics only
  for key, value in over.items():
    node = c
    *path, leaf = key.split("__")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def by_label(out):
  return {r["label"]: r for r in out["strategies"]}


@pytest.mark.slow
def test_label_noise_quality_and_learned_weights_beat_data_size(tmp_path):
  c = config("compare_weighting", num_rounds=30, client__local_epochs=10)
  c.compare.strategies = (
      "num_examples: aggregation.weighting=num_examples",
      "loss: aggregation.weighting=loss, aggregation.temperature=0.5",
      "fedlaw: aggregation.weighting=fedlaw",
  )
  r = by_label(compare(c, str(tmp_path)))
  base = r["num_examples"]["last_evals_accuracy"]
  assert r["loss"]["last_evals_accuracy"] > base
  assert r["fedlaw"]["last_evals_accuracy"] > base
  assert r["fedlaw"]["corrupted_weight_share"] < r["fedlaw"]["corrupted_data_share"]


SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist is absent")
def test_scaled_sign_flip_attack_robust_aggregators_stay_close(tmp_path):
  c = config("compare_byzantine", num_rounds=20, eval_every=10)
  c.data.data_dir = SHARED_MNIST
  c.compare.strategies = (
      "no_attack: corruption.attack_scale=1.0",
      "mean: aggregation.weighting=num_examples",
      "median: aggregation.weighting=median",
      "trimmed_mean: aggregation.weighting=trimmed_mean",
      "krum: aggregation.weighting=krum",
  )
  r = by_label(compare(c, str(tmp_path)))
  ref = r["no_attack"]["final_accuracy"]
  assert r["mean"]["final_accuracy"] < ref - 0.2          # the mean collapses
  for name in ("median", "trimmed_mean", "krum"):
    assert r[name]["final_accuracy"] > ref - 0.05, name


@pytest.mark.slow
def test_q_ffl_lowers_the_variance_of_client_accuracy(tmp_path):
  c = config("compare_qffl", num_rounds=100)
  c.compare.strategies = ("q0: aggregation.q=0.0", "q2: aggregation.q=2.0")
  r = by_label(compare(c, str(tmp_path)))
  assert r["q2"]["variance_client_accuracy"] < r["q0"]["variance_client_accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist is absent")
def test_fine_tuning_helps_most_clients_on_mnist_dirichlet(tmp_path):
  from fedjax_pers.experiment import train_and_evaluate

  c = config("mnist_dirichlet_personal", num_rounds=30)
  c.data.data_dir = SHARED_MNIST
  s = train_and_evaluate(c, str(tmp_path))
  assert s["personalized_test_accuracy"] > s["final_test_accuracy"] + 0.03
  assert s["fraction_clients_improved"] >= 0.7
  assert s["worst10_client_personalized_accuracy"] > s["worst10_client_test_accuracy"]
