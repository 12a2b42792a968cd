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
* `fedavg`: τ SGD steps, one batch each; `fedavg_x2` / `fedavg_x3`: 2τ / 3τ steps,
  the number of batches a first-order / second-order or HF Per-FedAvg round reads.
* `per_fedavg`: Per-FedAvg's second-order meta-step (one inner step; batches
  D, D′, D″), the exact Hessian-vector product by `jax.jvp` of `jax.grad`
  (`hessian='exact'`, the default).
* `per_fedavg_autodiff`: the same meta-gradient by `jax.grad` through the inner step.
* `per_fedavg_hf`: Per-FedAvg (HF), the finite-difference product.
* `per_fedavg_fo`: Per-FedAvg (FO), first order (D, D′ only).
* `maml_k5_*`: K = 5 inner steps: exact HVPs, `jax.grad` through the steps,
  and the latter with `jax.checkpoint` of each step (the memory rows).

Columns: `round s` (median), `vs fedavg` (ratio of medians, same run), `vs same
batches` (ratio to the FedAvg row that reads as many batches),
`grads/step` (batch gradients a local step evaluates, counting a
Hessian-vector product as two), `vs fedavg per grad` (the ratio divided by
grads/step: the cost of each gradient relative to FedAvg's),
`peak MiB`: XLA's temporary-buffer high-water mark of the compiled round
(`compiled.memory_analysis().temp_size_in_bytes`, arguments and outputs not
included), which is what the K activations per client of a second-order
gradient add to.

A second table (`pieces`) times the pieces of one client's meta-step on one
batch of the workload's size, each repeated 1,000 times in a `lax.fori_loop`
inside one jit: a batch gradient (what a FedAvg step costs), the exact and the
finite-difference Hessian-vector product, and the whole meta-step of each
variant. `vs grad` divides by the gradient. The step's pieces run one after the
other (D, then D′ at the adapted point, then the product along that gradient), so
a meta-step costs at least the sum of its pieces: 2 + HVP/grad FedAvg steps.

A last table compiles (without running) K = 5 second-order rounds of w2's model at
batch 20, 200 and 1,000 and reports their peak memory: exact HVPs, `jax.grad`
through the steps, and the latter with `jax.checkpoint`.

Usage:
  python benchmarks/meta_round.py [--workload w1|w2] [--rounds N] [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
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
from fedjax_pers.personalization import batch_loss, hvp, meta_gradient  # noqa: E402

# (row, `hessian` or None for FedAvg, unused, inner steps K, remat, gradients per local step);
# `fedavg_x2` / `fedavg_x3` run 2τ / 3τ FedAvg steps: the batches that a first-order /
# second-order or HF Per-FedAvg round consumes (D, D′ and D″ per meta-step).
ROWS = (
    ("fedavg", None, None, 1, False, 1),
    ("fedavg_x2", None, None, 2, False, 1),
    ("fedavg_x3", None, None, 3, False, 1),
    ("per_fedavg", "exact", None, 1, False, 4),
    ("per_fedavg_autodiff", "autodiff", None, 1, False, 5),
    ("per_fedavg_hf", "finite_difference", None, 1, False, 4),
    ("per_fedavg_fo", "none", None, 1, False, 2),
    ("maml_k5_hvp", "exact", None, 5, False, 16),
    ("maml_k5_autodiff", "autodiff", None, 5, False, 21),
    ("maml_k5_remat", "autodiff", None, 5, True, 21),
)


def build(w: Workload, model, row):
  _, variant, _, k, remat, _ = row
  if variant is None:   # k: multiple of the local steps
    work = w.work._replace(steps=w.work.steps * k)
    return fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), work,
                  clients_per_round=w.num_clients)
  return per_fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                    inner_lr=w.client_lr, clients_per_round=w.num_clients, hessian=variant,
                    inner_steps=k, remat=remat)


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
  med = {row[0]: statistics.median(r.times) for row, r in zip(ROWS, runners, strict=True)}
  same = {"per_fedavg_fo": "fedavg_x2", "maml_k5_hvp": None, "maml_k5_autodiff": None,
          "maml_k5_remat": None}
  print("| row | round s | vs fedavg | vs same batches | grads/step | vs fedavg per grad "
        "| peak MiB |")
  print("|---|---|---|---|---|---|---|")
  for row, peak in zip(ROWS, peaks, strict=True):
    t = med[row[0]]
    ref = same.get(row[0], "fedavg_x3" if row[1] else row[0])
    vs_same = f"{t / med[ref]:.2f}x" if ref else "—"
    grads = row[5] if row[1] else 1
    print(f"| {row[0]} | {t:.4f} | {t / base:.2f}x | {vs_same} | {grads} | "
          f"{t / base / grads:.2f} | {peak:.1f} |")
  for reading, ref in (("equal local steps", "fedavg"), ("equal batches", "fedavg_x3")):
    so, hf = med["per_fedavg"] / med[ref], med["per_fedavg_hf"] / med[ref]
    print(f"issue targets, {reading}: second order {so:.2f}x (<= 3x: {so <= 3}), "
          f"HF {hf:.2f}x (<= 2x: {hf <= 2})")


