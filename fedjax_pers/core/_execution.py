"""`Execution`: how a round's cohort runs, one value that every algorithm accepts.

What a client computes is its algorithm's business (a `LocalProgram`); how the
clients of a round are laid out over lanes, chunks and devices, and which
clients are drawn, is this value's. Execution features never touch an
algorithm file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Params = Any
STRATEGIES = ("auto", "vmap", "chunked", "scan", "lanes")
CLIENTS_AXIS = "clients"
# On CPU, a cohort of models with at least this many parameters runs faster as a
# loop over clients than as batched matmuls (see benchmarks/round_throughput.py).
AUTO_SCAN_MIN_PARAMS = 20_000
# On CPU a lane-step costs about what a step of one client alone does: lanes pay for
# their upkeep only from a few lanes on (w3: 4 lanes beat one client at a time; FedProx's
# 2 lanes lose to it by 20%).
AUTO_MIN_CPU_LANES = 4


def replicated(tree: Any, mesh: Mesh) -> Any:
  """`tree` put whole on every device of `mesh`, across processes too.

  One process: `jax.device_put`. Several (`jax.distributed`): a mesh spans
  devices this process cannot address, so each process fills its own devices from
  its own copy (`from_own_shards`); every process must hold the same values (they
  build them from the same seeds).
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return from_own_shards(tree, sharding)


def host_put(sharding: NamedSharding | None) -> Callable[[Any], jax.Array]:
  """A function putting host arrays (a pytree) where `sharding` says (the default device for
  None), every process from its own copy.

  Over several processes `jax.device_put` checks that they agree with a collective;
  a collective on the feed's thread can interleave with the round's and hang or break
  the run, so this one builds the array from this process's shards
  (`jax.make_array_from_callback`) and talks to nobody.
  """
  if sharding is None:
    return jax.device_put
  if jax.process_count() == 1:
    return lambda a: jax.device_put(a, sharding)
  return lambda tree: from_own_shards(tree, sharding)


def from_own_shards(tree: Any, sharding: NamedSharding) -> Any:
  """`tree`'s arrays (host or this process's, PRNG keys too) as global arrays laid out by
  `sharding`, each process filling only the shards of its own devices from its own copy
  (no collective)."""

  def put(a):
    if jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(a)),
                                      impl=jax.random.key_impl(a))
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  return jax.tree.map(put, tree)


def _positive_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


@dataclasses.dataclass(frozen=True)
class System:
  """Simulated system heterogeneity of a round's cohort (FedProx's experiments, Li et al.,
  MLSys 2020, §5.2): stragglers and clients that drop out.

  Attributes:
    straggler_fraction: Fraction of each cohort (rounded to whole clients) that
      straggles: client i does `⌈j_i S_i / levels⌉` of its `S_i` local steps,
      `j_i` uniform in {1, ..., levels} (with `levels` = the local epochs E, a
      straggler runs a whole number of epochs in [1, E], as in the paper).
    levels: The grain of a straggler's work (see above).
    drop_stragglers: Stragglers are left out of the aggregate and train nothing
      (FedAvg in the paper) instead of sending their partial work (FedProx).
    dropout_rate: Probability that a sampled client never reports: it trains
      nothing and weighs 0; the round still runs and counts it.
  """

  straggler_fraction: float = 0.0
  levels: int = 1
  drop_stragglers: bool = False
  dropout_rate: float = 0.0

  def __post_init__(self):
    for name, v in (("straggler_fraction", self.straggler_fraction),
                    ("dropout_rate", self.dropout_rate)):
      ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
      if not ok or (name == "dropout_rate" and v == 1):
        raise ValueError(f"system.{name} must be a number in "
                         f"{'[0, 1)' if name == 'dropout_rate' else '[0, 1]'}; got {v!r}.")
    if not _positive_int(self.levels):
      raise ValueError(f"system.levels must be an int >= 1; got {self.levels!r}.")
    if not isinstance(self.drop_stragglers, bool):
      raise ValueError(f"system.drop_stragglers must be a bool; got {self.drop_stragglers!r}.")

  @property
  def active(self) -> bool:
    """Whether anything is simulated (a `System()` round is the plain round, bit for bit)."""
    return self.straggler_fraction > 0 or self.dropout_rate > 0


