"""DP-FedAvg from the config: ε reported and resumed, personalization under DP, refusals."""

import json

import numpy as np
import pytest
from test_experiment import tiny_config

from fedjax_pers import privacy
from fedjax_pers.experiment import _registry, train_and_evaluate


def dp_config(**privacy_keys):
  c = tiny_config()
  c.aggregation.weighting = "uniform"
  c.privacy.clip_norm = 0.5
  c.privacy.noise_multiplier = 0.8
  c.privacy.delta = 1e-3
  for k, v in privacy_keys.items():
    c.privacy[k] = v
  return c


@pytest.mark.run
def test_dp_run_reports_epsilon_every_evaluation_and_a_resume_agrees(tmp_path):
  c = dp_config()
  whole = train_and_evaluate(c, str(tmp_path / "whole"))
  want = privacy.epsilon(0.8, 3 / 8, 4, 1e-3, "rdp", "fixed", 8)
  assert whole["dp_epsilon"] == want and whole["dp_steps"] == 4
  assert (whole["dp_delta"], whole["dp_noise_multiplier"], whole["dp_sampling_rate"],
          whole["dp_accountant"]) == (1e-3, 0.8, 3 / 8, "rdp")
  rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
  assert [r["dp_steps"] for r in rows] == [0, 2, 4]
  assert rows[0]["dp_epsilon"] == 0 < rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"] == want
  # Killed after round 2 (its checkpoint), resumed to 4: the same ε, the same noise.
  c.checkpoint_every = 2
  c.num_rounds = 2
  train_and_evaluate(c, str(tmp_path / "cut"))
  c.num_rounds = 4
  resumed = train_and_evaluate(c, str(tmp_path / "cut"))
  assert resumed["dp_epsilon"] == want
  assert resumed["final_test_loss"] == pytest.approx(whole["final_test_loss"], abs=1e-6)


@pytest.mark.run
def test_noise_changes_the_run_and_clipping_alone_does_not_account(tmp_path):
  plain = train_and_evaluate(dp_config(clip_norm=None), str(tmp_path / "plain"))
  assert not any(k.startswith("dp_") for k in plain)
  quiet = train_and_evaluate(dp_config(noise_multiplier=0.0), str(tmp_path / "quiet"))
  assert quiet["dp_epsilon"] is None and quiet["dp_noise_multiplier"] == 0.0
  noisy = train_and_evaluate(dp_config(), str(tmp_path / "noisy"))
  assert noisy["final_test_loss"] != quiet["final_test_loss"]


