"""Rounds over a population beyond device memory: a host store on disk against one on device.

The same cohort (100 clients per round, w1's model: logistic regression on 60
features into 10 classes; w1's local work: 2 epochs of batch 20 at lr 0.1) from

  (a) a 10,000-client population held on the device (`FederatedData`, the
      in-memory path every run used so far), and
  (b) a 1,000,000-client population in a host store on disk (`data.StoreWriter`,
      written chunk by chunk; read memory-mapped; each round's cohort gathered
      on a host thread one round ahead by `data.CohortFeed`).

Client sizes are uniform in [10, 100]; features N(0, 1); labels the arg-max
of a fixed random linear teacher. Each case runs in its own process so that
its peak RSS (`resource.getrusage`) is its own. Rounds are timed one by one,
each blocked until its state is ready (as a loop that logs metrics does);
medians after two warm-up rounds. Prints a table and, with `--json`, one JSON
row per case with `num_clients`, `round_s_median` and `peak_rss_mb`.

    python benchmarks/population.py [--json] [--rounds 15] [--clients 1000000]
        [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM, CLASSES, LOW, HIGH = 60, 10, 10, 100
COHORT, CHUNK, SEED = 100, 10_000, 0


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def chunk_arrays(first: int, num: int):
  """Clients `first .. first + num - 1`: per-client features and labels (deterministic)."""
  sizes = np.random.default_rng([SEED, 1]).integers(LOW, HIGH + 1, first + num)[first:]
  teacher = np.random.default_rng([SEED, 2]).standard_normal((DIM, CLASSES), np.float32)
  rng = np.random.default_rng([SEED, 3, first])
  x = rng.standard_normal((int(sizes.sum()), DIM), np.float32)
  y = np.argmax(x @ teacher, axis=1).astype(np.int32)
  cuts = np.cumsum(sizes)[:-1]
  return np.split(x, cuts), np.split(y, cuts)


def prepare(path: str, num_clients: int) -> dict:
  import fedjax_pers as fp
  start = time.perf_counter()
  with fp.data.StoreWriter(path, (DIM,), CLASSES) as w:
    for a in range(0, num_clients, CHUNK):
      w.add(*chunk_arrays(a, min(CHUNK, num_clients - a)))
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  return dict(case="prepare", num_clients=num_clients, prepare_s=round(seconds, 1),
              store_gb=round(size / 1e9, 2), peak_rss_mb=round(peak_rss_mb(), 1))


def algorithm():
  import optax

  import fedjax_pers as fp
  model = fp.models.logistic_regression((DIM,), CLASSES)
  return fp.algorithms.fedavg(model, optax.sgd(0.1), optax.sgd(1.0),
                              fp.LocalWork(20, epochs=2), clients_per_round=COHORT)


def time_rounds(step, state, next_data, rounds: int) -> tuple[list[float], object]:
  import jax
  times = []
  for r in range(rounds + 2):
    t0 = time.perf_counter()
    state, metrics = step(state, next_data())
    jax.block_until_ready(state)
    if r >= 2:
      times.append(time.perf_counter() - t0)
  return times, metrics


def run_memory(num_clients: int, rounds: int) -> dict:
  import jax

  import fedjax_pers as fp
  xs, ys = [], []
  for a in range(0, num_clients, CHUNK):
    x, y = chunk_arrays(a, min(CHUNK, num_clients - a))
    xs += x
    ys += y
  data = fp.FederatedData.from_clients(xs, ys, num_classes=CLASSES)
  del xs, ys
  alg = algorithm()
  state = alg.init(jax.random.key(SEED), data)
  times, m = time_rounds(jax.jit(alg.round), state, lambda: data, rounds)
  return dict(case="(a) on device", num_clients=num_clients,
              round_s_median=statistics.median(times), round_s_min=min(times),
              real_steps=int(m.real_steps), peak_rss_mb=round(peak_rss_mb(), 1))


def run_disk(path: str, rounds: int) -> dict:
  import jax

  import fedjax_pers as fp
  t0 = time.perf_counter()
  store = fp.data.open_store(path)
  open_s = time.perf_counter() - t0
  alg = algorithm()
  state = alg.init(jax.random.key(SEED), store.cohort_data([0]))
  feed = fp.data.CohortFeed(alg, store, state.rng)
  times, m = time_rounds(jax.jit(alg.round), state, lambda: next(feed), rounds)
  feed.close()
  t0 = time.perf_counter()
  for c in range(5):
    store.gather(np.arange(c * COHORT, (c + 1) * COHORT) * 997 % store.num_clients)
  gather_ms = (time.perf_counter() - t0) / 5 * 1e3
  return dict(case="(b) host store on disk", num_clients=store.num_clients,
              round_s_median=statistics.median(times), round_s_min=min(times),
              real_steps=int(m.real_steps), open_s=round(open_s, 3),
              gather_ms=round(gather_ms, 2), peak_rss_mb=round(peak_rss_mb(), 1))


def child(*args: str) -> dict:
  out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                       text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--json", action="store_true")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--clients", type=int, default=1_000_000)
  p.add_argument("--memory-clients", type=int, default=10_000)
  p.add_argument("--dir", default=None, help="where to write the store (default: a temp dir)")
  p.add_argument("--keep", action="store_true", help="keep the store afterwards")
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)
  p.add_argument("--path", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.case == "prepare":
    print(json.dumps(prepare(a.path, a.clients)))
    return
  if a.case == "memory":
    print(json.dumps(run_memory(a.memory_clients, a.rounds)))
    return
  if a.case == "disk":
    print(json.dumps(run_disk(a.path, a.rounds)))
    return
  import jax
  base = a.dir or tempfile.mkdtemp(prefix="population-")
  path = os.path.join(base, f"store-{a.clients}")
  try:
    if os.path.exists(os.path.join(path, "header.json")):
      made = dict(case="prepare", note="reused", num_clients=a.clients)
    else:
      shutil.rmtree(path, ignore_errors=True)
      made = child("--case", "prepare", "--path", path, "--clients", str(a.clients))
    rows = [child("--case", "memory", "--memory-clients", str(a.memory_clients),
                  "--rounds", str(a.rounds)),
            child("--case", "disk", "--path", path, "--rounds", str(a.rounds))]
  finally:
    if not a.keep and a.dir is None:
      shutil.rmtree(base, ignore_errors=True)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores; "
        f"{COHORT} clients per round, sizes uniform in [{LOW}, {HIGH}], {DIM} features; "
        f"{a.rounds} timed rounds per case (median)")
  print(f"store: {made}")
  print("\n| population | clients | round s (median) | round s (min) | peak RSS MB |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['num_clients']:,} | {r['round_s_median']:.4f} | "
          f"{r['round_s_min']:.4f} | {r['peak_rss_mb']:.0f} |")
  ratio = rows[1]["round_s_median"] / rows[0]["round_s_median"]
  print(f"\n(b) / (a) round time: {ratio:.2f}x; (b) gathers a cohort in "
        f"{rows[1]['gather_ms']:.1f} ms on the host (overlapped with the round)")
  if a.json:
    for r in [made, *rows]:
      print(json.dumps(r))


if __name__ == "__main__":
  main()
