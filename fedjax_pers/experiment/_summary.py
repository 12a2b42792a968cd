"""What a finished run reports: `summary.json` and its plots (a sweep: each variant's)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from fedjax_pers.experiment import _algorithms, _outputs, _personalized
from fedjax_pers.experiment._weighting import weighting_name


def _corruption_summary(final, weight_rows, corrupted, train) -> dict[str, Any]:
  """Clean-client accuracy and the corrupted clients' mean share of weight and of data."""
  n = np.asarray(train.num_examples, np.float64)
  w_share, n_share = [], []
  for row in weight_rows:
    ids = np.asarray(row["clients"])
    bad = corrupted[ids]
    w_share.append(float(np.sum(np.asarray(row["weights"])[bad])))
    n_share.append(float(np.sum(n[ids][bad]) / np.sum(n[ids])))
  return {
      "corrupted_clients": np.flatnonzero(corrupted).tolist(),
      "clean_client_test_accuracy": final["clean_client_test_accuracy"],
      "mean_clean_client_test_accuracy": final["mean_clean_client_test_accuracy"],
      "corrupted_weight_share": float(np.mean(w_share)) if w_share else 0.0,
      "corrupted_data_share": float(np.mean(n_share)) if n_share else 0.0,
  }


def _execution_summary(config, alg, params, train, steps) -> dict[str, Any]:
  """How the rounds ran: the plan `auto` resolved to, the devices, and the client-steps
  the compiled rounds executed against the real ones."""
  plan = alg.plan(params, train) if alg.plan is not None else None
  real, executed = (int(v) for v in steps)
  return {
      "strategy": None if plan is None else plan.strategy,
      "lanes": None if plan is None or plan.strategy != "lanes" else plan.lanes,
      "differentiable": None if plan is None else plan.differentiable,
      "num_devices": _algorithms.make_execution(
          config, _algorithms.cohort_size(config, train.num_clients)).num_devices,
      "devices_visible": jax.device_count(),
      "num_processes": jax.process_count(),
      "real_steps": real,
      "executed_steps": executed,
      "executed_per_real_step": round(executed / real, 4) if real else None,
  }


def run_summary(config, files, lists, state, timing, steps, alg, train, population,
                 prepared, dp, comm, corrupted, primary, resumed_finished, plots=True):
  """One run's `summary.json` and plots (a sweep: one variant's)."""
  records, weight_rows, workdir = files.records, files.weight_rows, files.workdir
  final = records[-1]
  summary = {
      "final_test_accuracy": final["test_accuracy"],
      "mean_client_test_accuracy": final["mean_client_test_accuracy"],
      "worst10_client_test_accuracy": final["worst10_client_test_accuracy"],
      "variance_client_test_accuracy": final["variance_client_test_accuracy"],
      **lists,
      "final_test_loss": final["test_loss"],
      "final_train_loss": final.get("train_loss"),
      "best_test_accuracy": max(r["test_accuracy"] for r in records),
      "best_test_accuracy_note": "max over evaluated rounds (as papers of the field report)",
      "rounds": int(state.round),
      **timing,
      "execution": _execution_summary(config, alg, state.params, train, steps),
      **population.info,
      "client_state_bytes": int(sum(leaf.nbytes for leaf in
                                    jax.tree.leaves(state.client_states))),
      "client_state_host_bytes": population.host_state_bytes,
      "backend": jax.default_backend(),
      "config": config.to_dict(),
  }
  if "personalized_test_accuracy" in final:
    summary.update({k: final[k] for k in final if "personalized" in k or k in (
        "fraction_clients_improved", "mean_client_gain")})
    summary["best_personalized_test_accuracy"] = max(
        r["personalized_test_accuracy"] for r in records)
    summary["best_personalized_test_accuracy_note"] = (
        "max over evaluated rounds of the fine-tuned models' accuracy (as papers report)")
  if "cluster_recovery" in final:
    summary["cluster_recovery"] = final["cluster_recovery"]
  if prepared is not None and prepared.unseen is not None:
    summary.update({k: v for k, v in final.items() if k.startswith(_personalized.PREFIX)})
    summary["unseen_clients"] = prepared.unseen_ids.tolist()
  if dp is not None:
    summary.update({k: v for k, v in final.items() if k.startswith("dp_")})
    if dp.sampling == "poisson":
      sizes = [row["cohort_size"] for row in weight_rows if "cohort_size" in row]
      summary["dp_cohort_sizes"] = {"mean": float(np.mean(sizes)), "min": int(min(sizes)),
                                    "max": int(max(sizes))} if sizes else None
  if comm is not None:
    summary.update(comm.report())
  if corrupted.any():
    summary.update(_corruption_summary(final, weight_rows, corrupted, train))
  if weight_rows and "mixture" in weight_rows[-1]:   # the automated weighting's last mixture
    summary["final_mixture"] = weight_rows[-1]["mixture"]
    summary["final_temperatures"] = weight_rows[-1]["temperatures"]
  summary_path = os.path.join(workdir, "summary.json")
  if resumed_finished and os.path.exists(summary_path):   # resumed a finished run
    with open(summary_path) as f:
      before = json.load(f)
    for key in ("compile_and_first_round_seconds", "seconds_per_round"):
      summary[key] = before.get(key, summary[key])
  if not primary:
    return summary
  _outputs.write_json(summary_path, summary)
  if not plots:
    return summary
  _outputs.plot_weights(weight_rows, train.num_clients, os.path.join(workdir, "weights.png"),
                        marked=corrupted, title=f"aggregation weights: "
                        f"{weighting_name(config)}")
  if "final_mixture" in summary:
    _outputs.plot_mixture(weight_rows, os.path.join(workdir, "mixture.png"))
  if weight_rows and "clusters" in weight_rows[-1]:
    _outputs.plot_clusters(weight_rows, train.num_clients, config.ifca.num_clusters,
                           os.path.join(workdir, "clusters.png"),
                           title=f"IFCA, k = {config.ifca.num_clusters}: cluster by client")
  _outputs.plot_curves(records, os.path.join(workdir, "curves.png"),
                       title=f"{config.algorithm} on {config.data.name}",
                       gains=summary.get("per_client_gain"))
  return summary
