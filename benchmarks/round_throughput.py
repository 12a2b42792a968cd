"""Seconds per federated round of each cohort strategy against a Python-loop baseline.

What is measured
----------------
For each workload, `fedjax_pers.algorithms.fedavg` is built once per client
strategy (`vmap`, `chunked` with 10 and 25 clients per chunk, `scan`, `auto`)
and its round is compiled whole with `jax.jit(alg.round)`. The first call
(compile + one round) is timed on its own and excluded; then `--rounds` rounds
are timed one by one (`time.perf_counter` around the call and
`jax.block_until_ready` on the new state) and the median is reported. Timed
rounds are interleaved round-robin across the rows of a workload (round 1 of
every row, then round 2, ...), so a slow phase of a shared machine is spread
over all rows rather than charged to one.

The `baseline` row runs the same FedAvg round the way FedJAX's default backend
does: a Python loop over clients and, inside it, over local steps, each step one
call of a jitted `step(params, opt_state, xb, yb)`, with batches gathered in
NumPy from a per-client permutation reshuffled every epoch; after the loop a
jitted function averages the deltas weighted by `num_examples` and applies the
server optimizer. Its compile is excluded the same way (one warm-up round).

Workloads (random features, seeded; labels uniform in [0, 10)):
  w1: 100 clients x 200 examples, 60 features, logistic regression,
      batch 20 x 20 local steps, client sgd(0.01), server sgd(1.0). Tiny
      matmuls: per-call overhead dominates.
  w2: 100 clients x 200 examples, 784 features, MLP 784-200-200-10,
      batch 20 x 10 local steps, client sgd(0.1), server sgd(1.0). Compute bound.
All 100 clients train every round.

Reading the output
------------------
* `round s (median)` is the median seconds per round, `round s (min)` the
  fastest; `first call s` is the first call (compile + one round).
* `speedup` is baseline seconds / strategy seconds (> 1: faster than the loop).
* `flop_frac` (w2 only) is the fraction of the float32 matmul floor reached:
  (FLOPs per round / measured matmul FLOP rate) / round seconds. FLOPs per round
  count three matmul passes (forward, gradient wrt inputs, gradient wrt weights)
  of every dense layer for every local step of every client; elementwise work,
  sampling and aggregation are not counted. The rate is measured in the same
  process by timing a jitted 2048x2048 @ 2048x2048 float32 matmul.
* The header line names the strategy that `auto` resolved to.

Devices: on CPU the script splits the machine into `--devices` XLA devices
(default: one per core, via `XLA_FLAGS=--xla_force_host_platform_device_count`,
set before JAX starts). Rows without a suffix run on one device, as a user's
round does by default; rows named `...@Ndev` pass `mesh=client_mesh(N)`, so the
cohort is sharded over the devices and independent clients run on every core.
`auto` is compared with the best row of the same device setting.

Usage:
  python benchmarks/round_throughput.py [--workload w1|w2] [--rounds N] [--devices N] [--json]

With `--json`, each row is one JSON object per line on stdout (keys `workload`,
`strategy`, `round_s_median`, ...); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def _devices_from_argv(argv: list[str]) -> int:
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return os.cpu_count() or 1


# Must happen before JAX initialises its CPU backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={_devices_from_argv(sys.argv)}").strip()
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.algorithms import fedavg
from fedjax_pers.core import FederatedData, LocalWork, Model, resolve_strategy
from fedjax_pers.distributed import client_mesh
from fedjax_pers.models import logistic_regression, mlp

Params = Any
MATMUL_N = 2048
# (row name, strategy, client_chunk)
STRATEGY_ROWS: tuple[tuple[str, str, int | None], ...] = (
    ("vmap", "vmap", None),
    ("chunked10", "chunked", 10),
    ("chunked25", "chunked", 25),
    ("scan", "scan", None),
    ("auto", "auto", None),
)


class Workload(NamedTuple):
  """One benchmark configuration.

  Attributes:
    name: `w1` or `w2`.
    num_clients: Clients (all of them train every round).
    examples: Examples per client.
    features: Feature dimension.
    num_classes: Label classes.
    hidden: Hidden widths of the MLP (`()`: logistic regression).
    work: Local work per client.
    client_lr: Client SGD learning rate.
    server_lr: Server SGD learning rate.
    flop_floor: Whether to report the fraction of the matmul FLOP floor.
  """

  name: str
  num_clients: int
  examples: int
  features: int
  num_classes: int
  hidden: tuple[int, ...]
  work: LocalWork
  client_lr: float
  server_lr: float
  flop_floor: bool


WORKLOADS: dict[str, Workload] = {
    "w1": Workload("w1", 100, 200, 60, 10, (), LocalWork(batch_size=20, steps=20),
                   0.01, 1.0, False),
    "w2": Workload("w2", 100, 200, 784, 10, (200, 200), LocalWork(batch_size=20, steps=10),
                   0.1, 1.0, True),
}


class Row(NamedTuple):
  """One timed strategy."""

  workload: str
  strategy: str
  round_s_median: float
  round_s_min: float
  first_call_s: float
  rounds_timed: int
  round_s_all: list[float]


# ----------------------------------------------------------------------------- setup


def make_model(w: Workload) -> Model:
  if w.hidden:
    return mlp((w.features,), w.num_classes, hidden=w.hidden)
  return logistic_regression((w.features,), w.num_classes)


def make_client_arrays(w: Workload, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Seeded random features and labels, one array pair per client."""
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((w.examples, w.features)).astype(np.float32)
        for _ in range(w.num_clients)]
  ys = [rng.integers(0, w.num_classes, w.examples).astype(np.int32)
        for _ in range(w.num_clients)]
  return xs, ys


