"""Several strategies on the same data, clients and seeds: a table and a plot."""

from __future__ import annotations

import ast
import copy
import os
from typing import Any

import ml_collections
import numpy as np

from fedjax_pers import sweep
from fedjax_pers.experiment import _outputs
from fedjax_pers.experiment._train import train_and_evaluate

LAST_EVALS = 5   # the table also averages the last few evaluations: one is a noisy end


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
  """`'label: key=value, key=value'` into `(label, {key: value})`.

  Values are Python literals where they parse (`0.5`, `True`, `(1, 2)`), else
  strings. Keys are dotted config paths (`aggregation.weighting`).
  """
  label, sep, rest = spec.partition(":")
  label = label.strip()
  if not sep or not label or not all(c.isalnum() or c in "_-." for c in label):
    raise ValueError(
        f"compare.strategies entries must read 'label: key=value, ...' with a label of "
        f"letters, digits, '_', '-' or '.'; got {spec!r}.")
  overrides = {}
  for item in filter(None, (s.strip() for s in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"In compare strategy {label!r}: expected key=value; got {item!r}.")
    try:
      overrides[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value.strip()
  return label, overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `overrides` set (unknown keys raise)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for key, value in overrides.items():
      *path, leaf = key.split(".")
      node = c
      for p in path:
        node = node[p]
      if leaf not in node:
        raise ValueError(f"Unknown config key {key!r} in a compare strategy.")
      node[leaf] = value
  return c


def rounds_to_target(records: list[dict[str, Any]], key: str, target: float) -> int | None:
  """The first evaluated round whose `key` reaches `target` (None if none does)."""
  return next((r["round"] for r in records if r[key] >= target), None)


def compare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every `config.compare.strategies` entry from the same base config.

  Every strategy uses the same data, seeds and hence the same sampled clients
  in every round (cohorts depend only on `config.seed` and the population),
  and is run by `train_and_evaluate` into `workdir/<label>`.

  Writes `comparison.json`, `comparison.md` (final accuracy and its mean over
  the last 5 evaluations, mean, worst-10% and variance over clients, rounds to
  reach `compare.target_accuracy`; with corrupted clients also the clean
  clients' accuracy and the corrupted clients' weight share; with personalization
  the personalized accuracy and its worst 10%; for every strategy after the first,
  the fraction of clients on which it beats the first, see `against_first`) and
  `comparison.png` (accuracy against round; per-client final accuracy
  distribution). A rerun with the same workdir resumes each strategy from its
  checkpoints.

  Returns:
    The comparison dict written to `comparison.json`.
  """
  os.makedirs(workdir, exist_ok=True)
  specs = [parse_strategy(s) for s in config.compare.strategies]
  labels = [label for label, _ in specs]
  if len(set(labels)) != len(labels) or not labels:
    raise ValueError(f"compare.strategies needs distinct labels, at least one; got {labels}.")
  if config.get("sweep") is not None and config.sweep.grid:
    raise ValueError(f"sweep.grid={config.sweep.grid!r} with compare: the strategies "
                     "are the comparison's variants; sweep.seeds reports each over seeds.")
  runs = [(label, overrides, apply_overrides(config, overrides)) for label, overrides in specs]
  target = config.compare.target_accuracy
  results = []
  for label, overrides, c in runs:
    summary = train_and_evaluate(c, os.path.join(workdir, label))
    records = _outputs.read_jsonl(os.path.join(workdir, label, "metrics.jsonl"))
    key = "clean_client_test_accuracy" if "clean_client_test_accuracy" in summary \
        else "test_accuracy"
    results.append({
        "label": label, "overrides": overrides, "accuracy_key": key,
        "final_accuracy": summary["final_test_accuracy"],
        "last_evals_accuracy": float(np.mean([r[key] for r in records[-LAST_EVALS:]])),
        "mean_client_accuracy": summary["mean_client_test_accuracy"],
        "worst10_client_accuracy": summary["worst10_client_test_accuracy"],
        "variance_client_accuracy": summary["variance_client_test_accuracy"],
        "best_accuracy": summary["best_test_accuracy"],
        "clean_client_accuracy": summary.get("clean_client_test_accuracy"),
        "corrupted_weight_share": summary.get("corrupted_weight_share"),
        "corrupted_data_share": summary.get("corrupted_data_share"),
        "rounds_to_target": rounds_to_target(records, key, target),
        "wall_seconds": summary["wall_seconds"],
        "seconds_per_round": summary["seconds_per_round"],
        "curve": [[r["round"], r[key]] for r in records],
        "per_client_accuracy": summary["per_client_test_accuracy"],
        "personalized_accuracy": summary.get("personalized_test_accuracy"),
        "worst10_client_personalized_accuracy": summary.get(
            "worst10_client_personalized_accuracy"),
        "per_client_personalized_accuracy": summary.get("per_client_personalized_accuracy"),
        **{k: summary.get(k) for k in UNSEEN_KEYS},
        "cluster_recovery": summary.get("cluster_recovery"),
        # sweep.seeds > 1: the figures above are means over seeds; these their spread.
        **_spread(summary, os.path.join(workdir, label), key),
    })
  for r in results:
    r.update(against_first(r, results[0]))
    r.update(against_first(r, results[0], prefix="unseen_"))
  out = {"target_accuracy": target, "strategies": results, "config": config.to_dict()}
  _outputs.write_json(os.path.join(workdir, "comparison.json"), out)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(comparison_table(out) + "\n")
  plot_comparison(out, os.path.join(workdir, "comparison.png"))
  return out


def _spread(summary: dict[str, Any], run_dir: str, key: str) -> dict[str, Any]:
  """A sweep over seeds' spread: the standard deviations over seeds of the final and
  mean-client accuracy, and of the table's accuracy (`key`) at the end and over the
  last `LAST_EVALS` evaluations (from each seed's own `metrics.jsonl`)."""
  if "sweep" not in summary:
    return {}
  g = summary["sweep"]["groups"][0]
  last = [np.mean([r[key] for r in _outputs.read_jsonl(
      os.path.join(run_dir, "variants", name, "metrics.jsonl"))[-LAST_EVALS:]])
          for name in g["variants"]]
  final_key = "final_test_accuracy" if key == "test_accuracy" else key
  return {"seeds": len(g["seeds"]), "final_accuracy_std": g["final_test_accuracy"]["std"],
          "final_accuracy_ci95": g["final_test_accuracy"]["ci95"],
          "mean_client_accuracy_std": g["mean_client_test_accuracy"]["std"],
          "key_final_accuracy_std": g[final_key]["std"],
          "last_evals_accuracy_std": sweep.interval(last)["std"]}


# The held-out clients' figures a run reports (`data.holdout_clients`), kept per strategy.
UNSEEN_KEYS = ("unseen_test_accuracy", "unseen_personalized_test_accuracy",
               "unseen_worst10_client_personalized_accuracy", "unseen_per_client_test_accuracy",
               "unseen_per_client_personalized_accuracy")


def _client_accuracy(result: dict[str, Any], prefix: str = "") -> np.ndarray | None:
  """Per-client accuracy of what a strategy deploys: personalized models where it has them
  (`prefix` 'unseen_': on the clients held out of training; None where there are none)."""
  if prefix:
    pers = result.get("unseen_per_client_personalized_accuracy")
    glob = result.get("unseen_per_client_test_accuracy")
  else:
    pers, glob = result.get("per_client_personalized_accuracy"), result["per_client_accuracy"]
  return None if glob is None else np.asarray(glob if pers is None else pers, np.float64)


def against_first(result: dict[str, Any], first: dict[str, Any], prefix: str = ""
                  ) -> dict[str, Any]:
  """Client by client against the first strategy (the baseline, e.g. FedAvg).

  Each side's per-client test accuracy is its personalized models' where it has
  them, else its global model's; the clients are the same in every strategy.
  `prefix='unseen_'` compares on the clients held out of training instead.

  Returns:
    `clients_better_than_first` and `clients_tied_with_first` (fractions of
    clients strictly above / equal to the first strategy) and
    `mean_client_gain_vs_first` (mean accuracy difference), each key with
    `prefix`; all None for the first strategy itself or when the client counts
    differ.
  """
  keys = [prefix + k for k in ("clients_better_than_first", "clients_tied_with_first",
                               "mean_client_gain_vs_first")]
  acc, ref = _client_accuracy(result, prefix), _client_accuracy(first, prefix)
  if result is first or acc is None or ref is None or acc.shape != ref.shape:
    return dict.fromkeys(keys)
  return dict(zip(keys, (float(np.mean(acc > ref)), float(np.mean(acc == ref)),
                         float(np.mean(acc - ref)))))


def comparison_table(out: dict[str, Any]) -> str:
  """The comparison as a Markdown table, with a line saying which accuracy it shows."""
  res = out["strategies"]
  corrupted = any(r["clean_client_accuracy"] is not None for r in res)
  personalized = any(r.get("personalized_accuracy") is not None for r in res)
  versus = len(res) > 1
  head = ["strategy", "final acc", f"last {LAST_EVALS} evals", "mean client", "worst-10%",
          "variance", f"rounds to {out['target_accuracy']:g}"]
  if corrupted:
    head += ["corrupted weight / data share"]
  if personalized:
    head += ["personalized acc", "personalized worst-10%"]
  if versus:
    head += [f"clients better / tied vs {res[0]['label']} (mean gain)"]
  unseen = any(r.get("unseen_test_accuracy") is not None for r in res)
  if unseen:
    head += ["unseen: global acc", "unseen: personalized acc (worst-10%)"]
    head += [f"unseen: better vs {res[0]['label']}"] if versus else []
  clusters = any(r.get("cluster_recovery") is not None for r in res)
  head += ["cluster recovery"] if clusters else []
  head += ["s/round"]
  opt = lambda v: "—" if v is None else f"{v:.4f}"
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  pm = lambda v, std: f"{v:.4f}" if std is None else f"{v:.4f} ± {std:.4f}"
  for r in res:
    cells = [r["label"], pm(r["curve"][-1][1], r.get("key_final_accuracy_std")),
             pm(r["last_evals_accuracy"], r.get("last_evals_accuracy_std")),
             pm(r["mean_client_accuracy"], r.get("mean_client_accuracy_std")),
             f"{r['worst10_client_accuracy']:.4f}",
             f"{r['variance_client_accuracy']:.4f}",
             "—" if r["rounds_to_target"] is None else str(r["rounds_to_target"])]
    if corrupted:
      cells += ["—" if r["corrupted_weight_share"] is None else
                f"{r['corrupted_weight_share']:.3f} / {r['corrupted_data_share']:.3f}"]
    if personalized:
      cells += [opt(r.get("personalized_accuracy")),
                opt(r.get("worst10_client_personalized_accuracy"))]
    if versus:
      better = r.get("clients_better_than_first")
      cells += ["—" if better is None else f"{better:.0%} / {r['clients_tied_with_first']:.0%} "
                f"({r['mean_client_gain_vs_first']:+.4f})"]
    if unseen:
      pers = r.get("unseen_personalized_test_accuracy")
      cells += [opt(r.get("unseen_test_accuracy")), "—" if pers is None else
                f"{pers:.4f} ({r['unseen_worst10_client_personalized_accuracy']:.4f})"]
      better = r.get("unseen_clients_better_than_first")
      cells += (["—" if better is None else f"{better:.0%}"] if versus else [])
    cells += [opt(r.get("cluster_recovery"))] if clusters else []
    cells += [f"{r['seconds_per_round']:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  what = ("test accuracy on the clean clients' test data (example-weighted)" if corrupted
          else "test accuracy (example-weighted over all clients)")
  lines.append(f"\nfinal acc, last {LAST_EVALS} evals and rounds to target: {what}; mean "
               "client, worst-10% and variance: the final per-client test accuracy over all "
               "clients.")
  if any(r.get("seeds") for r in res):
    lines.append(f"over seeds (sweep.seeds = {res[0]['seeds']}): every figure is the mean "
                 "of the seeds' runs; ± the standard deviation over seeds.")
  if personalized:
    lines.append("personalized: the clients' own models (fine-tuned, adapted or personal) "
                 "on their test splits, after the last round.")
  if unseen:
    lines.append("unseen: the clients held out of training (data.holdout_clients), tested "
                 "with the global model and after each method's adaptation of a newcomer.")
  if clusters:
    lines.append("cluster recovery: the share of clients whose cluster (each choosing now) "
                 "is their true group's, under the best map of clusters to groups.")
  if versus:
    lines.append(f"clients better / tied vs {res[0]['label']}: client by client over all "
                 "clients (corrupted ones included), each strategy's personalized accuracy "
                 "where it has one, else its global model's.")
  return "\n".join(lines)


def plot_comparison(out: dict[str, Any], path: str) -> None:
  """Accuracy against round per strategy, and the per-client final accuracy spread."""
  res = out["strategies"]
  fig, (ax1, ax2) = _outputs.figure(1, 2, figsize=(12, 4.5))
  for r in res:
    curve = np.asarray(r["curve"])
    ax1.plot(curve[:, 0], curve[:, 1], label=r["label"])
  ax1.axhline(out["target_accuracy"], color="gray", linestyle=":", linewidth=1)
  key = res[0]["accuracy_key"].replace("_", " ")
  ax1.set_xlabel("round")
  ax1.set_ylabel(key)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  ax2.boxplot([r["per_client_accuracy"] for r in res], showmeans=True)
  ax2.set_xticks(range(1, len(res) + 1), [r["label"] for r in res], rotation=30, ha="right")
  ax2.set_ylabel("final test accuracy per client")
  ax2.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
