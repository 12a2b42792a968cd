"""Weighting by name from configs, corrupted populations, and the comparison command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_experiment import ROOT, tiny_config

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers.experiment import (
    make_algorithm,
    make_model,
    parse_strategy,
    prepare_data,
    train_and_evaluate,
)
from fedjax_pers.experiment._compare import apply_overrides, rounds_to_target
from fedjax_pers.experiment._weighting import make_weighting, weighting_name, weighting_table


def test_parse_strategy():
  label, over = parse_strategy("loss05: aggregation.weighting=loss, aggregation.temperature=0.5")
  assert label == "loss05"
  assert over == {"aggregation.weighting": "loss", "aggregation.temperature": 0.5}
  assert parse_strategy("plain:") == ("plain", {})
  for bad in ("no colon", ": a=1", "x: novalue", "bad label: a=1"):
    with pytest.raises(ValueError, match="compare|expected key=value"):
      parse_strategy(bad)


def test_apply_overrides_copies_and_checks_keys():
  c = tiny_config()
  d = apply_overrides(c, {"aggregation.weighting": "median", "client.learning_rate": 0.5})
  assert d.aggregation.weighting == "median" and c.aggregation.weighting == "default"
  with pytest.raises(ValueError, match="Unknown config key 'aggregation.nope'"):
    apply_overrides(c, {"aggregation.nope": 1})


def test_rounds_to_target():
  recs = [{"round": 0, "a": 0.1}, {"round": 5, "a": 0.7}, {"round": 10, "a": 0.9}]
  assert rounds_to_target(recs, "a", 0.7) == 5 and rounds_to_target(recs, "a", 0.95) is None


def test_every_weighting_name_builds_and_traces_a_round():
  """Every name builds from the config and its round traces to weights over the cohort.
  (Traced, not compiled: 16 compilations cost a minute of CI; each weighting's values
  are tested against NumPy in its own tests, and runs from the config in test_scenarios.)"""
  c = tiny_config()
  c.data.proxy_examples = 20
  c.clients_per_round = 7        # Krum with f = 1 needs 2f + 3 = 5
  c.aggregation.trim_beta = 0.15  # trims one of 7 per side
  c.aggregation.fedlaw_steps = 2
  c.execution.strategy = "vmap"   # the weightings are under test: the quickest compile
  data = prepare_data(c)
  model = make_model(c.model, data.train.x.shape[2:], data.train.num_classes)
  for name in weighting_table(c, model, data.train, data.proxy):
    c.aggregation.weighting = name
    alg = make_algorithm(c, model, data.train, proxy=data.proxy)
    state = alg.init(jax.random.key(0), data.train)
    new, m = jax.eval_shape(alg.round, state, data.train)
    assert m.weights.shape == (7,) and m.weights.dtype == np.float32, name
    assert jax.tree.structure(new) == jax.tree.structure(state), name


@pytest.mark.run
def test_default_weighting_is_the_algorithms_own():
  """`default`: Per-FedAvg and Reptile average uniformly (their papers), FedAvg by n_i."""
  c = tiny_config()
  c.personalization.finetune_steps = 1
  c.client.local_epochs, c.client.local_steps = None, 2   # Per-FedAvg counts steps
  data = prepare_data(c)
  model = make_model(c.model, data.train.x.shape[2:], data.train.num_classes)
  n = np.asarray(data.train.num_examples, np.float64)
  assert len(set(n)) > 1   # unequal n_i, so the two weightings differ
  for algorithm, expected in (("fedavg", "num_examples"), ("finetune", "num_examples"),
                              ("per_fedavg", "uniform"), ("per_fedavg_hf", "uniform"),
                              ("reptile", "uniform")):
    c.algorithm = algorithm
    c.aggregation.weighting = "default"
    assert weighting_name(c) == expected
    alg = make_algorithm(c, model, data.train)
    _, m = jax.jit(alg.round)(alg.init(jax.random.key(0), data.train), data.train)
    cohort = n[np.asarray(m.clients)]
    want = cohort / cohort.sum() if expected == "num_examples" else np.full(len(cohort),
                                                                             1 / len(cohort))
    np.testing.assert_allclose(np.asarray(m.weights), want, rtol=1e-5, err_msg=algorithm)
    c.sampling = "num_examples"                  # drawn ∝ n_i: averaged uniformly
    assert weighting_name(c) == "uniform"
    c.sampling = "uniform"
    c.aggregation.weighting = "num_examples"     # an explicit name is kept
    assert weighting_name(c) == "num_examples"


def test_composed_weighting_from_config():
  c = tiny_config()
  c.aggregation.weighting = "num_examples*label_entropy"
  c.aggregation.power = 2.0
  c.aggregation.floor = 0.1
  data = prepare_data(c)
  model = make_model(c.model, data.train.x.shape[2:], data.train.num_classes)
  how = make_weighting(c, model, data.train)
  assert isinstance(how, agg.WeightFn) and how.score is None
  c.aggregation.weighting = "median*uniform"
  with pytest.raises(ValueError, match="only weight functions"):
    make_weighting(c, model, data.train)
  c.aggregation.weighting = "fedlaw"
  with pytest.raises(ValueError, match="data.proxy_examples"):
    make_weighting(c, model, data.train)
  c.aggregation.weighting = "magic*uniform"
  with pytest.raises(ValueError, match="Unknown aggregation.weighting 'magic'"):
    make_weighting(c, model, data.train)


def test_corruptions():
  tr, te = fp.data.synthetic(0.0, 0.0, num_clients=10, iid=True)
  mask = fp.data.choose_clients(10, 0.3, seed=1)
  assert mask.sum() == 3 and np.array_equal(mask, fp.data.choose_clients(10, 0.3, seed=1))
  assert fp.data.choose_clients(10, 0.25).sum() == 3          # half a client rounds up
  assert fp.data.choose_clients(10, 0.0).sum() == 0
  with pytest.raises(ValueError, match="chooses no client"):
    fp.data.choose_clients(10, 0.04)
  noisy = fp.data.shuffle_labels(tr, mask, seed=0)
  for c in range(10):
    x0, y0 = tr.client(c)
    x1, y1 = noisy.client(c)
    np.testing.assert_array_equal(x0, x1)
    if mask[c]:
      assert np.all(y1 != y0)                          # a derangement of the classes
      assert len(set(zip(y0.tolist(), y1.tolist()))) == len(set(y0.tolist()))  # consistent
    else:
      np.testing.assert_array_equal(y0, y1)
  rest, x, y = fp.data.holdout(te, 30, seed=0)
  assert x.shape[0] == 30 and int(np.sum(rest.num_examples)) == int(np.sum(te.num_examples)) - 30
  assert np.all(np.asarray(rest.num_examples) >= 1)
  pooled = {tuple(r) for c in range(te.num_clients) for r in te.client(c)[0].round(5)}
  kept = {tuple(r) for c in range(rest.num_clients) for r in rest.client(c)[0].round(5)}
  assert {tuple(r) for r in x.round(5)} == pooled - kept    # every example exactly once
  with pytest.raises(ValueError, match="num_examples must be an int"):
    fp.data.holdout(te, 10**6)


def test_run_with_corruption_reports_clean_accuracy_and_weights(tmp_path):
  c = tiny_config()
  c.corruption.label_shuffle_fraction = 0.25
  c.aggregation.weighting = "loss"
  s = train_and_evaluate(c, str(tmp_path))
  assert s["corrupted_clients"] == np.flatnonzero(fp.data.choose_clients(8, 0.25, 0)).tolist()
  assert 0 <= s["clean_client_test_accuracy"] <= 1
  assert 0 <= s["corrupted_weight_share"] <= 1 and 0 < s["corrupted_data_share"] < 1
  rows = [json.loads(line) for line in (tmp_path / "round_weights.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(abs(sum(r["weights"]) - 1) < 1e-4 and len(r["clients"]) == 3 for r in rows)
  assert (tmp_path / "weights.png").stat().st_size > 1000


@pytest.mark.run
def test_compare_command_writes_table_and_plot(tmp_path):
  cmd = [sys.executable, "-m", "fedjax_pers.compare", "--config=configs/compare_weighting.py",
         f"--workdir={tmp_path}", "--config.num_rounds=4", "--config.eval_every=2",
         "--config.data.num_clients=8", "--config.clients_per_round=4",
         "--config.client.local_epochs=1", "--config.progress=False",
         "--config.data.proxy_examples=20", "--config.aggregation.fedlaw_steps=3",
         "--config.compare.strategies=('fedavg: aggregation.weighting=num_examples', "
         "'fedlaw: aggregation.weighting=fedlaw', 'median: aggregation.weighting=median')"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads((tmp_path / "comparison.json").read_text())
  assert [r["label"] for r in res["strategies"]] == ["fedavg", "fedlaw", "median"]
  for r in res["strategies"]:
    assert r["accuracy_key"] == "clean_client_test_accuracy"
    assert [p[0] for p in r["curve"]] == [0, 2, 4]
    assert len(r["per_client_accuracy"]) == 8
  table = (tmp_path / "comparison.md").read_text()
  assert "clean clients' test data" in table and "| median |" in table
  assert (tmp_path / "comparison.png").stat().st_size > 5000
  # The same cohorts in every strategy.
  rows = [[json.loads(line)["clients"] for line in
           (tmp_path / lab / "round_weights.jsonl").read_text().split("\n") if line]
          for lab in ("fedavg", "fedlaw", "median")]
  assert rows[0] == rows[1] == rows[2]
  assert os.path.exists(tmp_path / "fedlaw" / "summary.json")


def test_against_first_by_hand_and_personalized_columns():
  from fedjax_pers.experiment._compare import against_first, comparison_table

  def result(label, acc, pers=None):
    return {"label": label, "curve": [[0, 0.1], [5, 0.5]], "last_evals_accuracy": 0.4,
            "mean_client_accuracy": float(np.mean(acc)), "worst10_client_accuracy": 0.1,
            "variance_client_accuracy": 0.01, "rounds_to_target": None,
            "clean_client_accuracy": None, "seconds_per_round": 0.01,
            "per_client_accuracy": acc, "per_client_personalized_accuracy": pers,
            "personalized_accuracy": None if pers is None else float(np.mean(pers)),
            "worst10_client_personalized_accuracy": None if pers is None else min(pers)}

  fedavg = result("fedavg", [0.5, 0.6, 0.7, 0.2])
  # A personalized strategy is judged by its personalized accuracies, not its global model.
  meta = result("meta", [0.1, 0.1, 0.1, 0.1], pers=[0.6, 0.6, 0.5, 0.9])
  other = result("other", [0.5, 0.6, 0.7])                      # different clients
  assert against_first(fedavg, fedavg)["clients_better_than_first"] is None
  v = against_first(meta, fedavg)
  assert v["clients_better_than_first"] == 0.5                    # 0.6 = 0.6 is no gain
  assert v["clients_tied_with_first"] == 0.25
  assert v["mean_client_gain_vs_first"] == pytest.approx((0.1 + 0 - 0.2 + 0.7) / 4)
  assert against_first(other, fedavg)["mean_client_gain_vs_first"] is None
  res = [fedavg, meta]
  for r in res:
    r.update(against_first(r, fedavg))
  table = comparison_table({"strategies": res, "target_accuracy": 0.8})
  head, _, first, second = table.splitlines()[:4]
  assert "personalized acc" in head and "clients better / tied vs fedavg (mean gain)" in head
  assert first.split(" | ")[-4:-1] == ["—", "—", "—"]
  assert second.split(" | ")[-4:-1] == ["0.6500", "0.5000", "50% / 25% (+0.1500)"]