def round_flops(w: Workload) -> float:
  """Matmul FLOPs of one round: 3 passes per dense layer per step, all clients."""
  dims = (w.features, *w.hidden, w.num_classes)
  macs = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
  b = w.work.batch_size
  return 2.0 * b * macs * 3 * w.work.steps * w.num_clients


def matmul_flop_rate(n: int = MATMUL_N, runs: int = 7) -> float:
  """Float32 FLOP/s of a jitted `n x n @ n x n` matmul, median of `runs`."""
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- timing


class Runner:
  """One strategy's round function and its evolving state, timed call by call."""

  def __init__(self, name: str, run_round: Callable[[Any], Any], state: Any):
    self.name, self.run_round, self.state = name, run_round, state
    self.first_call_s = math.nan
    self.times: list[float] = []

  def call(self) -> float:
    """Runs one round to completion; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    self.state = jax.block_until_ready(self.run_round(self.state))
    return time.perf_counter() - t0

  def warm_up(self) -> None:
    """The first call: compile + one round, timed but not counted."""
    self.first_call_s = self.call()

  def time_round(self) -> None:
    self.times.append(self.call())


def strategy_runner(w: Workload, model: Model, data: FederatedData, name: str, strategy: str,
                    client_chunk: int | None, devices: int = 1) -> Runner:
  """A `Runner` of `jax.jit(fedavg(...).round)`, sharded over `devices` if > 1."""
  mesh = client_mesh(devices) if devices > 1 else None
  alg = fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
               clients_per_round=w.num_clients, strategy=strategy, client_chunk=client_chunk,
               mesh=mesh)
  name = f"{name}@{devices}dev" if devices > 1 else name
  round_fn = jax.jit(alg.round)
  return Runner(name, lambda s: round_fn(s, data)[0], alg.init(jax.random.key(0), data))


def time_interleaved(runners: Sequence[Runner], rounds: Sequence[int]) -> None:
  """Warms every runner up, then times rounds round-robin across runners.

  Interleaving spreads slow drifts of the machine (other processes, clock
  changes) over all strategies instead of charging them to whichever ran then.
  `rounds[i]` is the number of timed rounds of `runners[i]`.
  """
  for r in runners:
    log(f"  compile + first round: {r.name}")
    r.warm_up()
  for i in range(max(rounds)):
    for r, n in zip(runners, rounds, strict=True):
      if i < n:
        r.time_round()


# ----------------------------------------------------------------------------- baseline


class LoopState(NamedTuple):
  params: Params
  opt_state: Any
  rng: np.random.Generator


def make_baseline(w: Workload, model: Model, xs: Sequence[np.ndarray],
                  ys: Sequence[np.ndarray]) -> tuple[Callable[[LoopState], LoopState], LoopState]:
  """FedJAX-style round: Python loops over clients and steps, jitted per-batch step."""
  client_tx, server_tx = optax.sgd(w.client_lr), optax.sgd(w.server_lr)
  b, steps = w.work.batch_size, w.work.steps
  n = np.array([len(y) for y in ys], np.float32)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss_fn = lambda p: jnp.mean(model.loss(model.apply(p, xb, train=True), yb))
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = client_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def finish(params, opt_state, local_params, num_examples):
    weights = num_examples / jnp.sum(num_examples)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *local_params)
    delta = jax.tree.map(lambda s, p: jnp.tensordot(weights, s - p[None], axes=1),
                         stacked, params)
    updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, delta), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def batches(rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
    """`steps` batches of `b`, cycling through freshly shuffled epochs."""
    order = np.empty(0, np.int64)
    for _ in range(steps):
      if len(order) == 0:
        order = rng.permutation(len(y))
      idx, order = order[:b], order[b:]
      yield x[idx], y[idx]

  def run_round(state: LoopState) -> LoopState:
    local = []
    for x, y in zip(xs, ys, strict=True):
      p, o = state.params, client_tx.init(state.params)
      for xb, yb in batches(state.rng, x, y):
        p, o = step(p, o, xb, yb)
      local.append(p)
    params, opt_state = finish(state.params, state.opt_state, local, n)
    return LoopState(params, opt_state, state.rng)

  params = model.init(jax.random.key(0))
  init = LoopState(params, server_tx.init(params), np.random.default_rng(0))
  return run_round, init


def baseline_runner(w: Workload, model: Model, xs: Sequence[np.ndarray],
                    ys: Sequence[np.ndarray]) -> Runner:
  return Runner("baseline", *make_baseline(w, model, xs, ys))


# ----------------------------------------------------------------------------- driver


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_workload(w: Workload, rounds: int, baseline_rounds: int) -> tuple[list[Row], str]:
  """Times the baseline and every strategy row; returns rows and `auto`'s choice."""
  model = make_model(w)
  xs, ys = make_client_arrays(w)
  data = FederatedData.from_clients(xs, ys, num_classes=w.num_classes)
  auto_choice = resolve_strategy("auto", model.init(jax.random.key(0)))
  log(f"[{w.name}]")
  device_counts = [1] + ([jax.device_count()] if jax.device_count() > 1 else [])
  runners = [baseline_runner(w, model, xs, ys)] + [
      strategy_runner(w, model, data, *row, devices=d)
      for d in device_counts for row in STRATEGY_ROWS]
  time_interleaved(runners, [baseline_rounds] + [rounds] * (len(runners) - 1))
  rows = [Row(w.name, r.name, statistics.median(r.times), min(r.times), r.first_call_s,
              len(r.times), r.times) for r in runners]
  return rows, auto_choice


