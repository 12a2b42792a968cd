"""Vectorised sweeps: every variant is the run made alone, to float tolerance."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers import sweep
from fedjax_pers.experiment import train_and_evaluate
from fedjax_pers.experiment._sweep import config_of, variants


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_interval_by_hand():
  s = sweep.interval([1.0, 2.0, 3.0, 4.0])
  std = np.sqrt(((1.5**2 + 0.5**2) * 2) / 3)          # 1.2910
  assert s["n"] == 4 and s["mean"] == 2.5
  assert s["std"] == pytest.approx(std, rel=1e-12)
  assert s["ci95"] == pytest.approx(3.182446305284263 * std / 2, rel=1e-9)   # t(0.975, 3)
  assert sweep.interval([0.7]) == {"mean": 0.7, "std": None, "ci95": None, "n": 1}
  assert np.isnan(sweep.interval([1.0, float("nan")])["mean"])   # kept, not dropped
  with pytest.raises(ValueError, match="at least one value"):
    sweep.interval([])


def test_variants_cross_values_then_seeds_and_refuse_bad_keys():
  c = tiny_config()
  assert variants(c) is None
  c.seed, c.sweep.seeds = 5, 2
  c.sweep.grid = "client.learning_rate=0.1,0.2; fedprox.mu=0.0,1.0"
  vs = variants(c)
  assert [v.name for v in vs[:3]] == [
      "client.learning_rate=0.1,fedprox.mu=0,seed=5",
      "client.learning_rate=0.1,fedprox.mu=0,seed=6",
      "client.learning_rate=0.1,fedprox.mu=1,seed=5"]
  assert len(vs) == 8 and {v.seed for v in vs} == {5, 6}
  alone = config_of(c, vs[3])
  assert (alone.seed, alone.client.learning_rate, alone.fedprox.mu) == (6, 0.1, 1.0)
  assert alone.sweep.seeds == 1 and alone.sweep.grid == ""
  for spec, match in (("client.batch_size=5,10", "must be a float key"),
                      ("data.alpha=0.5,1", "cannot be swept in one program"),
                      ("client.learnin_rate=0.1", "unknown config key"),
                      ("client.learning_rate=0.1,x", "needs numbers"),
                      ("client.learning_rate", "expected 'key=v1,v2"),
                      ("aggregation.q=1;aggregation.q=2", "given twice")):
    c.sweep.grid = spec
    with pytest.raises(ValueError, match=match):
      variants(c)
  c.sweep.grid, c.sweep.seeds = "", 0
  with pytest.raises(ValueError, match="sweep.seeds must be a positive int; got 0"):
    variants(c)


def _params(workdir):
  import orbax.checkpoint as ocp
  root = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(root, str(step), "default"))
  return [np.asarray(a) for a in jax.tree.leaves(tree["params"])]


@pytest.mark.run
def test_each_seed_of_a_sweep_is_the_run_made_alone(tmp_path):
  """All variants at once (chunk None), one at a time (1) and in chunks of 2 (the last
  one short), each against the same runs made alone."""
  alone, finals = {}, []
  for seed in (0, 1, 2):
    a = tiny_config()
    a.num_rounds, a.eval_every, a.tensorboard, a.seed = 3, 1, False, seed
    alone[seed] = train_and_evaluate(a, str(tmp_path / f"alone{seed}"))
    finals.append(alone[seed]["final_test_accuracy"])
  for chunk in (None, 1, 2):
    c = tiny_config()
    c.num_rounds, c.eval_every, c.tensorboard = 3, 1, False
    c.sweep.seeds, c.sweep.chunk = 3, chunk
    root = tmp_path / f"sweep{chunk}"
    out = train_and_evaluate(c, str(root))
    group = out["sweep"]["groups"][0]
    assert group["seeds"] == [0, 1, 2] and out["sweep"]["num_variants"] == 3
    for seed in (0, 1, 2):
      got = read(root / "variants" / f"seed={seed}" / "metrics.jsonl")
      want = read(tmp_path / f"alone{seed}" / "metrics.jsonl")
      assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2, 3]
      for key in ("test_loss", "test_accuracy", "train_loss", "local_train_loss"):
        np.testing.assert_allclose([r.get(key, 0) for r in got], [r.get(key, 0) for r in want],
                                   atol=1e-6, rtol=1e-6, err_msg=f"{key} chunk={chunk}")
      assert read(root / "variants" / f"seed={seed}" / "round_weights.jsonl") \
          == read(tmp_path / f"alone{seed}" / "round_weights.jsonl")   # same cohorts, weights
      mine = json.loads((root / "variants" / f"seed={seed}" / "summary.json").read_text())
      assert mine["execution"]["real_steps"] == alone[seed]["execution"]["real_steps"]
    # The across-seed figures are those of the runs made alone.
    assert group["final_test_accuracy"]["mean"] == pytest.approx(np.mean(finals), abs=1e-6)
    assert group["final_test_accuracy"]["std"] == pytest.approx(np.std(finals, ddof=1),
                                                                abs=1e-6)
    assert out["final_test_accuracy"] == group["final_test_accuracy"]["mean"]
    mean_curve = read(root / "metrics.jsonl")
    assert mean_curve[-1]["test_accuracy"] == pytest.approx(np.mean(finals), abs=1e-6)
    assert os.path.exists(root / "curves.png")


@pytest.mark.run
def test_swept_values_and_a_single_variant_equal_the_runs_made_alone(tmp_path):
  c = tiny_config()
  c.algorithm, c.num_rounds, c.eval_every, c.tensorboard = "fedprox", 2, 2, False
  c.sweep.grid = "client.learning_rate=0.02,0.2; fedprox.mu=0.0,0.5"
  out = train_and_evaluate(c, str(tmp_path / "sweep"))
  assert len(out["sweep"]["groups"]) == 4 and "final_test_accuracy" not in out
  for v in variants(c)[1:3]:
    alone = config_of(c, v)
    s = train_and_evaluate(alone, str(tmp_path / v.name))
    got = json.loads((tmp_path / "sweep" / "variants" / v.name / "summary.json").read_text())
    assert got["final_test_loss"] == pytest.approx(s["final_test_loss"], abs=1e-6)
  stacked = _params(str(tmp_path / "sweep"))   # the sweep's checkpoint: every variant's
  for i, v in list(enumerate(variants(c)))[1:3]:
    for a, b in zip(stacked, _params(str(tmp_path / v.name))):
      np.testing.assert_allclose(a[i], b, atol=1e-6)
  # S = 1: one swept value is the plain run with that value.
  one = tiny_config()
  one.num_rounds, one.tensorboard = 2, False
  one.sweep.grid = "client.learning_rate=0.05"
  s1 = train_and_evaluate(one, str(tmp_path / "s1"))
  assert s1["sweep"]["num_variants"] == 1
  plain = tiny_config()
  plain.num_rounds, plain.tensorboard, plain.client.learning_rate = 2, False, 0.05
  p = train_and_evaluate(plain, str(tmp_path / "plain"))
  got = json.loads((tmp_path / "s1" / "variants" / "client.learning_rate=0.05,seed=0"
                    / "summary.json").read_text())
  assert got["final_test_loss"] == pytest.approx(p["final_test_loss"], abs=1e-6)
  for a, b in zip(_params(str(tmp_path / "s1")), _params(str(tmp_path / "plain"))):
    np.testing.assert_allclose(a[0], b, atol=1e-6)


def test_sweep_refusals(tmp_path):
  c = tiny_config()
  c.sweep.grid = "fedprox.mu=0.1,1.0"    # FedAvg never reads it
  with pytest.raises(ValueError, match="does not read 'fedprox.mu'"):
    train_and_evaluate(c, str(tmp_path / "a"))
  c = tiny_config()
  c.sweep.seeds, c.privacy.clip_norm, c.privacy.noise_multiplier = 2, 1.0, 0.5
  c.aggregation.weighting = "uniform"
  with pytest.raises(ValueError, match="without privacy"):
    train_and_evaluate(c, str(tmp_path / "b"))
  c = tiny_config()
  c.sweep.seeds, c.sweep.chunk = 2, 0
  with pytest.raises(ValueError, match="sweep.chunk must be a positive int or None; got 0"):
    train_and_evaluate(c, str(tmp_path / "c"))


@pytest.mark.run
def test_library_sweep_paths_agree_and_variants_do_not_interact():
  """`rounds` (vmap; lax.map chunks) and `dispatched` give one variant's plain round."""
  train, _ = fp.data.synthetic(1.0, 1.0, num_clients=6, sample_scale=1, seed=0)
  model = fp.models.logistic_regression((60,), 10)
  work = fp.LocalWork(batch_size=10, epochs=1)
  build = lambda lr: fp.algorithms.fedavg(model, optax.sgd(lr), optax.sgd(1.0), work,
                                          clients_per_round=3)
  lrs = jnp.array([0.01, 0.05, 0.2])
  states = sweep.stack([build(0.01).init(jax.random.key(s), train) for s in range(3)])
  round_of = lambda lr, state, data: build(lr).round(state, data)
  outs = [jax.jit(sweep.rounds(round_of, lrs))(states, train),
          jax.jit(sweep.rounds(round_of, lrs, chunk=2))(states, train),
          sweep.dispatched(round_of, lrs, 3, 2)(states, train)]
  for s in range(3):
    alone, m = jax.jit(build(float(lrs[s])).round)(sweep.take(states, s), train)
    for new, metrics in outs:
      for a, b in zip(jax.tree.leaves(sweep.take(new.params, s)), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
      np.testing.assert_array_equal(metrics.clients[s], m.clients)
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    sweep.dispatched(round_of, lrs, 3, 0)
  # A budget the program does not fit: chunked (and said so), the same numbers.
  need = sweep.choose(round_of, lrs, states, train)[2]["all_at_once_bytes"]
  chunk, step, report = sweep.choose(round_of, lrs, states, train, budget=need // 2)
  assert chunk == 1 and report["fits_at_once"] is False and report["chunk"] == 1
  new, _ = step(states, train)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(outs[0][0].params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.run
def test_compare_reports_each_strategy_over_seeds(tmp_path):
  from fedjax_pers.experiment import compare, comparison_table
  c = tiny_config()
  c.num_rounds, c.tensorboard, c.sweep.seeds = 2, False, 3
  c.compare = ml_collections.ConfigDict()
  c.compare.strategies = ("fedavg: algorithm=fedavg", "fedprox: algorithm=fedprox")
  c.compare.target_accuracy = 0.5
  out = compare(c, str(tmp_path))
  for r in out["strategies"]:
    runs = [json.loads((tmp_path / r["label"] / "variants" / f"seed={s}" / "summary.json")
                       .read_text())["final_test_accuracy"] for s in range(3)]
    assert r["seeds"] == 3
    assert r["final_accuracy"] == pytest.approx(np.mean(runs), abs=1e-9)
    assert r["final_accuracy_std"] == pytest.approx(np.std(runs, ddof=1), abs=1e-9)
    last = [np.mean([json.loads(line)["test_accuracy"] for line in (
        tmp_path / r["label"] / "variants" / f"seed={s}" / "metrics.jsonl"
    ).read_text().splitlines()][-5:]) for s in range(3)]
    assert r["last_evals_accuracy"] == pytest.approx(np.mean(last), abs=1e-9)
    assert r["last_evals_accuracy_std"] == pytest.approx(np.std(last, ddof=1), abs=1e-9)
    assert r["key_final_accuracy_std"] == r["final_accuracy_std"]
  table = comparison_table(out)
  r = out["strategies"][1]
  assert f"{r['final_accuracy']:.4f} ± {r['final_accuracy_std']:.4f}" in table
  assert f"{r['last_evals_accuracy']:.4f} ± {r['last_evals_accuracy_std']:.4f}" in table
  assert "over seeds" in table
  # Corrupted clients: the table's accuracy is the clean clients', and so is its spread.
  c.corruption.label_shuffle_fraction = 0.25
  c.compare.strategies = ("fedavg: algorithm=fedavg",)
  r = compare(c, str(tmp_path / "noisy"))["strategies"][0]
  runs = [json.loads((tmp_path / "noisy" / "fedavg" / "variants" / f"seed={s}" / "summary.json")
                     .read_text())["clean_client_test_accuracy"] for s in range(3)]
  assert r["accuracy_key"] == "clean_client_test_accuracy"
  assert r["key_final_accuracy_std"] == pytest.approx(np.std(runs, ddof=1), abs=1e-9)
  assert r["key_final_accuracy_std"] != r["final_accuracy_std"]
  c.corruption.label_shuffle_fraction = 0.0
  c.sweep.grid = "client.learning_rate=0.1,0.2"
  with pytest.raises(ValueError, match="with compare: the strategies"):
    compare(c, str(tmp_path / "values"))


@pytest.mark.run
def test_a_sweep_resumes_from_its_checkpoint(tmp_path):
  def run(rounds, workdir):
    c = tiny_config()
    c.num_rounds, c.eval_every, c.tensorboard, c.sweep.seeds, c.sweep.chunk = rounds, 1, False, 2, 2
    return train_and_evaluate(c, str(workdir))
  run(2, tmp_path / "a")
  resumed = run(3, tmp_path / "a")       # rounds 1-2 from the checkpoint, then round 3
  straight = run(3, tmp_path / "b")
  assert resumed["final_test_loss"] == pytest.approx(straight["final_test_loss"], abs=1e-7)
  for seed in (0, 1):
    got, want = (read(tmp_path / d / "variants" / f"seed={seed}" / "metrics.jsonl")
                 for d in ("a", "b"))
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    np.testing.assert_allclose([r["test_loss"] for r in got], [r["test_loss"] for r in want],
                               atol=1e-7)
