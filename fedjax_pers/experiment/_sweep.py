"""The config's `sweep.*`: the variants of a run, their traced round, and the summary
across seeds (`fedjax_pers.sweep` is the library side)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_pers import sweep

# Sections whose numbers shape the data, the program or the run rather than a round.
FIXED = ("data", "execution", "distributed", "sweep", "privacy", "secure_aggregation",
         "compression", "system", "corruption", "model")
# The summary's numbers reported across seeds.
ACROSS = ("final_test_accuracy", "mean_client_test_accuracy", "worst10_client_test_accuracy",
          "variance_client_test_accuracy", "final_test_loss", "final_train_loss",
          "best_test_accuracy", "personalized_test_accuracy",
          "best_personalized_test_accuracy", "mean_client_gain", "fraction_clients_improved",
          "clean_client_test_accuracy")


class Variant(NamedTuple):
  """One run of a sweep: its `seed` and its swept `values` (config key → number)."""

  seed: int
  values: tuple[tuple[str, float], ...]

  @property
  def name(self) -> str:
    return ",".join([f"{k}={v:g}" for k, v in self.values] + [f"seed={self.seed}"])


def _parse_values(spec: str, config: ml_collections.ConfigDict) -> list[tuple[str, list]]:
  """`"key=v1,v2; key2=w1,w2"` → `[(key, [v1, v2]), (key2, [w1, w2])]`, checked."""
  out = []
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    if "=" not in part:
      raise ValueError(f"sweep.grid={spec!r}: expected 'key=v1,v2,...' parts separated "
                       f"by ';'; got {part!r}.")
    key, vals = (s.strip() for s in part.split("=", 1))
    section = key.split(".")[0]
    if section in FIXED or key == "seed":
      raise ValueError(f"sweep.grid: {key!r} cannot be swept in one program ({section!r} "
                       "shapes the data or the run; seeds: sweep.seeds).")
    try:
      current = config
      for p in key.split("."):
        current = current[p]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"sweep.grid: unknown config key {key!r}.") from None
    if not isinstance(current, float):
      raise ValueError(f"sweep.grid: {key!r} must be a float key (the program's shapes "
                       f"may not change); its value is {current!r}.")
    try:
      nums = [float(v) for v in vals.split(",")]
    except ValueError:
      raise ValueError(f"sweep.grid: {key!r} needs numbers separated by ','; got "
                       f"{vals!r}.") from None
    if any(k == key for k, _ in out):
      raise ValueError(f"sweep.grid: {key!r} is given twice.")
    out.append((key, nums))
  return out


def variants(config: ml_collections.ConfigDict) -> list[Variant] | None:
  """Every variant of `config.sweep` (values crossed, then seeds), or None for one run."""
  c = config.get("sweep")
  if c is None:
    return None
  seeds = c.seeds
  if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
    raise ValueError(f"sweep.seeds must be a positive int; got {seeds!r}.")
  chunk = c.get("chunk")
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    raise ValueError(f"sweep.chunk must be a positive int or None; got {chunk!r}.")
  swept = _parse_values(c.grid or "", config)
  if seeds == 1 and not swept:
    return None
  keys = [k for k, _ in swept]
  return [Variant(config.seed + s, tuple(zip(keys, combo)))
          for combo in itertools.product(*[v for _, v in swept]) for s in range(seeds)]


def config_of(config: ml_collections.ConfigDict, variant: Variant) -> ml_collections.ConfigDict:
  """`config` as the run made alone with `variant`'s seed and values (no sweep)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = variant.seed
  c.sweep.seeds, c.sweep.grid = 1, ""
  for key, value in variant.values:
    _set(c, key, value)
  return c