def row_extras(row: Row, base_s: float, w: Workload, flops: float, rate: float
               ) -> dict[str, float | None]:
  frac = (flops / rate) / row.round_s_median if w.flop_floor else None
  return {"speedup_vs_baseline": base_s / row.round_s_median, "flop_fraction": frac}


def print_table(w: Workload, rows: list[Row], auto_choice: str, flops: float, rate: float
                ) -> None:
  base_s = rows[0].round_s_median
  print(f"\n### {w.name}: {w.num_clients} clients x {w.examples} examples, "
        f"{'mlp ' + str(w.hidden) if w.hidden else 'logistic regression'}, "
        f"{w.features} features, batch {w.work.batch_size} x {w.work.steps} steps")
  print(f"auto -> {auto_choice}" + (
      f"; FLOPs/round = {flops / 1e9:.2f} GFLOP; floor = {flops / rate * 1e3:.1f} ms"
      if w.flop_floor else ""))
  print()
  head = ("| strategy | round s (median) | round s (min) | rounds | first call s |"
          " speedup vs baseline |")
  head += " FLOP fraction |" if w.flop_floor else ""
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for row in rows:
    ex = row_extras(row, base_s, w, flops, rate)
    line = (f"| {row.strategy} | {row.round_s_median:.4f} | {row.round_s_min:.4f} | "
            f"{row.rounds_timed} | "
            f"{row.first_call_s:.2f} | {ex['speedup_vs_baseline']:.2f}x |")
    if w.flop_floor:
      line += f" {ex['flop_fraction']:.3f} |"
    print(line)
  print()
  for suffix in sorted({r.strategy.partition("@")[2] for r in rows[1:]}):
    group = [r for r in rows[1:] if r.strategy.partition("@")[2] == suffix]
    best = min(group, key=lambda r: r.round_s_median)
    auto = next(r for r in group if r.strategy.startswith("auto"))
    print(f"{suffix or '1 device'}: best {best.strategy} {best.round_s_median:.4f} s; "
          f"auto {auto.round_s_median:.4f} s ({auto.round_s_median / best.round_s_median - 1:+.1%}"
          " vs best)")


