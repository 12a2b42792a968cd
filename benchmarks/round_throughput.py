"""Seconds per federated round of each cohort strategy against a Python-loop baseline.

What is measured
----------------
For each workload, `fedjax_pers.algorithms.fedavg` is built once per client
strategy (`padded`: every client runs the longest client's steps, masked, the
differentiable path and what every strategy did before the engine learned to
stop each client at its own last step; `vmap`; `chunked` with 10 and 25
clients per chunk; `scan`; `lanes`; `auto`), each an `fp.Execution`, and its
round is compiled whole with `jax.jit(alg.round)`. The first call
(compile + one round) is timed on its own and excluded; then `--rounds` rounds
are timed one by one (`time.perf_counter` around the call and
`jax.block_until_ready` on the new state) and the median is reported. Timed
rounds are interleaved round-robin across the rows of a workload (round 1 of
every row, then round 2, ...), so a slow phase of a shared machine is spread
over all rows rather than charged to one.

The `baseline` row runs the same FedAvg round the way FedJAX's default backend
does: a Python loop over the round's clients (the same cohorts as the engine
draws) and, inside it, over local steps, each step one call of a jitted
`step(params, opt_state, xb, yb)` on exactly the client's real examples (a last
partial batch per epoch is a smaller call), with batches gathered in NumPy from
a per-client permutation reshuffled every epoch; after the loop a jitted
function averages the deltas weighted by `num_examples` and applies the server
optimizer. Its compile is excluded the same way (one warm-up round).

Workloads (random features, seeded; labels uniform in [0, 10)):
  w1: 100 clients x 200 examples, 60 features, logistic regression,
      batch 20 x 20 local steps, client sgd(0.01), server sgd(1.0). Tiny
      matmuls: per-call overhead dominates.
  w2: 100 clients x 200 examples, 784 features, MLP 784-200-200-10,
      batch 20 x 10 local steps, client sgd(0.1), server sgd(1.0). Compute bound.
  w3: w1's model with skewed clients: 100 clients of clip(round(exp(N(log 148,
      1))), 10, 2000) examples (seed 0), 2 local epochs of batch 20, client
      sgd(0.01), server sgd(1.0).
  fedprox: `configs/synthetic_fedprox.py`'s round (Synthetic(1, 1), 30 clients
      of 45 to 4,645 examples, 10 per round, 20 epochs of batch 10, FedProx
      mu = 1), built from the config by the experiment's own registry.
In w1, w2 and w3 all 100 clients train every round.

Reading the output
------------------
* `round s (median)` is the median seconds per round, `round s (min)` the
  fastest; `first call s` is the first call (compile + one round).
* `speedup` is baseline seconds / strategy seconds (> 1: faster than the loop).
* `real steps` counts, over the round's clients, the local steps that hold a
  real example; `executed` the client-steps the compiled round computed
  (padded steps, or lane-steps; `RoundMetrics.executed_steps`); both are means
  over the timed rounds (the FedProx config draws other clients every round, the
  same ones in every row); `exec/real` is the round's overhead (1.00: none).
* `flop_frac` (w2 only) is the fraction of the float32 matmul floor reached:
  (FLOPs per round / measured matmul FLOP rate) / round seconds. FLOPs per round
  count three matmul passes (forward, gradient wrt inputs, gradient wrt weights)
  of every dense layer for every local step of every client; elementwise work,
  sampling and aggregation are not counted. The rate is measured in the same
  process by timing a jitted 2048x2048 @ 2048x2048 float32 matmul.
* The header line names the plan `auto` resolved to on one device and sharded.

Devices: on CPU the script splits the machine into `--devices` XLA devices
(default: one per core, via `XLA_FLAGS=--xla_force_host_platform_device_count`,
set before JAX starts). Rows without a suffix run on one device, as a user's
round does by default; rows named `...@Ndev` pass `mesh=client_mesh(N)`, so the
cohort is sharded over the devices and independent clients run on every core.
`auto` is compared with the best row of the same device setting.

Usage:
  python benchmarks/round_throughput.py [--workload w1|w2|w3|fedprox] [--rounds N]
      [--devices N] [--json]

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

import fedjax_pers as fp
from fedjax_pers.algorithms import fedavg
from fedjax_pers.core import FederatedData, LocalWork, Model
from fedjax_pers.distributed import client_mesh
from fedjax_pers.models import logistic_regression, mlp

Params = Any
MATMUL_N = 2048
# (row name, Execution options)
STRATEGY_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("padded", dict(strategy="vmap", differentiable=True)),
    ("vmap", dict(strategy="vmap")),
    ("chunked10", dict(strategy="chunked", client_chunk=10)),
    ("chunked25", dict(strategy="chunked", client_chunk=25)),
    ("scan", dict(strategy="scan")),
    ("lanes", dict(strategy="lanes")),
    ("auto", dict()),
)


class Workload(NamedTuple):
  """One benchmark configuration.

  Attributes:
    name: `w1`, `w2`, `w3` or `fedprox`.
    num_clients: Clients.
    clients_per_round: Clients per round.
    examples: Examples per client (the median with `size_sigma`).
    features: Feature dimension.
    num_classes: Label classes.
    hidden: Hidden widths of the MLP (`()`: logistic regression).
    work: Local work per client.
    client_lr: Client SGD learning rate.
    server_lr: Server SGD learning rate.
    flop_floor: Whether to report the fraction of the matmul FLOP floor.
    size_sigma: Clients hold clip(round(exp(N(log examples, σ))), 10, 2000)
      examples (seed 0), or all `examples` if None.
    prox_mu: FedProx's μ (None: FedAvg).
  """

  name: str
  num_clients: int
  clients_per_round: int
  examples: int
  features: int
  num_classes: int
  hidden: tuple[int, ...]
  work: LocalWork
  client_lr: float
  server_lr: float
  flop_floor: bool
  size_sigma: float | None = None
  prox_mu: float | None = None


WORKLOADS: dict[str, Workload] = {
    "w1": Workload("w1", 100, 100, 200, 60, 10, (), LocalWork(batch_size=20, steps=20),
                   0.01, 1.0, False),
    "w2": Workload("w2", 100, 100, 200, 784, 10, (200, 200),
                   LocalWork(batch_size=20, steps=10), 0.1, 1.0, True),
    "w3": Workload("w3", 100, 100, 148, 60, 10, (), LocalWork(batch_size=20, epochs=2),
                   0.01, 1.0, False, size_sigma=1.0),
    # Data and sizes come from the config (see `fedprox_data`); these fields describe it.
    "fedprox": Workload("fedprox", 30, 10, 0, 60, 10, (), LocalWork(batch_size=10, epochs=20),
                        0.01, 1.0, False, prox_mu=1.0),
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
  real_steps: int
  executed_steps: int
  plan: str


# ----------------------------------------------------------------------------- setup


def make_model(w: Workload) -> Model:
  if w.hidden:
    return mlp((w.features,), w.num_classes, hidden=w.hidden)
  return logistic_regression((w.features,), w.num_classes)


def client_sizes(w: Workload, seed: int = 0) -> np.ndarray:
  """Examples per client: `w.examples` each, or w3's seeded log-normal sizes."""
  if w.size_sigma is None:
    return np.full(w.num_clients, w.examples)
  rng = np.random.default_rng(seed)
  draw = np.exp(rng.normal(np.log(w.examples), w.size_sigma, w.num_clients))
  return np.clip(np.round(draw), 10, 2000).astype(int)


