"""The automated weighting in a run: the learned mixture in the outputs, the proxy
set's default (kept apart from `test_auto_weighting.py`, the aggregation package's
unit tests, so that its mutation pass does not train a whole run per mutant)."""

import json

import matplotlib
import pytest
from test_experiment import tiny_config

from fedjax_pers import aggregation as agg
from fedjax_pers.experiment import prepare_data, train_and_evaluate


@pytest.mark.run
def test_run_reports_the_mixture_per_round(tmp_path):
  c = tiny_config()
  c.aggregation.weighting = "auto"
  c.data.proxy_examples = 20
  c.eval_train = False
  before = matplotlib.get_backend()
  matplotlib.use("svg")   # the caller's backend (a notebook's inline one) survives the plots
  try:
    summary = train_and_evaluate(c, str(tmp_path))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  rows = [json.loads(line) for line in (tmp_path / "round_weights.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert set(r["mixture"]) == set(agg.FAMILIES) and abs(sum(r["mixture"].values()) - 1) < 1e-5
    assert set(r["temperatures"]) == {"loss", "label_divergence", "cosine"}
  assert rows[0]["mixture"] != rows[-1]["mixture"]   # it learns
  assert summary["final_mixture"] == rows[-1]["mixture"]
  assert (tmp_path / "mixture.png").stat().st_size > 1000
  c.data.proxy_examples = 0
  with pytest.raises(ValueError, match="'auto' needs a server proxy set"):
    train_and_evaluate(c, str(tmp_path / "none"))


def test_proxy_set_defaults_to_100_examples_for_the_learned_weightings():
  c = tiny_config()
  assert c.data.proxy_examples is None
  before = prepare_data(c).test.num_examples.sum()
  for name in ("auto", "fedlaw", "loss*fedlaw"):
    c.aggregation.weighting = name
    got = prepare_data(c)
    assert len(got.proxy[1]) == 100 and got.test.num_examples.sum() == before - 100
  c.aggregation.weighting = "loss"
  assert prepare_data(c).proxy is None
  c.data.proxy_examples = -1
  with pytest.raises(ValueError, match="data.proxy_examples must be an int >= 0 or None; got -1"):
    prepare_data(c)