def print_json(w: Workload, rows: list[Row], auto_choice: str, flops: float, rate: float,
               env: dict[str, Any]) -> None:
  base_s = rows[0].round_s_median
  for row in rows:
    obj = {"workload": row.workload, "strategy": row.strategy,
           "round_s_median": row.round_s_median, "round_s_min": row.round_s_min,
           "first_call_s": row.first_call_s,
           "rounds_timed": row.rounds_timed, "round_s_all": row.round_s_all,
           **row_extras(row, base_s, w, flops, rate),
           "auto_resolved": auto_choice,
           "flops_per_round": flops if w.flop_floor else None,
           "matmul_flop_rate": rate, **env}
    print(json.dumps(obj), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                      help="Run one workload (default: both).")
  parser.add_argument("--rounds", type=int, default=5,
                      help="Timed rounds per strategy after the warm-up (default 5).")
  parser.add_argument("--baseline-rounds", type=int, default=None,
                      help="Timed rounds of the Python-loop baseline (default: --rounds).")
  parser.add_argument("--json", action="store_true", help="One JSON object per row.")
  parser.add_argument("--devices", type=int, default=os.cpu_count() or 1,
                      help="CPU devices to split the machine into (default: one per core); "
                           "rows @Ndev shard the cohort over them.")
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  baseline_rounds = args.rounds if args.baseline_rounds is None else args.baseline_rounds
  if baseline_rounds < 1:
    parser.error("--baseline-rounds must be >= 1")

  t_start = time.perf_counter()
  env = {"jax_version": jax.__version__, "backend": jax.default_backend(),
         "device_count": jax.device_count()}
  log("measuring matmul rate ...")
  rate = matmul_flop_rate()
  if not args.json:
    print(f"jax {env['jax_version']}, backend {env['backend']}, "
          f"{env['device_count']} device(s); float32 matmul {MATMUL_N}^3: "
          f"{rate / 1e9:.1f} GFLOP/s; timed rounds: {args.rounds} per strategy, "
          f"{baseline_rounds} for the baseline (median reported, compile excluded)")
  names = [args.workload] if args.workload else sorted(WORKLOADS)
  for name in names:
    w = WORKLOADS[name]
    rows, auto_choice = run_workload(w, args.rounds, baseline_rounds)
    flops = round_flops(w)
    if args.json:
      print_json(w, rows, auto_choice, flops, rate, env)
    else:
      print_table(w, rows, auto_choice, flops, rate)
  log(f"total {time.perf_counter() - t_start:.1f} s")
  if not args.json:
    print(f"\ntotal runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
  main()
