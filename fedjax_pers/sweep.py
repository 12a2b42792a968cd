"""Vectorised sweeps: S variants of one federated run as one compiled program.

A round is a pure function of the server state (and of the numbers that configure
it), so `jax.vmap` runs S rounds side by side: S seeds of one experiment are S
stacked server states, and S settings of a numeric hyperparameter (learning rates,
μ, λ, temperatures, q) are S stacked values the round is traced with. Each round of
the sweep is one XLA program whatever S is; the variants do not interact.

  build = lambda lr: fp.algorithms.fedavg(model, optax.sgd(lr), optax.sgd(1.0), work,
                                          clients_per_round=10)
  lrs = jnp.array([0.01, 0.03, 0.1])
  states = sweep.stack([build(lr).init(jax.random.key(s), train)
                        for s, lr in enumerate(lrs)])
  step = jax.jit(sweep.rounds(lambda lr, state, data: build(lr).round(state, data), lrs))
  states, metrics = step(states, train)     # metrics.train_loss: [3]

Memory grows with S (S copies of the server state, the per-client state and the
cohort's work). `rounds(..., chunk=c)` runs the variants c at a time inside the same
program (`lax.map` over chunks of a `vmap`), so only c cohorts are live at once;
`dispatched` runs the chunks as calls of one compiled program, and `choose` picks
the chunk a driver should use: the largest that fits the device's memory, or one at a
time where that is faster (measured).

`interval` summarises one number across seeds: mean, standard deviation and the 95%
confidence interval of the mean (Student's t with n − 1 degrees of freedom).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["stack", "take", "rounds", "dispatched", "choose", "available_memory", "interval"]


def stack(trees: Sequence[Any]) -> Any:
  """The pytrees `trees` (one per variant, the same structure) stacked on a new axis 0."""
  if not trees:
    raise ValueError("sweep.stack needs at least one pytree; got none.")
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def take(tree: Any, s: int) -> Any:
  """Variant `s` of a stacked pytree."""
  return jax.tree.map(lambda a: a[s], tree)


def rounds(round_of: Callable[[Any, Any, Any], tuple[Any, Any]], hypers: Any, *,
           chunk: int | None = None) -> Callable[[Any, Any], tuple[Any, Any]]:
  """`step(states, data) -> (states, metrics)`: one round of every variant.

  Args:
    round_of: `(h, state, data) -> (state, metrics)`, one variant's round with its
      hyperparameters `h` (a pytree of scalars, traced; `()` when only seeds vary).
    hypers: `h` of every variant stacked on axis 0 (or `()`).
    chunk: Variants per `vmap` (None: all S at once). Smaller chunks run one after
      another inside the same program (`lax.map(..., batch_size=chunk)`): the same
      numbers, less memory.
  """
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    raise ValueError(f"chunk must be a positive int or None; got {chunk!r}.")

  def step(states, data):
    one = lambda args: round_of(args[0], args[1], data)
    size = jax.tree.leaves(states)[0].shape[0]
    if chunk is None or chunk >= size:
      return jax.vmap(one)((hypers, states))
    return jax.lax.map(one, (hypers, states), batch_size=chunk)

  return step


def available_memory(device: jax.Device | None = None) -> int:
  """Bytes a program may use on `device` (default: the first): the accelerator's limit
  less what is in use, or on a CPU the host's available memory."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in info else (
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def program_bytes(compiled) -> int | None:
  """The memory a compiled program needs (arguments, outputs and temporaries), or None
  where the backend does not say."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def dispatched(round_of: Callable[[Any, Any, Any], tuple[Any, Any]], hypers: Any,
               num_variants: int, chunk: int) -> Callable[[Any, Any], tuple[Any, Any]]:
  """Like `rounds(...)` with `chunk`, but each chunk is one call of one compiled program
  (`vmap` over `chunk` variants; the last chunk padded by repeating its last variant,
  whose copies are dropped), the calls made from Python one after another.

  The same numbers as `rounds`; not itself traceable. On a CPU, where a batched
  small matmul costs about as much per variant as an unbatched one and variants in
  lock-step wait for the longest client of any of them, `chunk=1` is often the
  fastest; on an accelerator, all at once. `choose` measures which.
  """
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int; got {chunk!r}.")
  chunk = min(chunk, num_variants)
  jitted = jax.jit(lambda h, state, data: jax.vmap(
      lambda hh, ss: round_of(hh, ss, data))(h, state))
  starts = list(range(0, num_variants, chunk))
  compiled = []

  def one(h, state, data):   # compiled at the first call; its memory then known
    if not compiled:
      compiled.append(jitted.lower(h, state, data).compile())
    return compiled[0](h, state, data)

  def part(tree, i):
    idx = np.minimum(np.arange(i, i + chunk), num_variants - 1)
    return jax.tree.map(lambda a: a[idx], tree)

  def step(states, data):
    if len(starts) == 1:
      return one(hypers, states, data)
    outs = [one(part(hypers, i), part(states, i), data) for i in starts]
    keep = num_variants - starts[-1]
    return jax.tree.map(lambda *parts: jnp.concatenate(
        [*parts[:-1], parts[-1][:keep]]), *outs)

  step.program_bytes = lambda: program_bytes(compiled[0]) if compiled else None
  return step


def choose(round_of: Callable[[Any, Any, Any], tuple[Any, Any]], hypers: Any, states: Any,
           data: Any, *, budget: int | None = None, fraction: float = 0.8
           ) -> tuple[int, Callable, dict[str, Any]]:
  """The chunk a driver should run a sweep's rounds with, and its step (`dispatched`).

  Candidates: every variant at once if its compiled program fits `fraction` of
  `budget` bytes (default `available_memory()`), else the largest power-of-two
  share that fits; and, on a CPU, one variant at a time. Each candidate runs one
  round on `states` (results dropped) after compiling, and the faster is kept.

  Returns:
    `(chunk, step, report)`: the report gives the bytes measured, the budget and
    the seconds of each candidate's round, to say why.
  """
  budget = available_memory() if budget is None else budget
  size = jax.tree.leaves(states)[0].shape[0]
  report = {"budget_bytes": int(budget), "all_at_once_bytes": None, "seconds": {}}

  def timed(chunk):
    step = dispatched(round_of, hypers, size, chunk)
    jax.block_until_ready(step(states, data))   # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(step(states, data))
    report["seconds"][chunk] = round(time.perf_counter() - t0, 6)
    return step

  step = timed(size)
  need = report["all_at_once_bytes"] = step.program_bytes()
  big = size
  if need is not None and need > fraction * budget:
    big = max(1, int(size * fraction * budget / need))
    big = 1 << (big.bit_length() - 1)
    step = timed(big)
  best = (big, step)
  if big > 1 and jax.devices()[0].platform == "cpu":
    one = timed(1)
    if report["seconds"][1] < report["seconds"][big]:
      best = (1, one)
  report["chunk"] = best[0]
  report["fits_at_once"] = big == size
  return best[0], best[1], report


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
  """`{"mean", "std", "ci95", "n"}` of one number over seeds.

  `std` is the sample standard deviation (ddof = 1) and `ci95` the half-width of the
  confidence interval of the mean, t_{(1+level)/2, n−1} · std / √n; both are None for
  n = 1. Non-finite values are kept (the mean is then non-finite too), not dropped.
  """
  x = np.asarray(values, np.float64)
  n = int(x.size)
  if n == 0:
    raise ValueError("interval needs at least one value; got none.")
  if n == 1:
    return {"mean": float(x[0]), "std": None, "ci95": None, "n": 1}
  import scipy.stats  # here: 0.75 s of every process start otherwise

  std = float(np.std(x, ddof=1))
  half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))
  return {"mean": float(np.mean(x)), "std": std, "ci95": half, "n": n}
