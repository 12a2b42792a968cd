"""The personalization table of the README, from finished runs' `summary.json` files.

Each method's per-client personalized accuracy is compared with a baseline
run's global model on the same clients (FedAvg's: the `finetune` run, whose
global model is FedAvg's), so methods whose own global model is not meant to
be used (FedPer, FedRep, LG-FedAvg) are measured fairly.

Usage:
  python -m fedjax_pers --config=configs/mnist_dirichlet_personal.py \\
      --workdir=runs/mnist_finetune
  for a in fedper fedrep lg_fedavg ditto apfl pfedme; do
    python -m fedjax_pers --config=configs/mnist_dirichlet_personal.py \\
        --config.algorithm=$a --config.personalization.finetune_steps=0 \\
        --workdir=runs/mnist_$a
  done
  python benchmarks/personalization_table.py --baseline runs/mnist_finetune runs/mnist_*
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--baseline", required=True, help="workdir whose global model is the baseline")
  p.add_argument("runs", nargs="+", help="workdirs of personalized runs")
  args = p.parse_args()
  load = lambda d: json.load(open(os.path.join(d, "summary.json")))
  base = load(args.baseline)
  ref = np.asarray(base["per_client_test_accuracy"])
  print(f"baseline {args.baseline}: global {base['final_test_accuracy']:.4f}, mean client "
        f"{ref.mean():.4f}, worst 10% {base['worst10_client_test_accuracy']:.4f}")
  print("| run | algorithm | personalized acc. | mean client | worst 10% | improved vs "
        "baseline | tied | per-client state | wall |")
  print("|---|---|---|---|---|---|---|---|---|")
  for d in args.runs:
    s = load(d)
    if "per_client_personalized_accuracy" not in s:
      continue
    pers = np.asarray(s["per_client_personalized_accuracy"])
    if pers.shape != ref.shape:
      raise ValueError(f"{d} has {pers.size} clients, the baseline {ref.size}.")
    print(f"| {os.path.basename(d.rstrip('/'))} | {s['config']['algorithm']} | "
          f"{s['personalized_test_accuracy']:.4f} | {pers.mean():.4f} | "
          f"{s['worst10_client_personalized_accuracy']:.4f} | {np.mean(pers > ref):.0%} | "
          f"{np.mean(pers == ref):.0%} | {s['client_state_bytes'] / 1e6:.1f} MB | "
          f"{s['wall_seconds']:.0f} s |")


if __name__ == "__main__":
  main()
