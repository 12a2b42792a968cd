"""Compression and secure aggregation from the config: bits reported, the same run as
without them where they cannot change it, refusals before anything compiles."""

import json

import pytest
from test_experiment import tiny_config
from test_privacy_run import dp_config

from fedjax_pers import privacy
from fedjax_pers.experiment import _communication, _registry, train_and_evaluate


def test_compressed_run_reports_bits_and_learns(tmp_path):
  c = tiny_config()
  c.compression.method = "quantize"
  c.compression.bits = 4
  c.compression.rotate = True
  s = train_and_evaluate(c, str(tmp_path / "q"))
  d = 60 * 10 + 10   # the synthetic data's logistic regression
  assert _communication.num_params(_registry.make_model(c.model, (60,), 10)) == d
  assert s["bits_per_client"] == privacy.bits_per_client(privacy.Compressor(
      "quantize", bits=4, rotate=True), d) == 4 * 1024 + 64
  rows = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").open()]
  assert s["compression"] == "quantize_4bit_rotated"
  assert s["bits_per_round"] == s["bits_per_client"] * c.clients_per_round
  assert all(r["bits_per_client"] == s["bits_per_client"] for r in rows)
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_top_k_with_error_feedback_run(tmp_path):
  c = tiny_config()
  c.compression.method = "top_k"
  c.compression.fraction = 0.25
  s = train_and_evaluate(c, str(tmp_path / "k"))
  assert s["compression"] == "top_k_0.25_ef"
  rows = [json.loads(line) for line in (tmp_path / "k" / "metrics.jsonl").open()]
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_secure_aggregation_without_noise_or_dropouts_is_the_clipped_mean(tmp_path):
  """32-bit fixed point: the DP-FedAvg run with z = 0 up to the rounding (≤ 2√d / s)."""
  plain = train_and_evaluate(dp_config(noise_multiplier=0.0), str(tmp_path / "plain"))
  c = dp_config(noise_multiplier=0.0)
  c.secure_aggregation.bits = 32
  secure = train_and_evaluate(c, str(tmp_path / "secure"))
  assert secure["final_test_loss"] == pytest.approx(plain["final_test_loss"], abs=1e-4)
  assert secure["compression"] == "secure_aggregation_32bit"
  assert secure["bits_per_client"] == 32 * 610


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c.compression, "method", "gzip"), "compression.method must be one of"),
    (lambda c: (setattr(c.compression, "method", "quantize"),
                setattr(c.compression, "bits", 0)), "compression.bits must be an int"),
    (lambda c: (setattr(c.compression, "method", "quantize"), setattr(c.privacy, "clip_norm", 1.0),
                setattr(c.privacy, "noise_multiplier", 0.0),
                setattr(c.aggregation, "weighting", "uniform"),
                setattr(c.secure_aggregation, "bits", 16)), "use one or the other"),
    (lambda c: setattr(c.secure_aggregation, "bits", 16), "needs privacy.clip_norm"),
    (lambda c: (setattr(c.privacy, "clip_norm", 1.0), setattr(c.privacy, "noise_multiplier", 0.0),
                setattr(c.aggregation, "weighting", "uniform"),
                setattr(c.privacy, "target_quantile", 0.5),
                setattr(c.secure_aggregation, "bits", 16)), "its own secure sum"),
    (lambda c: (setattr(c.privacy, "clip_norm", 1.0), setattr(c.privacy, "noise_multiplier", 0.0),
                setattr(c.aggregation, "weighting", "uniform"),
                setattr(c.secure_aggregation, "bits", 40)), "must be an int in \\[8, 32\\]"),
])
def test_refusals(tmp_path, edit, message):
  c = tiny_config()
  edit(c)
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(c, str(tmp_path / "run"))