def _set(c: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets the dotted `key` of `c` (it exists: `variants` checked it)."""
  *path, leaf = key.split(".")
  for p in path:
    c = c[p]
  c[leaf] = value


def traced_config(config: ml_collections.ConfigDict, keys: tuple[str, ...], h: jax.Array
                  ) -> ml_collections.ConfigDict:
  """`config` with `keys` set to the traced scalars `h[i]` (`h`: an array or a tuple of
  scalars; factories skip their checks of traced numbers:
  every variant's concrete config was checked first)."""
  c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  for i, key in enumerate(keys):
    _set(c, key, h[i])
  return c


def _used_inputs(closed) -> list[bool] | None:
  """Which inputs of a jaxpr its outputs depend on, after dead-code elimination (None
  where this JAX has no `dce_jaxpr`)."""
  try:
    from jax._src.interpreters.partial_eval import dce_jaxpr
  except ImportError:   # pragma: no cover (a JAX without it: the check is skipped)
    return None
  _, used = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return list(used)


def round_of(config: ml_collections.ConfigDict, keys: tuple[str, ...],
             build: Callable[[ml_collections.ConfigDict], Any]) -> Callable:
  """`(h, state, data) -> (state, metrics)`: the round of the algorithm `build` makes
  from `config` with `keys` at `h` (seeds only: `keys` empty, `h` unused)."""

  def one(h, state, data):
    alg = build(traced_config(config, keys, h) if keys else config)
    return alg.round(state, data)

  return one


def check_traceable(one: Callable, keys: tuple[str, ...], h0, state, data,
                    algorithm: str) -> None:
  """Refuses swept keys that a round reads as Python numbers (they would change the
  program) or does not read at all (every variant would be the same run)."""
  if not keys:
    return
  try:
    closed = jax.make_jaxpr(lambda *hs: one(hs, state, data))(*h0)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
          jax.errors.TracerIntegerConversionError) as e:
    raise ValueError(f"sweep.grid: algorithm={algorithm!r} uses {', '.join(keys)} as a "
                     "Python number (it decides the program's structure), so it cannot be "
                     "swept in one program; run the settings as separate runs (compare). "
                     f"({type(e).__name__})") from None
  used = _used_inputs(closed) or [True] * len(keys)
  for key, read in zip(keys, used[:len(keys)]):
    if not read:
      raise ValueError(f"sweep.grid: algorithm={algorithm!r} does not read {key!r}; every "
                       "variant would be the same run.")


def summarize(config, variants_: list[Variant], summaries: list[dict[str, Any]],
              records: list[list[dict[str, Any]]]) -> dict[str, Any]:
  """The sweep's summary: per group of equal values, `interval` of each number of
  `ACROSS` over its seeds; with seeds only, the means of every float and per-client
  list of the runs' summaries at the top level (a sweep reads like one run whose
  figures are means over seeds; `compare` reads it so) and `"sweep"` holds the rest."""
  groups: dict[tuple, list[int]] = {}
  for i, v in enumerate(variants_):
    groups.setdefault(v.values, []).append(i)
  out_groups = []
  for values, idx in groups.items():
    g = {"values": dict(values), "seeds": [variants_[i].seed for i in idx],
         "variants": [variants_[i].name for i in idx]}
    for key in ACROSS:
      vals = [summaries[i].get(key) for i in idx]
      if all(isinstance(x, (int, float)) for x in vals):
        g[key] = sweep.interval(vals)
    out_groups.append(g)
  result = {"num_variants": len(variants_), "seeds": config.sweep.seeds,
            "grid": config.sweep.grid, "groups": out_groups}
  if len(out_groups) == 1:   # seeds only: the means read as the run's figures
    means = {k: float(np.mean([s[k] for s in summaries])) for k, v in summaries[0].items()
             if isinstance(v, float) and all(isinstance(s.get(k), float) for s in summaries)}
    means.update({k: np.mean([s[k] for s in summaries], axis=0).tolist()
                  for k in summaries[0] if k.startswith("per_client")})
    return {**means, "sweep": result, "config": config.to_dict()}
  return {"sweep": result, "config": config.to_dict()}


def mean_records(records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """The seeds' evaluations averaged round by round (the numbers every seed has)."""
  out = []
  for rows in zip(*records):
    rec = {"round": rows[0]["round"]}
    for key, value in rows[0].items():
      if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
        rec[key] = float(np.mean([r[key] for r in rows]))
    out.append(rec)
  return out


def plot_bands(variants_: list[Variant], records: list[list[dict[str, Any]]], path: str,
               title: str = "") -> None:
  """Test accuracy and loss against round: each group's mean over seeds, a band of ± one
  standard deviation and a lighter one of the 95% interval of the mean."""
  groups: dict[tuple, list[int]] = {}
  for i, v in enumerate(variants_):
    groups.setdefault(v.values, []).append(i)
  from fedjax_pers.experiment._outputs import figure

  fig, axes = figure(1, 2, figsize=(10, 4))
  spans: dict[str, list[float]] = {}   # the ± std bands' extent: the axes' limits
  for values, idx in groups.items():
    label = ", ".join(f"{k}={v:g}" for k, v in values) or "mean"
    label += f" ({len(idx)} seeds)"
    for ax, key in zip(axes, ("test_accuracy", "test_loss")):
      rounds = [r["round"] for r in records[idx[0]]]
      stats = [sweep.interval([records[i][t][key] for i in idx]) for t in range(len(rounds))]
      mean = np.array([s["mean"] for s in stats])
      line, = ax.plot(rounds, mean, label=label)
      if len(idx) > 1:
        std = np.array([s["std"] for s in stats])
        ci = np.array([s["ci95"] for s in stats])
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.25)
        for edge in (mean - ci, mean + ci):   # the interval as dashed edges (wide for few seeds)
          ax.plot(rounds, edge, "--", color=line.get_color(), linewidth=0.8, alpha=0.7)
        spans.setdefault(key, []).extend([np.min(mean - std), np.max(mean + std)])
  for ax, name in zip(axes, ("test accuracy", "test loss")):
    ax.set_xlabel("round")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  if "test_accuracy" in spans:
    lo, hi = min(spans["test_accuracy"]), max(spans["test_accuracy"])
    axes[0].set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.05))
  if "test_loss" in spans and min(spans["test_loss"]) > 0:
    axes[1].set_ylim(min(spans["test_loss"]) / 1.2, max(spans["test_loss"]) * 1.2)
  axes[0].legend(fontsize=8)
  fig.suptitle(title + "  (mean; band: ± std; dashed: 95% CI of the mean)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def table(summary: dict[str, Any]) -> str:
  """A sweep's summary as a Markdown table: a row per group of equal values, each number
  as mean ± std [95% interval of the mean] over its seeds."""
  groups = summary["sweep"]["groups"]
  keys = [k for k in ("final_test_accuracy", "best_test_accuracy", "worst10_client_test_accuracy",
                      "final_test_loss", "personalized_test_accuracy") if k in groups[0]]
  head = ["values", "seeds"] + keys
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    cells = [", ".join(f"{k}={v:g}" for k, v in g["values"].items()) or "-",
             str(len(g["seeds"]))]
    for k in keys:
      s = g[k]
      cells.append(f"{s['mean']:.4f}" if s["std"] is None else
                   f"{s['mean']:.4f} ± {s['std']:.4f} [± {s['ci95']:.4f}]")
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)
