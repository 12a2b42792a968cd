"""Runs from a host store (`data.store`): the same run as on the device, the store written
once from `config.data` and checked on reuse, evaluation on a seeded sample, refusals."""

import json
import os

import numpy as np
import pytest
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.experiment import _population, train_and_evaluate


def store_config(path, **kw):
  c = tiny_config()
  c.data.store = str(path)
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.run
def test_store_run_is_the_device_run_and_resumes(tmp_path):
  device = train_and_evaluate(tiny_config(), str(tmp_path / "dev"))
  c = store_config(tmp_path / "st")
  c.num_rounds = 2
  first = train_and_evaluate(c, str(tmp_path / "run"))
  assert first["rounds"] == 2
  x_bin = tmp_path / "st" / "train" / "x.bin"
  written = x_bin.stat().st_mtime_ns
  c.num_rounds = 4   # resume in the same workdir, from the same store
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert x_bin.stat().st_mtime_ns == written    # reused, not rewritten
  assert s["rounds"] == 4
  for key in ("final_test_loss", "final_train_loss", "final_test_accuracy"):
    assert s[key] == pytest.approx(device[key], abs=1e-6), key
  assert s["per_client_test_accuracy"] == pytest.approx(device["per_client_test_accuracy"],
                                                        abs=1e-6)
  rows = [json.loads(r) for r in (tmp_path / "run" / "round_weights.jsonl").read_text()
          .splitlines()]
  dev_rows = [json.loads(r) for r in (tmp_path / "dev" / "round_weights.jsonl").read_text()
              .splitlines()]
  assert [r["clients"] for r in rows] == [r["clients"] for r in dev_rows]
  assert s["evaluation"] == {"clients": "all", "num_clients": 8, "of": 8, "seed": 0,
                             "streamed": True}
  assert s["data_store"] == str(tmp_path / "st") and s["train_padding_fraction"] == 0.0
  assert device["evaluation"]["streamed"] is False
  record = json.loads((tmp_path / "st" / "data_config.json").read_text())
  assert record["num_clients"] == 8 and "store" not in record


def test_eval_sample_is_seeded_and_reported(tmp_path):
  c = store_config(tmp_path / "st", eval_clients=3, num_rounds=2)
  s = train_and_evaluate(c, str(tmp_path / "a"))
  ids = s["evaluated_client_ids"]
  assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
  assert s["evaluation"] == {"clients": "sample", "num_clients": 3, "of": 8, "seed": 0,
                             "streamed": True}
  assert len(s["per_client_test_accuracy"]) == 3
  again = train_and_evaluate(c, str(tmp_path / "b"))
  assert again["evaluated_client_ids"] == ids
  assert again["final_test_loss"] == s["final_test_loss"]
  # The sample's loss is the streamed evaluation of those clients, weighted by their sizes.
  train, test = fp.data.open_split_store(str(tmp_path / "st"))
  whole = train_and_evaluate(store_config(tmp_path / "st", num_rounds=2), str(tmp_path / "c"))
  n = np.asarray(test.sizes, np.float64)
  acc = np.asarray(whole["per_client_test_accuracy"])
  assert s["final_test_accuracy"] == pytest.approx(
      float(np.sum((n * acc)[ids]) / np.sum(n[ids])), abs=1e-6)
  c.seed = 1   # another seed, another sample
  assert _population.eval_clients(c, 8).tolist() != ids


def test_store_from_the_api_runs_as_data_name_store(tmp_path):
  fp.data.synthetic(1, 1, num_clients=8, seed=0, test_fraction=0.1, store=str(tmp_path / "s"))
  c = store_config(tmp_path / "s", num_rounds=2)
  with pytest.raises(ValueError, match="was not written from a config .*data.name='store'"):
    train_and_evaluate(c, str(tmp_path / "a"))
  c.data.name = "store"
  s = train_and_evaluate(c, str(tmp_path / "b"))
  ref = train_and_evaluate(store_config(tmp_path / "s2", num_rounds=2), str(tmp_path / "c"))
  assert s["final_test_loss"] == pytest.approx(ref["final_test_loss"], abs=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(seed=3), r"data.seed is 3, the store's 0"),
    (dict(num_clients=9), r"data.num_clients is 9, the store's 8"),
])
def test_a_store_holding_other_data_is_refused(tmp_path, change, message):
  fp.data.synthetic(1, 1, num_clients=8, store=str(tmp_path / "s"))
  c = store_config(tmp_path / "s", num_rounds=1)
  c.data.name = "store"
  train_and_evaluate(c, str(tmp_path / "ok"))
  c = store_config(tmp_path / "st", num_rounds=1)
  train_and_evaluate(c, str(tmp_path / "a"))
  for k, v in change.items():
    c.data[k] = v
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(c, str(tmp_path / "b"))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.data.update(example_cap=5), r"data.example_cap=5"),
    (lambda c: c.corruption.update(attack_fraction=0.2), r"corruption\.\*"),
    (lambda c: c.update(algorithm="finetune") or c.personalization.update(finetune_steps=2),
     r"personalization.finetune_steps=2"),
    (lambda c: c.update(algorithm="pfedme"), r"algorithm='pfedme' \(it trains every client"),
    (lambda c: c.update(algorithm="fedbuff"), r"algorithm='fedbuff' \(who reports next"),
    (lambda c: c.update(eval_clients=9), r"eval_clients must be None \(all\) or an int in "
     r"\[1, num_clients\] = \[1, 8\]; got 9"),
    (lambda c: c.data.update(store=None, name="store"), r"set data.store=PATH"),
])
def test_store_run_refusals(tmp_path, edit, message):
  c = store_config(tmp_path / "st", num_rounds=1)
  edit(c)
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(c, str(tmp_path / "run"))


def test_eval_clients_needs_a_store(tmp_path):
  c = tiny_config()
  c.eval_clients = 3
  with pytest.raises(ValueError, match="samples the clients of a host store"):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.run
@pytest.mark.parametrize("algorithm", ["ditto", "apfl"])
def test_per_client_state_runs_from_the_store_and_resumes(tmp_path, algorithm):
  """Ditto's v_k / APFL's (v_k, α_k) on the host: the same run as on the device (global
  and personalized figures), and a resume from round 2 of 4 restores the host states."""
  c = tiny_config()
  c.algorithm = algorithm
  c.model.name = "mlp" if algorithm == "apfl" else c.model.name
  c.model.hidden = (8,)
  device = train_and_evaluate(c, str(tmp_path / "dev"))
  c.data.store = str(tmp_path / "st")
  c.checkpoint_every = 2
  c.num_rounds = 2
  train_and_evaluate(c, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "client_states")) == ["2.npz"]
  c.num_rounds = 4
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "client_states")) == ["2.npz", "4.npz"]
  for key in ("final_test_loss", "personalized_test_accuracy", "personalized_test_loss",
              "mean_client_gain"):
    assert s[key] == pytest.approx(device[key], abs=1e-5), key
  assert s["per_client_personalized_accuracy"] == pytest.approx(
      device["per_client_personalized_accuracy"], abs=1e-5)
  assert 0 < s["client_state_host_bytes"] and device["client_state_host_bytes"] is None
  assert s["client_state_bytes"] < device["client_state_bytes"]   # k = 3 slots, not 8