@dataclasses.dataclass(frozen=True, eq=False)
class Execution:
  """How the sampled clients of a round execute (never what they compute).

  Strategies (`strategy`):

  * `vmap`: all clients side by side, until the longest has finished;
  * `chunked`: `client_chunk` clients at a time (`lax.map`), vmapped inside;
  * `scan`: one client at a time, each for its own steps;
  * `lanes`: continuous batching: `lanes` clients side by side per device, each
    lane taking the next client as soon as its own finishes (`core/_lanes.py`);
  * `auto` (default): `scan` for large models on CPU (one client's plain
    matmuls beat XLA:CPU's batched ones), else `vmap` with `differentiable`, or
    when every client takes the same number of steps (or the sizes are unknown),
    and, when they differ, `vmap` on a GPU or TPU (lock-step batches cost about one
    client's step there) and on CPU `lanes`, unless that is fewer than
    `AUTO_MIN_CPU_LANES` lanes (then `scan`).

  Unless `differentiable`, every client stops after its last real step
  (`lax.while_loop`), so a round costs the clients' real steps (up to the
  lockstep of `vmap` and `chunked`). With `differentiable=True` each client runs
  the longest client's number of steps as a masked `lax.scan`, the same results,
  which reverse-mode `jax.grad` can go through (`fedjax_pers.hypergrad` asks for
  it); `lanes` is then refused.

  Attributes:
    strategy: One of `STRATEGIES`.
    client_chunk: Clients per chunk (`chunked` only).
    lanes: Lanes per device (`lanes`, and `auto` when it picks lanes); None:
      `⌈k_d · mean_i S_i / max_i S_i⌉` for `k_d` clients per device and the
      population's steps `S_i`, so that lanes are rarely idle.
    mesh: Optional mesh with a `clients` axis: the cohort is sharded over its
      devices, balanced by steps (see `fedjax_pers.distributed.client_mesh`).
    sampling_probs: Optional `[N]` non-negative client sampling weights
      (default: uniform cohorts).
    poisson_rate: Optional `q` in (0, 1]: Poisson sampling, each client taking
      part with probability `q` independently; the round's `clients_per_round`
      is then the static number of slots `K` (`poisson_max_cohort`), the
      absent slots masked (`core._sampling.poisson_cohort`).
    system: Optional `System`: stragglers and dropouts in each cohort.
    differentiable: Run the masked, fixed-length path (see above).

  Example:

    >>> import fedjax_pers as fp
    >>> ex = fp.Execution(strategy="lanes", lanes=8)
    >>> ex.lanes, ex.differentiable, ex.num_devices
    (8, False, 1)
    >>> fp.Execution(strategy="lanes", differentiable=True)
    Traceback (most recent call last):
    ...
    ValueError: Execution strategy='lanes' runs a while loop, which reverse-mode jax.grad ...
  """

  strategy: str = "auto"
  client_chunk: int | None = None
  lanes: int | None = None
  mesh: Mesh | None = None
  sampling_probs: np.ndarray | None = None
  differentiable: bool = False
  poisson_rate: float | None = None
  system: System | None = None

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"Execution strategy must be one of {STRATEGIES}; got "
                       f"{self.strategy!r}.")
    if self.client_chunk is not None and not _positive_int(self.client_chunk):
      raise ValueError(f"Execution client_chunk must be a positive int; got "
                       f"{self.client_chunk!r}.")
    if self.strategy == "chunked" and self.client_chunk is None:
      raise ValueError("Execution strategy='chunked' needs client_chunk, a positive int; got "
                       "None.")
    if self.lanes is not None and not _positive_int(self.lanes):
      raise ValueError(f"Execution lanes must be an int >= 1; got {self.lanes!r}.")
    if self.mesh is not None and (not isinstance(self.mesh, Mesh)
                                  or CLIENTS_AXIS not in self.mesh.axis_names):
      axes = getattr(self.mesh, "axis_names", None)
      raise ValueError(f"Execution mesh must be a jax.sharding.Mesh with an axis named "
                       f"{CLIENTS_AXIS!r}; got axes {axes}.")
    if not isinstance(self.differentiable, bool):
      raise ValueError(f"Execution differentiable must be a bool; got "
                       f"{self.differentiable!r}.")
    if self.differentiable and self.strategy == "lanes":
      raise ValueError("Execution strategy='lanes' runs a while loop, which reverse-mode "
                       "jax.grad cannot go through; with differentiable=True use 'auto', "
                       "'vmap', 'chunked' or 'scan'.")
    if self.sampling_probs is not None:
      p = np.asarray(self.sampling_probs, np.float64)
      if p.ndim != 1 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(
            "Execution sampling_probs must be a 1-D array of finite, non-negative weights, "
            f"not all zero; got shape {p.shape}, min {p.min() if p.size else None}.")
    if self.poisson_rate is not None:
      q = self.poisson_rate
      if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1):
        raise ValueError(f"Execution poisson_rate must be a number in (0, 1]; got {q!r}.")
      if self.sampling_probs is not None:
        raise ValueError("Execution poisson_rate and sampling_probs are two ways to sample a "
                         "cohort; give one.")

    if self.system is not None and not isinstance(self.system, System):
      raise ValueError(f"Execution system must be a fedjax_pers.core.System; got "
                       f"{self.system!r}.")

  @property
  def num_devices(self) -> int:
    """Devices on the mesh's `clients` axis (1 without a mesh)."""
    return 1 if self.mesh is None else self.mesh.shape[CLIENTS_AXIS]


