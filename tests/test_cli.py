"""The command lines end a bad config with its one-line message and status 2, not a
traceback; `--traceback` shows it."""

import subprocess
import sys

import pytest
from test_experiment import ROOT


@pytest.mark.parametrize("module,args,message", [
    ("fedjax_pers", ["--config.clients_per_round=0"],
     "error: config.clients_per_round must be an int in [1, num_clients] = [1, 30]; got 0."),
    ("fedjax_pers.compare", ["--config=configs/compare_stragglers.py",
                             "--config.compare.strategies=('x: algorithm=nope',)"],
     "error: Unknown algorithm"),
])
def test_a_bad_config_ends_with_its_message(tmp_path, module, args, message):
  cmd = [sys.executable, "-m", module, f"--workdir={tmp_path / 'run'}", *args]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert any(line.startswith(message) for line in out.stderr.splitlines()), out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  again = subprocess.run(cmd + ["--traceback"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode != 0 and "Traceback" in again.stderr
