"""Running a cohort's `LocalProgram`s: vmap, chunks, one at a time, or lanes; sharded.

`execute_cohort` runs every client of a round by a `Plan` (see `_execution.py`).
With a mesh whose axis is named `clients`, the cohort is split over devices by
`shard_map`; each device runs its share with the same plan and sums across
devices become XLA collectives. Unless the plan is differentiable, the cohort
is first dealt to the devices by the longest-processing-time rule on the
clients' steps, with the same number of clients on every device, so that no
device waits for one that drew the large clients. On a CPU split into one
device per core (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) this is
how independent clients use every core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedjax_pers.core._client import ClientData, ClientOutput
from fedjax_pers.core._execution import CLIENTS_AXIS, Plan
from fedjax_pers.core._lanes import run_lanes
from fedjax_pers.core._program import LocalProgram, cohort_steps, num_plan_steps, run_client

Params = Any


class CohortSource(NamedTuple):
  """Where a cohort's rows come from (see `core/_source.py`).

  Attributes:
    rows: `rows(ids) -> ClientData`, the stacked rows, state and ids of clients
      `ids` (for `start` and `finish`; XLA drops what they do not read).
    sizes: `[N]` int32, every client's number of examples (true sizes).
    table: The arrays the steps read batches from (replicated over a mesh).
    handles: `handles(ids)`: per client, stacked, where its rows are in `table`.
    read: `read(table, handle, idx) -> (x, y)`, a client's rows at slots `idx`.
    deal: None, or a host feed's deal of the padded cohort (`FederatedData.deal`):
      the round runs it instead of `balance`; `table`'s rows are the dealt
      clients, split over the mesh, each device reading its own rows (its
      handles are those rows' local positions).
  """

  rows: Callable[[jax.Array], ClientData]
  sizes: jax.Array
  table: Any
  handles: Callable[[jax.Array], Any]
  read: Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]
  deal: jax.Array | None = None


class CohortResult(NamedTuple):
  """A cohort's outputs, stacked over the (padded) cohort in the order of its ids.

  Attributes:
    outputs: Stacked outputs of `finish` (`ClientOutput`s, whose `num_steps` is
      set; `delta` is None when streamed).
    score_sum: `(Σ u_i Δ_i, Σ u_i)` when streamed, else None.
    scores: `[k]` scores `u_i` when streamed, else None.
    real_steps: Σ over valid clients of their steps that hold a real example.
    executed_steps: Client-steps the compiled round computed (padded steps, or
      lane-steps), summed over devices.
  """

  outputs: Any
  score_sum: tuple[Params, jax.Array] | None
  scores: jax.Array | None
  real_steps: jax.Array
  executed_steps: jax.Array


def step_counts(program: LocalProgram, sizes: jax.Array, ids: jax.Array) -> jax.Array:
  """`[k]` int32 steps of clients `ids` (`program.num_steps` on their sizes and ids)."""
  light = ClientData(x=None, y=None, num_examples=sizes[ids], id=ids)
  return jnp.broadcast_to(jnp.asarray(program.num_steps(light), jnp.int32), ids.shape)


def balance(counts: jax.Array, num_devices: int) -> jax.Array:
  """A permutation dealing `k` clients to `d` devices, `k / d` each, by steps.

  Clients in decreasing order of steps go one by one to the device with the
  least work so far among those not yet full (longest processing time first).

  Returns:
    `perm[k]`: device j runs clients `perm[j k/d : (j+1) k/d]`.
  """
  k = counts.shape[0]
  per = k // num_devices
  order = jnp.argsort(-counts, stable=True).astype(jnp.int32)
  big = jnp.iinfo(jnp.int32).max

  def deal(state, c):
    load, fill = state
    j = jnp.argmin(jnp.where(fill < per, load, big))
    return (load.at[j].add(counts[c]), fill.at[j].add(1)), j * per + fill[j]

  zeros = jnp.zeros((num_devices,), jnp.int32)
  _, slots = jax.lax.scan(deal, (zeros, zeros), order)
  return jnp.zeros((k,), jnp.int32).at[slots].set(order)


def balance_on_host(counts: np.ndarray, num_devices: int) -> np.ndarray:
  """`balance` in NumPy (the same permutation), for a feed that deals ahead."""
  counts = np.asarray(counts, np.int64)
  per = counts.shape[0] // num_devices
  load = np.zeros(num_devices, np.int64)
  fill = np.zeros(num_devices, np.int64)
  perm = np.zeros(counts.shape[0], np.int32)
  for c in np.argsort(-counts, kind="stable"):
    j = int(np.argmin(np.where(fill < per, load, np.iinfo(np.int64).max)))
    perm[j * per + fill[j]] = c
    load[j] += counts[c]
    fill[j] += 1
  return perm


def _chunk_cost(counts: jax.Array, chunk: int) -> jax.Array:
  """Σ over chunks of `chunk · max(count in chunk)` (chunks in order, the last short)."""
  k = counts.shape[0]
  pad = -k % chunk
  padded = jnp.concatenate([counts, jnp.zeros((pad,), counts.dtype)]).reshape(-1, chunk)
  sizes = jnp.minimum(chunk, k - chunk * jnp.arange(padded.shape[0]))
  return jnp.sum(sizes * jnp.max(padded, axis=1))


def _stream(program, params, clients, keys, valid, handles, reader, score, differentiable):
  """Clients one at a time, accumulating `Σ u_i Δ_i` instead of stacking Δ.

  `u_i = score(output_i)`, zero for non-finite or padding (`valid=False`) clients.
  """

  def body(carry, args):
    acc, total = carry
    client, key, ok, handle = args
    out, count = run_client(program, params, client, key, differentiable=differentiable,
                            active=True if differentiable else ok,
                            read=reader(handle))
    use = out.finite & ok
    u = jnp.where(use, score(out), 0.0)
    acc = jax.tree.map(lambda a, d: a + u * jnp.where(use, d, 0.0), acc, out.delta)
    return (acc, total + u), ((out._replace(delta=None), count), u)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (acc, total), (outputs, u) = jax.lax.scan(
      body, (zeros, jnp.zeros(())), (clients, keys, valid, handles))
  return outputs, (acc, total), u


def _lanes(program, params, clients, keys, valid, handles, reader, lanes, one_by_one):
  steps = cohort_steps(program, params, clients, keys, one_by_one=one_by_one)
  carry0 = jax.vmap(lambda c, k: program.start(params, c, k)[0])(clients, keys)
  counts = jnp.where(valid, jax.vmap(lambda c: jnp.asarray(program.num_steps(c), jnp.int32)
                                     )(clients), 0)
  read = lambda handle_idx: reader(handle_idx[0])(handle_idx[1])
  result = run_lanes(program, params, carry0, steps, counts, handles, read, lanes=lanes)
  outputs = jax.vmap(program.finish, (None, 0, 0))(params, clients, result.carries)
  return (outputs, counts), result.lane_steps


def _own_rows(handle):
  """A reader of the client's own gathered rows (`handles` None: the handle is the client)."""
  return lambda idx: (handle.x[idx], handle.y[idx])


def run_cohort(program: LocalProgram, params: Params, clients: ClientData, keys: jax.Array,
               valid: jax.Array, *, plan: Plan,
               score: Callable[[ClientOutput], jax.Array] | None = None,
               handles: Any = None,
               reader: Callable[[Any], Callable[[jax.Array], tuple]] | None = None):
  """Runs a cohort on one device by `plan`.

  The steps read client i's batch at slots `idx` as `reader(handles[i])(idx)`
  (default: from `clients`' own rows).

  Returns:
    `((outputs, counts), (Σ u_i Δ_i, Σ u_i) or None, u or None, executed_steps)`,
    `counts[k]` each client's steps that did work; the cohort is streamed (no
    stacked deltas) when `plan.strategy == 'scan'` and `score` is set.
  """
  if reader is None:
    handles, reader = clients, _own_rows
  diff = plan.differentiable
  one = lambda args: run_client(program, params, args[0], args[1], differentiable=diff,
                                active=True if diff else args[2], steps=args[4],
                                read=reader(args[3]))
  k = keys.shape[0]
  if plan.strategy == "lanes":
    outputs, executed = _lanes(program, params, clients, keys, valid, handles, reader,
                               plan.lanes, plan.plans_one_by_one)
    return outputs, None, None, executed
  if plan.strategy == "scan" and score is not None:
    outputs, acc, u = _stream(program, params, clients, keys, valid, handles, reader, score,
                              diff)
  elif plan.strategy in ("vmap", "chunked"):   # plans first, then the steps side by side
    steps = cohort_steps(program, params, clients, keys, one_by_one=plan.plans_one_by_one)
    args = (clients, keys, valid, handles, steps)
    if plan.strategy == "vmap":
      outputs = jax.vmap(one)(args)
    else:
      outputs = jax.lax.map(one, args, batch_size=plan.client_chunk)
    acc, u = None, None
  elif plan.strategy == "scan":
    outputs = jax.lax.map(lambda a: one((*a, None)), (clients, keys, valid, handles))
    acc, u = None, None
  else:
    raise ValueError(f"plan.strategy must be vmap, chunked, scan or lanes; got "
                     f"{plan.strategy!r}.")
  counts = outputs[1]
  if diff:
    steps = jax.eval_shape(lambda c, key: program.start(params, c, key)[1],
                           jax.tree.map(lambda a: a[0], clients), keys[0])
    executed = jnp.int32(k * num_plan_steps(steps))
  elif plan.strategy == "vmap":
    executed = k * jnp.max(counts)
  elif plan.strategy == "chunked":
    executed = _chunk_cost(counts, plan.client_chunk)
  else:
    executed = jnp.sum(counts)
  return outputs, acc, u, executed.astype(jnp.int32)


def execute_cohort(program: LocalProgram, params: Params, source: CohortSource,
                   ids: jax.Array, valid: jax.Array, key: jax.Array, *, plan: Plan,
                   mesh: Mesh | None = None,
                   score: Callable[[ClientOutput], jax.Array] | None = None) -> CohortResult:
  """Runs the clients `ids` of a round by `plan`, sharded over `mesh` if given.

  Args:
    program: The clients' `LocalProgram`.
    params: Global params.
    source: Where the clients' rows come from.
    ids: `[k]` client indices; with a mesh, `k` is a multiple of its devices.
    valid: `[k]` bool, False for padding clients (they run no step and get
      score 0).
    key: The round's client key; client c's key is `fold_in(key, c)`.
    plan: How the cohort runs.
    mesh: Optional mesh with a `clients` axis.
    score: Per-client score of a separable weighting (streamed by `scan`), or None.

  Returns:
    A `CohortResult` in the order of `ids`.
  """
  d = 1 if mesh is None else mesh.shape[CLIENTS_AXIS]
  perm = None
  if source.deal is not None:
    if d == 1 or plan.differentiable or source.deal.shape != ids.shape:
      raise ValueError(
          f"data.deal {source.deal.shape} lays a cohort of {ids.shape[0]} over a mesh; this "
          f"round runs on {d} device(s){' with a differentiable plan' * plan.differentiable}"
          ", which takes no deal: gather the cohort without one (CohortFeed without mesh).")
    perm = source.deal
  elif d > 1 and not plan.differentiable:
    counts = jnp.where(valid, step_counts(program, source.sizes, ids), 0)
    perm = balance(counts, d)
  if perm is not None:
    ids, valid = ids[perm], valid[perm]
  clients = source.rows(ids)
  # A dealt table: device j holds rows j k/d ... (j+1) k/d - 1, read at local positions.
  handles = (source.handles(ids) if source.deal is None
             else jnp.arange(ids.shape[0]) % (ids.shape[0] // d))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)

  def local(params, table, clients, keys, valid, handles):
    reader = lambda handle: lambda idx: source.read(table, handle, idx)
    outputs, acc, u, executed = run_cohort(program, params, clients, keys, valid, plan=plan,
                                           score=score, handles=handles, reader=reader)
    if mesh is not None:
      executed = jax.lax.psum(executed, CLIENTS_AXIS)
      if acc is not None:
        acc = jax.lax.psum(acc, CLIENTS_AXIS)
    return outputs, acc, u, executed

  if mesh is not None:
    spec = P(CLIENTS_AXIS)
    streamed = plan.strategy == "scan" and score is not None
    out_specs = (spec, P(), spec if streamed else P(), P())
    table_spec = P() if source.deal is None else spec
    local = jax.shard_map(local, mesh=mesh, in_specs=(P(), table_spec, spec, spec, spec, spec),
                          out_specs=out_specs, check_vma=False)
  (outputs, counts), acc, u, executed = local(params, source.table, clients, keys, valid,
                                              handles)
  if perm is not None:
    back = jnp.argsort(perm)
    outputs, counts = jax.tree.map(lambda a: a[back], (outputs, counts))
    u = None if u is None else u[back]
    valid = valid[back]
  real = jnp.sum(jnp.where(valid, counts, 0), dtype=jnp.int32)
  if isinstance(outputs, ClientOutput):
    outputs = outputs._replace(num_steps=counts)
  return CohortResult(outputs=outputs, score_sum=acc, scores=u, real_steps=real,
                      executed_steps=executed)


def pad_cohort(idx: jax.Array, num_devices: int) -> tuple[jax.Array, jax.Array]:
  """Pads cohort indices to a multiple of `num_devices`.

  Returns:
    `(padded idx, valid)`: padding repeats the first clients and is marked
    invalid, so it never enters an aggregate (and, unless the plan is
    differentiable, runs no step). NumPy in, NumPy out (a host feed pads as
    the round does).
  """
  xp = np if isinstance(idx, np.ndarray) else jnp
  k = idx.shape[0]
  pad = -k % num_devices
  valid = xp.arange(k + pad) < k
  return xp.concatenate([idx, xp.resize(idx, (pad,))]), valid


def weighted_sum(weights: jax.Array, deltas: Params) -> Params:
  """`Σ_i w_i Δ_i` over the leading axis of each leaf."""
  return jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=1), deltas)


def safe_divide(x: jax.Array, total: jax.Array) -> jax.Array:
  """`x / total`, or zeros where `total` is not positive (nothing left to weight)."""
  ok = total > 0
  return jnp.where(ok, x / jnp.where(ok, total, 1.0), 0.0)


def normalize(scores: jax.Array, keep: jax.Array) -> jax.Array:
  """`u_i / Σ_j u_j` over the clients with `keep`; all zeros if none is left."""
  u = jnp.where(keep, scores, 0.0)
  return safe_divide(u, jnp.sum(u))


def zero_nonfinite(outputs: ClientOutput) -> Params:
  """Stacked deltas with non-finite clients' updates replaced by zeros."""
  mask = lambda d: outputs.finite.reshape((-1,) + (1,) * (d.ndim - 1))
  return jax.tree.map(lambda d: jnp.where(mask(d), d, 0.0), outputs.delta)
