"""Runs over several processes (jax.distributed, CPU collectives through gloo) on localhost.

Two processes with two CPU devices each form one 4-device `clients` mesh; their
rounds must equal one process with four devices. Each run has a hard timeout
and its processes are killed on the way out.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
TINY = ["--config.eval_every=2", "--config.progress=False",
        "--config.data.num_clients=12", "--config.clients_per_round=6",
        "--config.client.local_epochs=2", "--config.eval_train=False",
        "--config.tensorboard=False"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args_of, num_processes: int, devices: int, tmp):
  """Starts `num_processes` processes (argv from `args_of(i)`) and waits for all of them.

  One that fails stops the others at once (a peer would otherwise wait for it
  until JAX's initialization timeout); any still running after `TIMEOUT` s are
  killed. Output goes to files, so no pipe can fill up and block a process.
  """
  env = subprocess_env(JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  logs = [open(os.path.join(tmp, f"process{i}-{time.monotonic_ns()}.log"), "w+")
          for i in range(num_processes)]
  procs = [subprocess.Popen(args_of(i), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
  deadline = time.monotonic() + TIMEOUT
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  for p, out in zip(procs, outs):
    if p.returncode != 0:
      if "gloo" in out.lower() and "not" in out.lower() and "support" in out.lower():
        pytest.skip(f"no CPU collectives on this platform: {out.strip().splitlines()[-1]}")
      raise AssertionError(f"a process exited with {p.returncode} (or was stopped after "
                           f"{TIMEOUT} s or a peer's failure); outputs:\n"
                           + "\n---\n".join(o[-2000:] for o in outs))
  return outs


def cli(workdir, extra=()):
  return [sys.executable, "-m", "fedjax_pers", f"--workdir={workdir}", *TINY, *extra]


@pytest.mark.slow
def test_two_processes_equal_one_with_four_devices_and_resume(tmp_path):
  two = str(tmp_path / "two")
  for rounds in (4, 6):   # 4 rounds, then the same command resumes them to 6
    port = free_port()
    launch(lambda i, rounds=rounds, port=port: cli(two, [f"--config.num_rounds={rounds}",
                               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2",
                               f"--config.distributed.process_id={i}"]), 2, 2, tmp_path)
  one = str(tmp_path / "one")
  launch(lambda i: cli(one, ["--config.num_rounds=6", "--config.execution.num_devices=4"]), 1, 4,
         tmp_path)
  with open(os.path.join(two, "summary.json")) as f:
    a = json.load(f)
  with open(os.path.join(one, "summary.json")) as f:
    b = json.load(f)
  assert a["execution"]["num_processes"] == 2 and b["execution"]["num_processes"] == 1
  assert a["execution"]["devices_visible"] == b["execution"]["devices_visible"] == 4
  assert a["rounds"] == b["rounds"] == 6
  assert abs(a["final_test_loss"] - b["final_test_loss"]) <= 1e-4
  np.testing.assert_allclose(a["per_client_test_accuracy"], b["per_client_test_accuracy"],
                             atol=1e-6)
  # Final parameters, from each run's last checkpoint.
  for x, y in zip(final_params(two), final_params(one)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
  # One writer: every round logged once, across the resume too.
  with open(os.path.join(two, "round_weights.jsonl")) as f:
    assert [json.loads(line)["round"] for line in f] == [1, 2, 3, 4, 5, 6]


def final_params(workdir):
  import jax
  import orbax.checkpoint as ocp
  root = os.path.join(workdir, "checkpoints")
  path = os.path.join(root, str(max(int(s) for s in os.listdir(root) if s.isdigit())), "default")
  ckptr = ocp.PyTreeCheckpointer()   # as host arrays, whatever topology saved them
  meta = ckptr.metadata(path).item_metadata
  tree = ckptr.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return [np.asarray(v) for v in jax.tree.leaves(tree["params"])]


def test_incomplete_distributed_config_is_refused():
  import fedjax_pers as fp
  with pytest.raises(ValueError, match="num_processes, process_id unset"):
    fp.distributed.initialize("127.0.0.1:1")
  with pytest.raises(ValueError, match=r"process_id must be an int in \[0, 2\); got 2"):
    fp.distributed.initialize("127.0.0.1:1", 2, 2)
  assert fp.distributed.initialize() is False


@pytest.mark.slow
def test_store_run_over_two_processes_gathers_each_process_share(tmp_path):
  """A run from a host store (Ditto: per-client states on the host too): each of two
  processes gathers only the clients its two devices run (4 of the 8 padded rows of a
  cohort of 6), and the run equals one process with four devices."""
  extra = ["--config.num_rounds=4", "--config.algorithm=ditto", "--config.model.hidden=(8,)"]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  port = free_port()
  launch(lambda i: cli(two, [*extra, f"--config.data.store={tmp_path / 'store2'}",
                             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                             "--config.distributed.num_processes=2",
                             f"--config.distributed.process_id={i}"]), 2, 2, tmp_path)
  launch(lambda i: cli(one, [*extra, f"--config.data.store={tmp_path / 'store1'}",
                             "--config.execution.num_devices=4"]), 1, 4, tmp_path)
  with open(os.path.join(two, "summary.json")) as f:
    a = json.load(f)
  with open(os.path.join(one, "summary.json")) as f:
    b = json.load(f)
  assert a["execution"]["num_processes"] == 2 and b["execution"]["num_processes"] == 1
  assert a["rows_gathered_per_cohort"] == 4 and b["rows_gathered_per_cohort"] == 8
  assert abs(a["final_test_loss"] - b["final_test_loss"]) <= 1e-5
  assert abs(a["personalized_test_accuracy"] - b["personalized_test_accuracy"]) <= 1e-5
  for x, y in zip(final_params(two), final_params(one)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