def as_execution(execution: Execution | None) -> Execution:
  """`execution`, or the default `Execution()` for None; anything else is refused."""
  if execution is None:
    return Execution()
  if not isinstance(execution, Execution):
    raise ValueError(f"execution must be a fedjax_pers.Execution; got "
                     f"{type(execution).__name__} {execution!r}.")
  return execution


class Plan(NamedTuple):
  """A concrete way to run one cohort (see `plan`).

  Attributes:
    strategy: `vmap`, `chunked`, `scan` or `lanes`.
    client_chunk: Chunk size (`chunked`).
    lanes: Lanes per device (`lanes`).
    differentiable: Masked fixed-length steps instead of while loops.
    plans_one_by_one: Build clients' batch plans one at a time (`lax.map`), where
      each sorts only what the client holds: on CPU when clients' sizes span
      several width classes (`core._batching.width_classes`).
  """

  strategy: str
  client_chunk: int | None
  lanes: int | None
  differentiable: bool
  plans_one_by_one: bool = False


def is_large(params: Params) -> bool:
  """Whether a model has at least `AUTO_SCAN_MIN_PARAMS` parameters."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) >= (
      AUTO_SCAN_MIN_PARAMS)


def auto_lanes(counts: np.ndarray, per_device: int) -> int:
  """Lanes that keep idle lane-steps few: `⌈k_d · mean S / max S⌉`, in `[1, k_d]`."""
  counts = np.asarray(counts, np.float64)
  top = counts.max() if counts.size else 0.0
  if top <= 0:
    return 1
  return int(min(per_device, max(1, np.ceil(per_device * counts.mean() / top - 1e-9))))


def plan(execution: Execution, params: Params, counts: np.ndarray | None,
         cohort: int, *, size_classes: int = 1) -> Plan:
  """Resolves `auto` and the lane count for one round.

  Args:
    execution: The `Execution`.
    params: The global params (their size matters on CPU).
    counts: The population's steps per client (host NumPy; None if unknown,
      then treated as all equal).
    cohort: Clients per round, padded to a multiple of the devices.
    size_classes: Width classes the clients' sizes span (plans are built one
      client at a time on CPU when there are several).

  Returns:
    A `Plan`.
  """
  e = execution
  per_device = max(1, cohort // e.num_devices)
  lanes = e.lanes if e.lanes is not None else (
      per_device if counts is None else auto_lanes(counts, per_device))
  strategy = e.strategy
  if strategy == "auto":
    on_cpu = jax.default_backend() == "cpu"
    # Unknown sizes (data built by hand): the padded-free vmap, as if uniform.
    uniform = counts is None or counts.size == 0 or counts.min() == counts.max()
    if on_cpu and is_large(params):
      strategy = "scan"
    elif e.differentiable or uniform:
      strategy = "vmap"
    elif not on_cpu:
      # An accelerator runs a lock-step batch of clients in about one client's step, so
      # fewer executed steps (lanes, scan) lose to all clients at once (measured on an
      # H200: README, "On a GPU").
      strategy = "vmap"
    else:   # few lanes: one client at a time does the same steps without their upkeep
      strategy = "lanes" if min(lanes, per_device) >= AUTO_MIN_CPU_LANES else "scan"
  return Plan(strategy, e.client_chunk if strategy == "chunked" else None,
              min(lanes, per_device) if strategy == "lanes" else None, e.differentiable,
              plans_one_by_one=jax.default_backend() == "cpu" and size_classes > 1)