def pieces_table(w: Workload, repeats: int = 1000, runs: int = 5) -> None:
  """Microseconds per call of the pieces of one client's meta-step (see the module doc)."""
  model = make_model(w)
  loss = batch_loss(model)
  params = model.init(jax.random.key(0))
  b = w.work.batch_size
  x = jax.random.normal(jax.random.key(1), (3, b, w.features))
  y = jax.random.randint(jax.random.key(2), (3, b), 0, w.num_classes)
  batches = (x, y, np.ones((3, b), bool))
  d, dq, dd = (jax.tree.map(lambda a, i=i: a[i], batches) for i in range(3))
  first = lambda t: jax.tree.map(lambda a: a[None], t)   # K = 1 stacked
  lr = w.client_lr

  def meta(method, hvp_method="exact"):
    return lambda p: meta_gradient(loss, p, lr, first(d), dq, first(dd), method=method,
                                   hvp_method=hvp_method).params

  pieces = {
      "gradient (a FedAvg step)": lambda p: jax.grad(loss)(p, d),
      "exact HVP": lambda p: hvp(loss, p, dd, p),
      "finite-difference HVP": lambda p: hvp(loss, p, dd, p, method="finite_difference"),
      "meta-step, exact HVP": meta("hessian_free"),
      "meta-step, HF": meta("hessian_free", "finite_difference"),
      "meta-step, FO": meta("first_order"),
  }
  times = {}
  for name, f in pieces.items():
    def body(i, p, f=f):   # Perturb the input so that no call is hoisted out of the loop.
      out = f(jax.tree.map(lambda a: a + 1e-9 * i.astype(a.dtype), p))
      return jax.tree.map(lambda a, o: a + 1e-12 * o, p, out)
    loop = jax.jit(lambda p, body=body: jax.lax.fori_loop(0, repeats, body, p))
    jax.block_until_ready(loop(params))
    ts = []
    for _ in range(runs):
      t = time.perf_counter()
      jax.block_until_ready(loop(params))
      ts.append(time.perf_counter() - t)
    times[name] = statistics.median(ts) / repeats
  g = times["gradient (a FedAvg step)"]
  print(f"\n{w.name}: pieces of one client's meta-step, batch {b}, median of {runs} x "
        f"{repeats} calls")
  print("| piece | us per call | vs grad |")
  print("|---|---|---|")
  for name, t in times.items():
    print(f"| {name} | {t * 1e6:.1f} | {t / g:.2f} |")
  for variant, h in (("exact HVP", "exact HVP"), ("HF", "finite-difference HVP")):
    print(f"sum of the pieces of a meta-step ({variant}): 2 gradients + {h} = "
          f"{2 + times[h] / g:.2f} FedAvg steps")


def memory_table(w: Workload, batch_sizes=(20, 200, 1000), k: int = 5) -> None:
  """Peak temporary memory of a K-step second-order round as the batch grows (compile only).

  10 clients of 2,000 examples with w's model; each row compiles the round and
  reads XLA's memory analysis, nothing is run.
  """
  model = make_model(w)
  wm = w._replace(num_clients=10, examples=2000)
  xs, ys = make_client_arrays(wm)
  data = FederatedData.from_clients(xs, ys, num_classes=w.num_classes)
  print(f"\n{w.name} model, K = {k} inner steps, 10 clients x 2000 examples: peak MiB "
        "(XLA temporaries of the compiled round)")
  print("| batch | exact HVPs | grad through the steps | + jax.checkpoint |")
  print("|---|---|---|---|")
  for b in batch_sizes:
    peaks = []
    for hessian, remat in (("exact", False), ("autodiff", False), ("autodiff", True)):
      alg = per_fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr),
                       wm.work._replace(batch_size=b, steps=1), inner_lr=w.client_lr,
                       clients_per_round=wm.num_clients, hessian=hessian, inner_steps=k,
                       remat=remat)
      peaks.append(peak_mib(alg.round, alg.init(jax.random.key(0), data), data))
    print(f"| {b} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--no-memory", action="store_true", help="skip the batch-size memory table")
  args = p.parse_args()
  for name in args.workload or sorted(WORKLOADS):
    run(WORKLOADS[name], args.rounds)
    pieces_table(WORKLOADS[name])
  if not args.no_memory:
    memory_table(WORKLOADS["w2"])


if __name__ == "__main__":
  main()
