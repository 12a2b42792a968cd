"""Accuracy against privacy: `configs/mnist_dp.py` at several target ε, and without DP.

Each row is one run of the public driver (`fp.experiment.train_and_evaluate`)
on real MNIST (`../shared/data`), 100 IID clients, 20 per round, logistic
regression, client-level DP-FedAvg with C = 1 and z calibrated before the run
so that ε after `--rounds` rounds is the target at δ = 1e-3 (RDP, fixed-size
sampling), with fixed clipping and with adaptive clipping (Andrew et al. 2021:
`privacy.target_quantile=0.5`, C starting at 0.1, η_C = 0.2, σ_b = max(20 / 20, z)
inside the same z). The last row turns DP off (`privacy.clip_norm=None`): the
same rounds, weights 1 / 20, no clipping and no noise. Rows run one after another
in this process; `s/round` is the run's wall time over its rounds (evaluations
and compilation included), so compare it between rows of one run only.

Prints a Markdown table (and JSON lines with --json) and writes
`OUT/dp_mnist.png`: test accuracy against round, one line per ε.

  python benchmarks/dp_mnist.py --out runs/dp_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import mnist_dp  # noqa: E402
from fedjax_pers import experiment  # noqa: E402
from fedjax_pers.experiment import _outputs  # noqa: E402


def run(out: str, target: float | None, rounds: int, adaptive: bool = False) -> dict:
  c = mnist_dp.get_config()
  c.num_rounds, c.progress = rounds, False
  if target is None:
    c.privacy.clip_norm = c.privacy.target_epsilon = None
  else:
    c.privacy.target_epsilon = target
  if adaptive:
    c.privacy.target_quantile, c.privacy.clip_norm = 0.5, 0.1
  workdir = os.path.join(out, "no_dp" if target is None else
                         f"eps{target:g}{'_adaptive' if adaptive else ''}")
  s = experiment.train_and_evaluate(c, workdir)
  records = _outputs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {"target_epsilon": target, "adaptive": adaptive, "dp_epsilon": s.get("dp_epsilon"),
          "final_clip_norm": s.get("dp_clip_norm"),
          "dp_noise_multiplier": s.get("dp_noise_multiplier"),
          "noise_std_over_mean": (s["dp_noise_multiplier"] * c.privacy.clip_norm
                                  / c.clients_per_round)
          if target is not None and not adaptive else None,
          "final_test_accuracy": s["final_test_accuracy"],
          "final_test_loss": s["final_test_loss"], "rounds": rounds,
          "s_per_round": s["wall_seconds"] / rounds,
          "curve": [(r["round"], r["test_accuracy"]) for r in records]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/dp_mnist")
  p.add_argument("--rounds", type=int, default=50)
  p.add_argument("--epsilons", default="1,2,4,8")
  p.add_argument("--json", action="store_true")
  p.add_argument("--fixed_only", action="store_true", help="no adaptive-clipping rows")
  args = p.parse_args()
  targets = [float(e) for e in args.epsilons.split(",")] + [None]
  rows = []
  for t in targets:   # fixed and adaptive clipping side by side at each ε
    rows.append(run(args.out, t, args.rounds))
    if t is not None and not args.fixed_only:
      rows.append(run(args.out, t, args.rounds, adaptive=True))
  print(f"\nconfigs/mnist_dp.py, {args.rounds} rounds, δ = 1e-3\n")
  print("| target ε | clipping | ε reported | z | final C | noise std in the mean, zC/W "
        "| test accuracy | test loss | s/round |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    dp = r["target_epsilon"] is not None
    clip = ("adaptive, γ = 0.5" if r["adaptive"] else "fixed, C = 1") if dp else "–"
    std = "–" if r["noise_std_over_mean"] is None else f"{r['noise_std_over_mean']:.3f}"
    print(f"| {r['target_epsilon']:g} | {clip} | {r['dp_epsilon']:.3f} | "
          f"{r['dp_noise_multiplier']:.3f} | {r['final_clip_norm']:.3f} | {std} | "
          if dp else "| no DP | – | – | – | – | – | ", end="")
    print(f"{r['final_test_accuracy']:.4f} | {r['final_test_loss']:.4f} | "
          f"{r['s_per_round']:.3f} |")
  if args.json:
    for r in rows:
      print(json.dumps(r))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    rounds, acc = zip(*r["curve"])
    label = ("no DP" if r["target_epsilon"] is None else
             f"ε = {r['target_epsilon']:g}{', adaptive C' if r['adaptive'] else ''}")
    ax.plot(rounds, acc, marker="o", ms=3, label=label, ls="--" if r["adaptive"] else "-")
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.set_title("DP-FedAvg on MNIST (100 clients, 20 per round, δ = 1e-3)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "dp_mnist.png"), dpi=120)
  print(f"wrote {os.path.join(args.out, 'dp_mnist.png')}")


if __name__ == "__main__":
  main()