def test_adaptive_clipping_moves_c_and_costs_the_same_epsilon(tmp_path):
  s = train_and_evaluate(dp_config(target_quantile=0.5, clipped_count_stddev=1.0,
                                   clip_norm=1e-3), str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  # Every update is clipped at C = 1e-3: the noised count stays near 0 and C grows.
  assert rows[0]["dp_clip_norm"] == pytest.approx(1e-3)
  assert rows[0]["dp_clip_norm"] < rows[1]["dp_clip_norm"] < rows[2]["dp_clip_norm"]
  assert s["dp_clip_norm"] == rows[2]["dp_clip_norm"]
  assert s["dp_epsilon"] == privacy.epsilon(0.8, 3 / 8, 4, 1e-3, "rdp", "fixed", 8)


@pytest.mark.run
def test_poisson_sampling_run_reports_realised_cohorts_and_pld_epsilon(tmp_path):
  s = train_and_evaluate(dp_config(sampling="poisson", accountant="pld"), str(tmp_path / "run"))
  assert s["dp_epsilon"] == privacy.epsilon(0.8, 3 / 8, 4, 1e-3, "pld", "poisson")
  assert s["dp_sampling"] == "poisson" and s["dp_cohort_slots"] == 8   # N = 8: all slots
  assert 0 < s["dp_delta_truncation"] <= 4e-12 or s["dp_delta_truncation"] == 0
  rows = [json.loads(line) for line in (tmp_path / "run" / "round_weights.jsonl").open()]
  assert [len(r["clients"]) for r in rows] == [r["cohort_size"] for r in rows]
  assert s["dp_cohort_sizes"]["mean"] == np.mean([r["cohort_size"] for r in rows])
  for r in rows:   # every present client weighs 1 / W, W = q N = 3
    np.testing.assert_allclose(r["weights"], 1 / 3, rtol=1e-5)


def test_local_dp_run_reports_local_epsilon_and_calibrates_for_it(tmp_path):
  s = train_and_evaluate(dp_config(local=True, noise_multiplier=None, target_epsilon=20.0),
                         str(tmp_path / "run"))
  z = s["dp_noise_multiplier"]
  assert s["dp_local"] is True
  assert s["dp_epsilon"] == privacy.local_epsilon(z, 4, 1e-3) <= 20.0
  assert privacy.local_epsilon(0.99 * z, 4, 1e-3) > 20.0


@pytest.mark.run
def test_target_epsilon_calibrates_the_noise_for_the_planned_rounds(tmp_path):
  s = train_and_evaluate(dp_config(noise_multiplier=None, target_epsilon=5.0),
                         str(tmp_path / "run"))
  z = s["dp_noise_multiplier"]
  assert s["dp_epsilon"] <= 5.0 < privacy.epsilon(0.99 * z, 3 / 8, 4, 1e-3, "rdp", "fixed", 8)


def test_capped_data_size_weights_use_the_fixed_denominator(tmp_path):
  c = dp_config(noise_multiplier=0.0, example_cap=20)
  c.aggregation.weighting = "num_examples"
  train_and_evaluate(c, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "round_weights.jsonl").open()]
  sizes = np.asarray(_registry.prepare_data(c).train.num_examples, np.float64)
  w = np.minimum(sizes / 20, 1.0)
  den = 3 / 8 * w.sum()
  for r in rows:
    np.testing.assert_allclose(r["weights"], w[r["clients"]] / den, rtol=1e-5)


def test_personal_models_under_dp(tmp_path):
  """Ditto's v_k never leave the client: they are trained, evaluated, not noised."""
  c = dp_config()
  c.algorithm = "ditto"
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert s["dp_epsilon"] > 0 and 0 < s["personalized_test_accuracy"] <= 1


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c.aggregation, "weighting", "cosine"), "weighting='cosine'"),
    (lambda c: setattr(c, "sampling", "num_examples"), "sampling='num_examples'"),
    (lambda c: setattr(c, "algorithm", "pfedme"), "algorithm='pfedme'"),
    (lambda c: setattr(c, "algorithm", "scaffold"), "algorithm='scaffold'"),
    (lambda c: setattr(c, "algorithm", "feddyn"), "algorithm='feddyn'"),
    (lambda c: setattr(c, "algorithm", "fednova"), "algorithm='fednova'"),
    (lambda c: setattr(c.privacy, "target_epsilon", 2.0), "exactly one of"),
    (lambda c: setattr(c.privacy, "noise_multiplier", None), "exactly one of"),
    (lambda c: setattr(c.aggregation, "weighting", "num_examples"), "privacy.example_cap"),
    (lambda c: setattr(c.privacy, "example_cap", 10), "it would be ignored"),
    (lambda c: setattr(c.privacy, "accountant", "pld"), "no event for sampling without"),
    (lambda c: setattr(c.privacy, "sampling", "shuffle"), "privacy.sampling='shuffle'"),
    (lambda c: (setattr(c.privacy, "local", True), setattr(c.secure_aggregation, "bits", 16)),
     "the secure sum adds no client-side noise"),
    (lambda c: setattr(c.privacy, "clip_norm", -1.0), "clip_norm must be a finite number"),
    (lambda c: setattr(c.privacy, "delta", 2.0), "delta must be a number in"),
    (lambda c: setattr(c.privacy, "target_quantile", 1.5), "target_quantile must be a number"),
    (lambda c: setattr(c.privacy, "clip_learning_rate", 0.5), "is for adaptive clipping"),
    (lambda c: (setattr(c.privacy, "target_quantile", 0.5),
                setattr(c.privacy, "clipped_count_stddev", 0.1)),
     "count_stddev must exceed noise_multiplier / 2 = 0.4"),
])
def test_refusals(tmp_path, edit, message):
  c = dp_config()
  edit(c)
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    train_and_evaluate(c, str(tmp_path / "run"))
