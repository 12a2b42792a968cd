"""What a Per-FedAvg round costs against a FedAvg round with the same local steps.

What is measured
----------------
Workloads w1 and w2 of `round_throughput.py` (100 clients x 200 examples, all
100 clients every round; w1: logistic regression, batch 20 x 20 local steps;
w2: MLP 784-200-200-10, batch 20 x 10 local steps), one CPU device, cohort
strategy `auto`. Every row is `jax.jit(alg.round)`; its first call (compile +
one round) is excluded, then `--rounds` rounds are timed interleaved across
rows and the median is reported.

Rows (τ = the workload's local steps in every row):
* `fedavg`: τ SGD steps, one batch each.
* `per_fedavg`: Per-FedAvg's second-order meta-step (one inner step; batches
  D, D′, D″), the Hessian term by automatic differentiation.
* `per_fedavg_hf`: the Hessian-free variant, finite-difference HVP (the paper's).
* `per_fedavg_hf_exact`: Hessian-free with the exact HVP (`jax.jvp`).
* `per_fedavg_fo`: first order (D, D′ only).
* `maml_k5` / `maml_k5_remat`: second order with K = 5 inner steps, without
  and with `jax.checkpoint` of the inner steps (the memory rows).

Columns: `round s` (median), `vs fedavg` (ratio of medians, same run),
`grads/step` (batch gradients a local step evaluates, counting a
Hessian-vector product as two), `vs fedavg per grad` (the ratio divided by
grads/step: the cost of each gradient relative to FedAvg's),
`peak MiB`: XLA's temporary-buffer high-water mark of the compiled round
(`compiled.memory_analysis().temp_size_in_bytes`, arguments and outputs not
included), which is what the K activations per client of a second-order
gradient add to.

Usage:
  python benchmarks/meta_round.py [--workload w1|w2] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import optax  # noqa: E402
from round_throughput import (  # noqa: E402
    WORKLOADS,
    Runner,
    Workload,
    log,
    make_client_arrays,
    make_model,
    time_interleaved,
)

from fedjax_pers.algorithms import fedavg, per_fedavg  # noqa: E402
from fedjax_pers.core import FederatedData  # noqa: E402

# (row, variant or None for FedAvg, hvp, inner steps K, remat, gradients per local step)
ROWS = (
    ("fedavg", None, None, 1, False, 1),
    ("per_fedavg", "second_order", "exact", 1, False, 5),
    ("per_fedavg_hf", "hessian_free", "finite_difference", 1, False, 4),
    ("per_fedavg_hf_exact", "hessian_free", "exact", 1, False, 4),
    ("per_fedavg_fo", "first_order", "exact", 1, False, 2),
    ("maml_k5", "second_order", "exact", 5, False, 16),
    ("maml_k5_remat", "second_order", "exact", 5, True, 16),
)


def build(w: Workload, model, row):
  _, variant, hvp, k, remat, _ = row
  if variant is None:
    return fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                  clients_per_round=w.num_clients)
  return per_fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                    inner_lr=w.client_lr, clients_per_round=w.num_clients, variant=variant,
                    hvp=hvp, inner_steps=k, remat=remat)


def peak_mib(round_fn, state, data) -> float:
  compiled = jax.jit(round_fn).lower(state, data).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def run(w: Workload, rounds: int) -> None:
  model = make_model(w)
  xs, ys = make_client_arrays(w)
  data = FederatedData.from_clients(xs, ys, num_classes=w.num_classes)
  log(f"[{w.name}]")
  runners, peaks = [], []
  for row in ROWS:
    alg = build(w, model, row)
    state = alg.init(jax.random.key(0), data)
    peaks.append(peak_mib(alg.round, state, data))
    f = jax.jit(alg.round)
    runners.append(Runner(row[0], lambda s, f=f: f(s, data)[0], state))
  time_interleaved(runners, [rounds] * len(runners))
  base = statistics.median(runners[0].times)
  print(f"\n{w.name}: {w.num_clients} clients, batch {w.work.batch_size} x "
        f"{w.work.steps} local steps, median of {rounds} rounds")
  print("| row | round s | vs fedavg | grads/step | vs fedavg per grad | peak MiB |")
  print("|---|---|---|---|---|---|")
  for row, r, peak in zip(ROWS, runners, peaks, strict=True):
    t = statistics.median(r.times)
    print(f"| {row[0]} | {t:.4f} | {t / base:.2f}x | {row[5]} | {t / base / row[5]:.2f} | "
          f"{peak:.1f} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args()
  for name in args.workload or sorted(WORKLOADS):
    run(WORKLOADS[name], args.rounds)


if __name__ == "__main__":
  main()
