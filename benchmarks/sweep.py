"""Eight seeds of one experiment: one sweep against eight runs one after another.

What is measured
----------------
The default config (`python -m fedjax_pers`: FedAvg on Synthetic(1, 1), 30 clients of
45 to 4,645 examples, 10 per round, 20 local epochs of batch 10, 100 rounds,
evaluation every 5 rounds on every client's test and train split, TensorBoard on),
through the public driver `fedjax_pers.experiment.train_and_evaluate`:

  sequential  a Python loop over `config.seed = 0..S-1`, one `train_and_evaluate` each
              (in one process, so imports and data generation are not paid again;
              each run compiles its own round and evaluation, as runs do);
  sweep       one `train_and_evaluate` with `config.sweep.seeds = S` (the driver
              picks how the S variants run, `fedjax_pers.sweep.choose`).

Wall seconds of the whole call (setup, compiles, rounds, evaluations, files and
plots) are measured, arms interleaved (sequential, sweep, sequential, sweep, ...) so
that a slow phase of a shared machine falls on both; the table gives the median
over `--reps` and the ratio. `--steps N` replaces the epochs by N local steps
(every client the same work: uniform instead of skewed client cost).

  python benchmarks/sweep.py [--seeds 8] [--rounds 100] [--reps 2] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from fedjax_pers.distributed import cpu_devices


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  cpu_devices(None)   # as the CLI: one CPU device per core
  import jax

  from fedjax_pers.experiment import train_and_evaluate
  from fedjax_pers.experiment._compare import apply_overrides
  from fedjax_pers.experiment.default_config import get_config

  def config(**kw):
    c = get_config()
    c.num_rounds, c.progress = args.rounds, False
    if args.steps:
      c.client.local_epochs, c.client.local_steps = None, args.steps
    return apply_overrides(c, kw)

  root = tempfile.mkdtemp(prefix="sweep_bench_")
  times = {"sequential": [], "sweep": []}
  info = {}
  for rep in range(args.reps):
    t0 = time.perf_counter()
    finals = []
    for s in range(args.seeds):
      out = train_and_evaluate(config(seed=s), os.path.join(root, f"seq{rep}", str(s)))
      finals.append(out["final_test_accuracy"])
    times["sequential"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = train_and_evaluate(config(**{"sweep.seeds": args.seeds}),
                             os.path.join(root, f"sweep{rep}"))
    times["sweep"].append(time.perf_counter() - t0)
    info = {"chunk": out["chunk"], "sweep_seconds_per_round": out["seconds_per_round"],
            "sweep_compile_and_first_round": out["compile_and_first_round_seconds"],
            "sweep_mean_final_accuracy": out["final_test_accuracy"],
            "sequential_mean_final_accuracy": sum(finals) / len(finals)}
    print(f"rep {rep}: sequential {times['sequential'][-1]:.1f} s, sweep "
          f"{times['sweep'][-1]:.1f} s", flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"\n{args.seeds} seeds of the default config, {args.rounds} rounds"
        f"{'' if not args.steps else f', {args.steps} local steps'}; "
        f"{jax.device_count()} {jax.default_backend()} devices, {os.cpu_count()} cores; "
        f"median of {args.reps} interleaved reps")
  print("| arm | wall seconds (median) | all reps |")
  print("|---|---|---|")
  for k in ("sequential", "sweep"):
    print(f"| {k} | {med[k]:.1f} | {', '.join(f'{t:.1f}' for t in times[k])} |")
  print(f"| ratio sequential / sweep | {med['sequential'] / med['sweep']:.2f}x | |")
  print(f"sweep: chunk {info['chunk']['chunk']} (candidates timed: "
        f"{info['chunk'].get('seconds')}), {info['sweep_seconds_per_round']:.3f} s per round "
        f"of all variants; mean final accuracy sweep {info['sweep_mean_final_accuracy']:.4f}"
        f" = sequential {info['sequential_mean_final_accuracy']:.4f}")
  if args.json:
    print(json.dumps({"times": times, "median": med, **info}))


if __name__ == "__main__":
  main()