def make_client_arrays(w: Workload, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Seeded random features and labels, one array pair per client."""
  if w.name == "fedprox":
    train = fedprox_data()
    return ([train.client(c)[0] for c in range(train.num_clients)],
            [train.client(c)[1] for c in range(train.num_clients)])
  rng = np.random.default_rng(seed)
  sizes = client_sizes(w, seed)
  xs = [rng.standard_normal((n, w.features)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, w.num_classes, n).astype(np.int32) for n in sizes]
  return xs, ys


def fedprox_config():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.synthetic_fedprox import get_config

  return get_config()


def fedprox_data() -> FederatedData:
  from fedjax_pers.experiment import _registry

  return _registry.prepare_data(fedprox_config()).train


def round_flops(w: Workload, steps: int) -> float:
  """Matmul FLOPs of one round: 3 passes per dense layer per real step."""
  dims = (w.features, *w.hidden, w.num_classes)
  macs = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
  return 2.0 * w.work.batch_size * macs * 3 * steps


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

  def __init__(self, name: str, run_round: Callable[[Any], Any], state: Any, plan: str = ""):
    self.name, self.run_round, self.state, self.plan = name, run_round, state, plan
    self.first_call_s = math.nan
    self.times: list[float] = []
    self.steps: list[tuple[int, int]] = []

  def call(self) -> float:
    """Runs one round to completion; returns its wall-clock seconds."""
    t0 = time.perf_counter()
    self.state, steps = jax.block_until_ready(self.run_round(self.state))
    seconds = time.perf_counter() - t0
    self.last_steps = (int(steps[0]), int(steps[1]))
    return seconds

  def warm_up(self) -> None:
    """The first call: compile + one round, timed but not counted."""
    self.first_call_s = self.call()

  def time_round(self) -> None:
    self.times.append(self.call())
    self.steps.append(self.last_steps)

  def mean_steps(self) -> tuple[int, int]:
    """Real and executed client-steps, averaged over the timed rounds."""
    return tuple(int(round(statistics.mean(s[i] for s in self.steps))) for i in (0, 1))


def describe(plan) -> str:
  return plan.strategy + (f"({plan.lanes} lanes)" if plan.strategy == "lanes" else "")


def strategy_runner(w: Workload, model: Model, data: FederatedData, name: str,
                    options: dict[str, Any], devices: int = 1) -> Runner:
  """A `Runner` of `jax.jit(alg.round)` with `Execution(**options)`, sharded if `devices > 1`."""
  mesh = client_mesh(devices) if devices > 1 else None
  execution = fp.Execution(mesh=mesh, **options)
  if w.name == "fedprox":   # the config's algorithm (FedProx, weights n_i), this execution
    c = fedprox_config()
    alg = fp.algorithms.fedprox(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                                mu=c.fedprox.mu, clients_per_round=c.clients_per_round,
                                execution=execution)
  else:
    alg = fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                 clients_per_round=w.clients_per_round, prox_mu=w.prox_mu, execution=execution)
  name = f"{name}@{devices}dev" if devices > 1 else name
  round_fn = jax.jit(alg.round)
  data = fp.distributed.replicate(data, mesh)    # once, as the README says to
  state = alg.init(jax.random.key(0), data)

  def run(s):
    s, m = round_fn(s, data)
    return s, (m.real_steps, m.executed_steps)

  return Runner(name, run, state, describe(alg.plan(state.params, data)))


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
  key: jax.Array
  steps: tuple[int, int]


def make_baseline(w: Workload, model: Model, xs: Sequence[np.ndarray],
                  ys: Sequence[np.ndarray]) -> tuple[Callable[[LoopState], LoopState], LoopState]:
  """FedJAX-style round: Python loops over clients and steps, jitted per-batch step.

  The cohorts are the engine's (`sample_clients` on the same key sequence);
  every step is one call on exactly its real examples.
  """
  client_tx, server_tx = optax.sgd(w.client_lr), optax.sgd(w.server_lr)
  b = w.work.batch_size
  n_all = np.array([len(y) for y in ys], np.float32)
  mu = w.prox_mu

  @jax.jit
  def step(params, opt_state, anchor, xb, yb):
    def loss_fn(p):
      loss = jnp.mean(model.loss(model.apply(p, xb, train=True), yb))
      if mu is not None:
        loss = loss + 0.5 * mu * sum(jnp.sum((a - c) ** 2) for a, c in zip(
            jax.tree.leaves(p), jax.tree.leaves(anchor)))
      return loss
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
    """The client's real batches: epochs of ⌈n / b⌉ (the last partial), or `steps` of b."""
    if w.work.epochs is not None:
      for _ in range(w.work.epochs):
        order = rng.permutation(len(y))
        for j in range(0, len(y), b):
          yield x[order[j:j + b]], y[order[j:j + b]]
      return
    order = np.empty(0, np.int64)
    for _ in range(w.work.steps):
      if len(order) == 0:
        order = rng.permutation(len(y))
      idx, order = order[:b], order[b:]
      yield x[idx], y[idx]

  def run_round(state: LoopState) -> tuple[LoopState, tuple[int, int]]:
    key, k_sample, _ = jax.random.split(state.key, 3)
    cohort = np.asarray(fp.core.sample_clients(k_sample, len(xs), w.clients_per_round))
    local, count = [], 0
    for c in cohort:
      p, o = state.params, client_tx.init(state.params)
      for xb, yb in batches(state.rng, xs[c], ys[c]):
        p, o = step(p, o, state.params, xb, yb)
        count += 1
      local.append(p)
    params, opt_state = finish(state.params, state.opt_state, local, n_all[cohort])
    return LoopState(params, opt_state, state.rng, key, (count, count)), (count, count)

  params = model.init(jax.random.key(0))
  _, k_rounds = jax.random.split(jax.random.key(0))
  init = LoopState(params, server_tx.init(params), np.random.default_rng(0), k_rounds, (0, 0))
  return run_round, init


def baseline_runner(w: Workload, model: Model, xs: Sequence[np.ndarray],
                    ys: Sequence[np.ndarray]) -> Runner:
  run_round, init = make_baseline(w, model, xs, ys)
  return Runner("baseline", run_round, init, "python loop")


# ----------------------------------------------------------------------------- driver


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_workload(w: Workload, rounds: int, baseline_rounds: int) -> list[Row]:
  """Times the baseline and every strategy row, interleaved."""
  model = make_model(w)
  xs, ys = make_client_arrays(w)
  data = (fedprox_data() if w.name == "fedprox"
          else FederatedData.from_clients(xs, ys, num_classes=w.num_classes))
  log(f"[{w.name}]")
  device_counts = [1] + ([jax.device_count()] if jax.device_count() > 1 else [])
  runners = [baseline_runner(w, model, xs, ys)] + [
      strategy_runner(w, model, data, name, options, devices=d)
      for d in device_counts for name, options in STRATEGY_ROWS]
  time_interleaved(runners, [baseline_rounds] + [rounds] * (len(runners) - 1))
  return [Row(w.name, r.name, statistics.median(r.times), min(r.times), r.first_call_s,
              len(r.times), r.times, *r.mean_steps(), r.plan)
          for r in runners]


def row_extras(row: Row, base_s: float, w: Workload, rate: float) -> dict[str, float | None]:
  frac = (round_flops(w, row.real_steps) / rate) / row.round_s_median if w.flop_floor else None
  return {"speedup_vs_baseline": base_s / row.round_s_median, "flop_fraction": frac,
          "executed_per_real": row.executed_steps / max(row.real_steps, 1)}


def print_table(w: Workload, rows: list[Row], rate: float) -> None:
  base_s = rows[0].round_s_median
  what = ("configs/synthetic_fedprox.py: 30 clients (45-4,645 examples), 10 per round, "
          "FedProx mu=1, batch 10 x 20 epochs" if w.name == "fedprox" else
          f"{w.num_clients} clients x "
          + (f"clip(exp(N(log {w.examples}, {w.size_sigma}))) examples" if w.size_sigma
             else f"{w.examples} examples")
          + f", {'mlp ' + str(w.hidden) if w.hidden else 'logistic regression'}, "
          f"{w.features} features, batch {w.work.batch_size} x "
          + (f"{w.work.epochs} epochs" if w.work.epochs else f"{w.work.steps} steps"))
  print(f"\n### {w.name}: {what}")
  autos = [r for r in rows if r.strategy.startswith("auto")]
  print("auto -> " + "; ".join(f"{r.strategy}: {r.plan}" for r in autos) + (
      f"; FLOPs/round = {round_flops(w, rows[0].real_steps) / 1e9:.2f} GFLOP; floor = "
      f"{round_flops(w, rows[0].real_steps) / rate * 1e3:.1f} ms" if w.flop_floor else ""))
  print()
  head = ("| strategy | round s (median) | round s (min) | rounds | first call s |"
          " speedup vs baseline | real steps | executed | exec/real |")
  head += " FLOP fraction |" if w.flop_floor else ""
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for row in rows:
    ex = row_extras(row, base_s, w, rate)
    line = (f"| {row.strategy} | {row.round_s_median:.4f} | {row.round_s_min:.4f} | "
            f"{row.rounds_timed} | {row.first_call_s:.2f} | "
            f"{ex['speedup_vs_baseline']:.2f}x | {row.real_steps} | {row.executed_steps} | "
            f"{ex['executed_per_real']:.2f} |")
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
          f" vs best; {base_s / auto.round_s_median:.2f}x the baseline; exec/real "
          f"{auto.executed_steps / max(auto.real_steps, 1):.2f})")


