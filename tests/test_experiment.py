"""The CLI end to end on a shrunken default config, resume, and config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

from fedjax_pers.experiment import train_and_evaluate
from fedjax_pers.experiment.default_config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  c = get_config()
  c.num_rounds = 4
  c.eval_every = 2
  c.data.num_clients = 8
  c.clients_per_round = 3
  c.client.local_epochs = 1
  c.progress = False
  # One device: the suite fakes 4 CPU devices on 2 cores, where sharding every small
  # run would only add compile time. The default (every device) has its own tests.
  c.execution.num_devices = 1
  return c


@pytest.mark.run
def test_cli_runs_and_writes_outputs(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fedjax_pers", f"--workdir={workdir}",
         "--config.num_rounds=3", "--config.eval_every=1", "--config.data.num_clients=6",
         "--config.clients_per_round=2", "--config.client.local_epochs=1",
         "--config.progress=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final test accuracy" in out.stdout
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("final_test_accuracy", "mean_client_test_accuracy",
              "worst10_client_test_accuracy", "per_client_test_accuracy", "final_test_loss",
              "rounds", "wall_seconds", "config"):
    assert key in summary
  assert summary["rounds"] == 3 and len(summary["per_client_test_accuracy"]) == 6
  assert summary["config"]["data"]["num_clients"] == 6
  assert (workdir / "curves.png").stat().st_size > 1000


def test_config_file_and_bad_override(tmp_path):
  cmd = [sys.executable, "-m", "fedjax_pers", "--config=configs/synthetic_fedprox.py",
         f"--workdir={tmp_path}", "--config.num_rounds=1", "--config.data.num_clients=4",
         "--config.clients_per_round=5", "--config.progress=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "clients_per_round must be an int in [1, num_clients] = [1, 4]; got 5" in out.stderr


def test_sampling_proportional_to_examples_runs(tmp_path):
  c = tiny_config()
  c.sampling = "num_examples"
  s = train_and_evaluate(c, str(tmp_path))
  assert s["rounds"] == 4 and 0.0 <= s["final_test_accuracy"] <= 1.0


@pytest.mark.run
def test_resume_from_checkpoint(tmp_path):
  c = tiny_config()
  s1 = train_and_evaluate(c, str(tmp_path))
  c.num_rounds = 6
  s2 = train_and_evaluate(c, str(tmp_path))
  rounds = [json.loads(x)["round"] for x in open(tmp_path / "metrics.jsonl")]
  assert rounds == [0, 2, 4, 6]
  assert s2["rounds"] == 6 and s1["rounds"] == 4
  # A straight 6-round run ends in the same place.
  s3 = train_and_evaluate(c, str(tmp_path / "straight"))
  assert s3["final_test_accuracy"] == pytest.approx(s2["final_test_accuracy"], abs=1e-6)
  # How clients execute may change; a different run in the same workdir is refused.
  c.execution.strategy, c.num_rounds = "scan", 7
  assert train_and_evaluate(c, str(tmp_path))["rounds"] == 7
  c.client.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config \(client.learning_rate: 0.01 -> 0.5\)"):
    train_and_evaluate(c, str(tmp_path))


def test_check_same_run_ignores_the_comparison_and_execution_keys(tmp_path):
  import ml_collections

  from fedjax_pers.experiment._checkpoint import check_same_run
  c = tiny_config()
  c.compare = ml_collections.ConfigDict({"target_accuracy": 0.7, "strategies": ("a: x=1",)})
  check_same_run(str(tmp_path), c, resuming=False)
  c.compare.target_accuracy, c.compare.strategies = 0.5, ("a: x=1", "b: x=2")
  c.execution.client_chunk, c.execution.lanes, c.execution.num_devices = 2, 3, 1
  check_same_run(str(tmp_path), c, resuming=True)        # the same run, in a larger table
  c.data.num_clients = 9
  with pytest.raises(ValueError, match="data.num_clients: 8 -> 9"):
    check_same_run(str(tmp_path), c, resuming=True)


def test_momentum_needs_a_rate_and_only_where_it_applies():
  from fedjax_pers.experiment import make_optimizer
  c = tiny_config()
  c.server.optimizer = "momentum"
  with pytest.raises(ValueError, match=r"server.optimizer='momentum' needs server.momentum"):
    make_optimizer(c.server, "server")                     # the base config's 0.0
  c.server.momentum = 0.9
  tx = make_optimizer(c.server, "server")
  state = tx.init(np.zeros(1))
  steps = []
  for _ in range(3):
    u, state = tx.update(np.ones(1), state)
    steps.append(float(u[0]))
  np.testing.assert_allclose(steps, [-1.0, -1.9, -2.71])    # heavy ball, β = 0.9
  c.server.optimizer = "adam"
  with pytest.raises(ValueError, match="server.momentum applies to sgd and momentum"):
    make_optimizer(c.server, "server")


@pytest.mark.parametrize("key,value,match", [
    ("client.optimizer", "sgdd", "Unknown client.optimizer 'sgdd'"),
    ("server.optimizer", "lamb", "Unknown server.optimizer"),
    ("execution.strategy", "pmap", "Execution strategy must be one of"),
    ("execution.lanes", 0, "Execution lanes must be an int >= 1; got 0"),
    ("execution.client_chunk", -2, "Execution client_chunk must be a positive int; got -2"),
    ("aggregation.weighting", "magic", "Unknown aggregation.weighting"),
    ("algorithm", "fedsgd", "Unknown algorithm"),
    ("model.name", "resnet", "Unknown model.name"),
    ("sampling", "greedy", "Unknown sampling 'greedy'"),
    ("execution.num_devices", 0, "execution.num_devices must be an int >= 1 or None"),
    ("execution.prefetch", 2, r"Unknown execution option\(s\) \['prefetch'\]"),
])
def test_unknown_names_raise(tmp_path, key, value, match):
  c = tiny_config()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(c, str(tmp_path))


@pytest.mark.run
def test_cli_num_devices_shards_and_matches(tmp_path):
  base = [sys.executable, "-m", "fedjax_pers", "--config.num_rounds=2", "--config.eval_every=2",
          "--config.data.num_clients=6", "--config.clients_per_round=4",
          "--config.client.local_epochs=1", "--config.progress=False",
          "--config.execution.strategy=scan"]
  env = subprocess_env()
  accs = []
  for n in (1, None):   # None: the default, one device per core
    flag = [] if n is None else [f"--config.execution.num_devices={n}"]
    out = subprocess.run(base + [f"--workdir={tmp_path / str(n)}"] + flag,
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / str(n) / "summary.json").read_text())
    accs.append(summary["final_test_loss"])
    cores = len(os.sched_getaffinity(0))
    assert summary["execution"]["devices_visible"] == (cores if n is None else max(n, 1))
    assert summary["execution"]["num_devices"] == (min(cores, 4) if n is None else n)
  assert accs[0] == pytest.approx(accs[1], rel=1e-5)


def test_tensorboard_events_read_back_as_the_metrics(tmp_path):
  """tensorboard's own reader finds every evaluation's numbers and each round's weights."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  c = tiny_config()
  train_and_evaluate(c, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                        size_guidance={"scalars": 0, "histograms": 0})
  ea.Reload()
  for key in ("test_accuracy", "test_loss", "mean_client_test_accuracy", "elapsed_seconds"):
    got = [(e.step, e.value) for e in ea.Scalars(key)]
    want = [(r["round"], r[key]) for r in rows]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  hist = ea.Histograms("aggregation_weights")
  weights = [json.loads(line) for line in (tmp_path / "run" / "round_weights.jsonl").open()]
  assert [h.step for h in hist] == [w["round"] for w in weights]
  assert all(h.histogram_value.num == len(w["weights"]) for h, w in zip(hist, weights))
  assert all(abs(h.histogram_value.sum - sum(w["weights"])) < 1e-5 for h, w in zip(hist, weights))
  c.tensorboard = False
  train_and_evaluate(c, str(tmp_path / "off"))
  assert not (tmp_path / "off" / "tensorboard").exists()
