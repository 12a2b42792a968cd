"""Accuracy against bits per client: `configs/mnist_compression.py` with each compressor.

Each row is one run of the public driver (`fp.experiment.train_and_evaluate`) on
real MNIST (`../shared/data`), 100 IID clients, 20 per round, the 784-200-10 MLP
(159,010 parameters), 1 local epoch, 50 rounds: 32-bit floats; stochastic
quantisation to 1, 2, 4 and 8 bits, plain and after a random Hadamard rotation;
top-k at 1% and 10% with error feedback and 1% without. Rows run one after another
in this process; `s/round` is the run's wall time over its rounds (evaluations and
compilation included): compare it between rows of one run only.

Prints a Markdown table (JSON lines with --json) and writes
`OUT/compression_mnist.png`: final accuracy against bits per client.

  python benchmarks/compression_mnist.py --out runs/compression_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import mnist_compression  # noqa: E402
from fedjax_pers import experiment  # noqa: E402

ROWS = ([("none", {"method": None})]
        + [(f"quantize {b} bit{'s' if b > 1 else ''}{', rotated' if rot else ''}",
            {"method": "quantize", "bits": b, "rotate": rot})
           for b in (1, 2, 4, 8) for rot in (False, True)]
        + [("top-k 1%, error feedback", {"method": "top_k", "fraction": 0.01}),
           ("top-k 10%, error feedback", {"method": "top_k", "fraction": 0.1}),
           ("top-k 1%, no error feedback", {"method": "top_k", "fraction": 0.01,
                                            "error_feedback": False})])


def run(out: str, name: str, keys: dict, rounds: int) -> dict:
  c = mnist_compression.get_config()
  c.num_rounds, c.progress = rounds, False
  for k, v in keys.items():
    c.compression[k] = v
  workdir = os.path.join(out, name.replace(" ", "_").replace(",", "").replace("%", "pct"))
  s = experiment.train_and_evaluate(c, workdir)
  return {"name": name, "bits_per_client": s.get("bits_per_client", 32 * 159_010),
          "final_test_accuracy": s["final_test_accuracy"],
          "final_test_loss": s["final_test_loss"], "rounds": rounds,
          "s_per_round": s["wall_seconds"] / rounds}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/compression_mnist")
  p.add_argument("--rounds", type=int, default=50)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  rows = [run(args.out, name, keys, args.rounds) for name, keys in ROWS]
  full = rows[0]["bits_per_client"]
  print(f"\nconfigs/mnist_compression.py, {args.rounds} rounds\n")
  print("| compressor | bits per client per round | × fewer than float32 | test accuracy "
        "| test loss | s/round |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['bits_per_client']:,} | {full / r['bits_per_client']:.1f} | "
          f"{r['final_test_accuracy']:.4f} | {r['final_test_loss']:.4f} | "
          f"{r['s_per_round']:.3f} |")
  if args.json:
    for r in rows:
      print(json.dumps(r))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for family, marker in (("none", "s"), ("quantize", "o"), ("top-k", "^")):
    pts = [r for r in rows if r["name"].startswith(family)]
    for rot in (False, True):
      sel = [r for r in pts if ("rotated" in r["name"]) == rot]
      if sel:
        ax.plot([r["bits_per_client"] for r in sel], [r["final_test_accuracy"] for r in sel],
                marker=marker, ls="-" if family == "quantize" else "none",
                label=family + (", rotated" if rot else ""))
  ax.set_xscale("log")
  ax.set_xlabel("bits per client per round")
  ax.set_ylabel(f"test accuracy after {args.rounds} rounds")
  ax.set_title("Compressed updates on MNIST (100 clients, 20 per round)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "compression_mnist.png"), dpi=120)
  print(f"wrote {os.path.join(args.out, 'compression_mnist.png')}")


if __name__ == "__main__":
  main()