def print_json(w: Workload, rows: list[Row], rate: float, env: dict[str, Any]) -> None:
  base_s = rows[0].round_s_median
  for row in rows:
    obj = {"workload": row.workload, "strategy": row.strategy, "plan": row.plan,
           "round_s_median": row.round_s_median, "round_s_min": row.round_s_min,
           "first_call_s": row.first_call_s,
           "rounds_timed": row.rounds_timed, "round_s_all": row.round_s_all,
           "real_steps": row.real_steps, "executed_steps": row.executed_steps,
           **row_extras(row, base_s, w, rate),
           "flops_per_round": round_flops(w, row.real_steps) if w.flop_floor else None,
           "matmul_flop_rate": rate, **env}
    print(json.dumps(obj), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                      help="Run one workload (default: all).")
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
         "device_count": jax.device_count(), "device_kind": jax.devices()[0].device_kind}
  log("measuring matmul rate ...")
  rate = matmul_flop_rate()
  if not args.json:
    print(f"jax {env['jax_version']}, backend {env['backend']} ({env['device_kind']}), "
          f"{env['device_count']} device(s); float32 matmul {MATMUL_N}^3: "
          f"{rate / 1e9:.1f} GFLOP/s; timed rounds: {args.rounds} per strategy, "
          f"{baseline_rounds} for the baseline (median reported, compile excluded)")
  names = [args.workload] if args.workload else list(WORKLOADS)
  for name in names:
    w = WORKLOADS[name]
    rows = run_workload(w, args.rounds, baseline_rounds)
    if args.json:
      print_json(w, rows, rate, env)
    else:
      print_table(w, rows, rate)
  log(f"total {time.perf_counter() - t_start:.1f} s")
  if not args.json:
    print(f"\ntotal runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
  main()
