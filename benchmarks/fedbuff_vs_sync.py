"""FedBuff against synchronous FedAvg in simulated time, under the same client latencies.

Both run `configs/mnist_dirichlet.py` (real MNIST, 100 clients, Dirichlet(0.1), the MLP,
5 local epochs) through the public driver for the same number of client updates: FedAvg
100 rounds of 10 clients, FedBuff 100 server steps of K = 10 reports with M = 20 clients
in flight (staleness weights (1 + s)^(-1/2)). Each client's duration is
exp(σ · N(0, 1)), σ = `--spread`, drawn once per client exactly as FedBuff draws it; a
synchronous round lasts as long as its slowest client, so FedAvg's clock is the running
sum of each round's slowest duration (its cohorts from `round_weights.jsonl`), FedBuff's
is its own `simulated_time`. Prints a Markdown table (accuracy, simulated time to
`--target`) and writes `OUT/fedbuff_vs_sync.png` (accuracy against simulated time).

  python benchmarks/fedbuff_vs_sync.py --out runs/fedbuff_vs_sync
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import mnist_dirichlet  # noqa: E402
from fedjax_pers import experiment  # noqa: E402
from fedjax_pers.experiment import _outputs  # noqa: E402


def durations(seed: int, n: int, spread: float) -> np.ndarray:
  """The clients' durations as `algorithms.fedbuff` draws them from the run's key."""
  k_lat, _ = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0xFB))
  return np.exp(spread * np.asarray(jax.random.normal(k_lat, (n,))))


def run(out: str, algorithm: str, spread: float, target: float) -> dict:
  c = mnist_dirichlet.get_config()
  c.algorithm, c.progress, c.eval_every = algorithm, False, 5
  c.aggregation.weighting = "uniform"
  c.fedbuff.buffer_size, c.fedbuff.concurrency = 10, 20
  c.fedbuff.latency_spread = spread
  workdir = os.path.join(out, algorithm)
  s = experiment.train_and_evaluate(c, workdir)
  recs = _outputs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if algorithm == "fedbuff":
    times = {r["round"]: r["simulated_time"] for r in recs}
  else:
    d = durations(c.seed, c.data.num_clients, spread)
    rows = _outputs.read_jsonl(os.path.join(workdir, "round_weights.jsonl"))
    clock = np.cumsum([d[np.asarray(r["clients"])].max() for r in rows])
    times = {0: 0.0, **{r["round"]: float(t) for r, t in zip(rows, clock)}}
  curve = [(times[r["round"]], r["test_accuracy"]) for r in recs]
  hit = next((t for t, a in curve if a >= target), None)
  return {"algorithm": algorithm, "final_test_accuracy": s["final_test_accuracy"],
          "simulated_time": curve[-1][0], "time_to_target": hit,
          "rounds_to_target": next((r["round"] for r in recs if r["test_accuracy"] >= target),
                                   None), "curve": curve}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/fedbuff_vs_sync")
  p.add_argument("--spread", type=float, default=1.0)
  p.add_argument("--target", type=float, default=0.85)
  args = p.parse_args()
  rows = [run(args.out, a, args.spread, args.target) for a in ("fedavg", "fedbuff")]
  print(f"\nconfigs/mnist_dirichlet.py, 1,000 client updates, latency spread σ = "
        f"{args.spread}\n")
  print(f"| server | final test accuracy | simulated time | time to {args.target:g} "
        f"| rounds / server steps to {args.target:g} |")
  print("|---|---|---|---|---|")
  for r in rows:
    name = ("FedAvg, synchronous (10 a round)" if r["algorithm"] == "fedavg"
            else "FedBuff (K = 10, M = 20)")
    hit = "—" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}"
    print(f"| {name} | {r['final_test_accuracy']:.4f} | {r['simulated_time']:.1f} | {hit} | "
          f"{r['rounds_to_target']} |")
  print(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in rows]))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    t, a = zip(*r["curve"])
    ax.plot(t, a, marker="o", ms=3, label=r["algorithm"])
  ax.set_xlabel("simulated time (median client duration = 1)")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"FedBuff vs synchronous FedAvg, latency spread σ = {args.spread:g}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "fedbuff_vs_sync.png"), dpi=120)
  print(f"wrote {os.path.join(args.out, 'fedbuff_vs_sync.png')}")


if __name__ == "__main__":
  main()
