"""What each aggregation weighting costs, against a FedAvg round of workload w1.

What is measured
----------------
Workload w1 of `round_throughput.py` (100 clients x 200 examples, 60 features,
logistic regression, batch 20 x 20 local steps, all 100 clients every round),
one CPU device, cohort strategy `vmap`.

* `aggregate ms`: the weighting/aggregation step alone: `jax.jit` of the
  aggregator's `apply(outputs, state, params)` on the stacked outputs of a real
  w1 cohort (100 updates of 610 parameters), median of `--reps` calls after a
  warm-up call.
* `of FedAvg round`: that time divided by the median FedAvg round (weighting
  `num_examples`), measured in the same run. The target is < 10% for every
  non-learned weighting.
* `round ms` / `round ratio`: the whole jitted round with this weighting
  (client training included), median of `--rounds` rounds interleaved across
  rows, and its ratio to the FedAvg round. `loss_improvement` and `q_ffl` make
  every client also evaluate its loss before and after training (two forward
  passes over its data), which shows here and not in `aggregate ms`.

FedLAW (learned) is listed for information: it trains the weights for
`fedlaw_steps` Adam steps on a 200-example proxy set each round. The automated
weighting (`auto`, learned) takes one Adam step of the mixture on the same set.

Usage:
  python benchmarks/weighting_cost.py [--rounds N] [--reps N] [--fedlaw-steps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from round_throughput import WORKLOADS, make_client_arrays, make_model  # noqa: E402

import fedjax_pers as fp  # noqa: E402
from fedjax_pers import aggregation as agg  # noqa: E402
from fedjax_pers.algorithms import fedavg  # noqa: E402
from fedjax_pers.core import FederatedData, Plan, fedavg_program, run_cohort  # noqa: E402
from fedjax_pers.core._client import ClientData  # noqa: E402
from fedjax_pers.hypergrad import held_out_loss  # noqa: E402


def weightings(model, proxy, fedlaw_steps):
  return {
      "num_examples": agg.num_examples(),
      "uniform": agg.uniform(),
      "loss": agg.loss(0.5),
      "loss_improvement": agg.loss_improvement(),
      "cosine": agg.cosine(),
      "fedadp": agg.fedadp(),
      "label_divergence": agg.label_divergence(),
      "label_entropy": agg.label_entropy(),
      "num_examples*label_divergence": agg.product(agg.num_examples(),
                                                   agg.label_divergence()),
      "q_ffl": agg.q_ffl(1.0, 0.01),
      "median": agg.median(),
      "trimmed_mean": agg.trimmed_mean(0.2),
      "krum": agg.krum(10),
      "multi_krum": agg.multi_krum(10),
      "clip_norm": agg.clip_norm(1.0),
      "fedlaw (learned)": agg.fedlaw(model, *proxy, steps=fedlaw_steps),
      "auto (learned)": agg.auto(held_out_loss(model, *proxy)),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--reps", type=int, default=50)
  p.add_argument("--fedlaw-steps", type=int, default=100)
  args = p.parse_args()

  w = WORKLOADS["w1"]
  xs, ys = make_client_arrays(w)
  data = FederatedData.from_clients(xs, ys, num_classes=w.num_classes)
  model = make_model(w)
  proxy = (np.concatenate(xs[:1]), np.concatenate(ys[:1]))
  table = weightings(model, proxy, args.fedlaw_steps)

  # Real outputs of one w1 cohort, for the aggregation step alone.
  params = model.init(jax.random.key(0))
  program = fedavg_program(model, optax.sgd(w.client_lr), w.work, num_classes=w.num_classes,
                           max_examples=data.max_examples, client_losses=True)
  keys = jax.random.split(jax.random.key(1), data.num_clients)
  ids = np.arange(data.num_clients, dtype=np.int32)
  clients = ClientData(data.x, data.y, data.num_examples, None, ids)
  (outputs, _), *_ = jax.jit(lambda p: run_cohort(
      program, p, clients, keys, np.ones(data.num_clients, bool),
      plan=Plan("vmap", None, None, False)))(params)
  outputs = outputs._replace(client_id=ids)

  agg_ms, rounds, states = {}, {}, {}
  for name, how in table.items():
    a = agg.as_aggregator(how)
    fn = jax.jit(a.apply)
    state = a.init(data.num_clients)
    jax.block_until_ready(fn(outputs, state, params))
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(outputs, state, params))
      times.append(time.perf_counter() - t0)
    agg_ms[name] = 1e3 * statistics.median(times)
    alg = fedavg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr), w.work,
                 clients_per_round=w.num_clients, weighting=how,
                 execution=fp.Execution(strategy="vmap"))
    rounds[name] = (jax.jit(alg.round), [])
    states[name] = jax.block_until_ready(rounds[name][0](alg.init(jax.random.key(0), data),
                                                         data)[0])
    print(f"compiled {name}", file=sys.stderr)
  for _ in range(args.rounds):
    for name, (fn, times) in rounds.items():
      t0 = time.perf_counter()
      states[name] = jax.block_until_ready(fn(states[name], data)[0])
      times.append(time.perf_counter() - t0)
  round_ms = {k: 1e3 * statistics.median(t) for k, (_, t) in rounds.items()}
  base = round_ms["num_examples"]
  print(f"w1 FedAvg round (num_examples, vmap): {base:.2f} ms median of {args.rounds}; "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  print("| weighting | aggregate ms | of FedAvg round | round ms | round ratio |")
  print("|---|---|---|---|---|")
  for name in table:
    print(f"| {name} | {agg_ms[name]:.3f} | {100 * agg_ms[name] / base:.1f}% | "
          f"{round_ms[name]:.2f} | {round_ms[name] / base:.2f} |")


if __name__ == "__main__":
  main()
