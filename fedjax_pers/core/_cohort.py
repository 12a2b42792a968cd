"""Running a cohort: vmap, chunked `lax.map`, or `lax.scan`, optionally sharded.

The client update is written for one client; these functions decide how the `k`
clients of a round run. With a `Mesh` whose axis is named `clients`, the cohort
is split over devices by `shard_map`: each device runs its share with the same
strategy, and sums across devices become XLA collectives. On a CPU split into
one device per core (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) this
is also how independent clients use every core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedjax_pers.core._client import ClientData, ClientOutput, ClientUpdate

Params = Any
STRATEGIES = ("auto", "vmap", "chunked", "scan")
CLIENTS_AXIS = "clients"
# On CPU, a cohort of models with at least this many parameters runs faster as a
# loop over clients than as batched matmuls (see benchmarks/round_throughput.py).
AUTO_SCAN_MIN_PARAMS = 20_000


def check_strategy(strategy: str, client_chunk: int | None) -> None:
  """Raises `ValueError` for an unknown cohort strategy or a bad chunk size."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")
  if strategy == "chunked" and (not isinstance(client_chunk, int) or client_chunk < 1):
    raise ValueError(
        f"strategy='chunked' needs client_chunk, a positive int; got {client_chunk!r}.")


def check_mesh(mesh: Mesh | None) -> None:
  """Raises `ValueError` unless `mesh` is None or has a `clients` axis."""
  if mesh is not None and CLIENTS_AXIS not in mesh.axis_names:
    raise ValueError(
        f"mesh must have an axis named {CLIENTS_AXIS!r}; got axes {mesh.axis_names}.")


def resolve_strategy(strategy: str, params: Params) -> str:
  """Picks a concrete strategy for `'auto'`.

  Accelerators: `vmap` (a cohort fills the device). CPU: `vmap` for small models,
  where batching many tiny matmuls wins by far; `scan` from
  `AUTO_SCAN_MIN_PARAMS` parameters on, where XLA:CPU's batched matmuls are
  slower than one client's plain matmuls run in turn.
  """
  if strategy != "auto":
    return strategy
  if jax.default_backend() != "cpu":
    return "vmap"
  size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  return "scan" if size >= AUTO_SCAN_MIN_PARAMS else "vmap"


def run_cohort(
    client_update: ClientUpdate, params: Params, clients: ClientData, keys: jax.Array,
    *, strategy: str, client_chunk: int | None = None,
) -> ClientOutput:
  """Runs `client_update` for every client of a cohort; outputs are stacked.

  Args:
    client_update: The one-client function.
    params: Global params broadcast to all clients.
    clients: Stacked `ClientData` of the cohort, leading axis `k`.
    keys: `[k]` PRNG keys.
    strategy: `vmap`, `chunked` (`lax.map` over chunks of `client_chunk`
      clients, vmapped inside a chunk) or `scan` (one client at a time).
    client_chunk: Chunk size for `chunked`.

  Returns:
    Stacked `ClientOutput`, leading axis `k`.
  """
  fn = lambda args: client_update(params, *args)
  if strategy == "vmap":
    return jax.vmap(fn)((clients, keys))
  if strategy == "chunked":
    return jax.lax.map(fn, (clients, keys), batch_size=client_chunk)
  if strategy == "scan":
    return jax.lax.map(fn, (clients, keys))
  raise ValueError(f"strategy must be one of {STRATEGIES[1:]}; got {strategy!r}.")


def scan_score_sum(
    client_update: ClientUpdate, params: Params, clients: ClientData, keys: jax.Array,
    valid: jax.Array, score: Callable[[ClientOutput], jax.Array],
) -> tuple[Params, jax.Array, ClientOutput, jax.Array]:
  """Runs clients one at a time, accumulating `Σ u_i Δ_i` instead of stacking Δ.

  `u_i = score(output_i)`, zero for non-finite or padding (`valid=False`) clients.

  Returns:
    `(Σ u_i Δ_i, Σ u_i, outputs without delta, u)`.
  """

  def body(carry, args):
    acc, total = carry
    client, key, ok = args
    out = client_update(params, client, key)
    use = out.finite & ok
    u = jnp.where(use, score(out), 0.0)
    acc = jax.tree.map(lambda a, d: a + u * jnp.where(use, d, 0.0), acc, out.delta)
    return (acc, total + u), (out._replace(delta=None), u)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (acc, total), (outputs, u) = jax.lax.scan(
      body, (zeros, jnp.zeros(())), (clients, keys, valid))
  return acc, total, outputs, u


class CohortResult(NamedTuple):
  """A cohort's outputs, stacked over the (padded) cohort.

  Attributes:
    outputs: Stacked `ClientOutput`; `delta` is None when streamed.
    score_sum: `(Σ u_i Δ_i, Σ u_i)` when streamed, else None.
    scores: `[k]` scores `u_i` when streamed, else None.
  """

  outputs: ClientOutput
  score_sum: tuple[Params, jax.Array] | None
  scores: jax.Array | None


def execute_cohort(
    client_update: ClientUpdate, params: Params, clients: ClientData, keys: jax.Array,
    valid: jax.Array, *, strategy: str, client_chunk: int | None,
    score: Callable[[ClientOutput], jax.Array] | None, mesh: Mesh | None,
) -> CohortResult:
  """Runs a cohort by `strategy`, streamed when `strategy == 'scan'` and `score` is set.

  Args:
    client_update: The one-client function.
    params: Global params.
    clients: Stacked cohort data; with a mesh, its length is a multiple of the
      number of devices on the `clients` axis.
    keys: `[k]` PRNG keys.
    valid: `[k]` bool, False for padding clients (they get score 0).
    strategy: A concrete strategy (`vmap`, `chunked`, `scan`).
    client_chunk: Chunk size for `chunked`.
    score: Per-client score of a separable weighting, or None.
    mesh: Optional mesh with a `clients` axis to shard the cohort over.

  Returns:
    A `CohortResult`.
  """
  stream = strategy == "scan" and score is not None
  if stream:
    def local(params, clients, keys, valid):
      acc, total, outputs, u = scan_score_sum(client_update, params, clients, keys, valid,
                                              score)
      if mesh is not None:
        acc, total = jax.lax.psum((acc, total), CLIENTS_AXIS)
      return acc, total, outputs, u
  else:
    def local(params, clients, keys, valid):
      del valid
      return run_cohort(client_update, params, clients, keys, strategy=strategy,
                        client_chunk=client_chunk)
  if mesh is not None:
    spec = P(CLIENTS_AXIS)
    out_specs = (P(), P(), spec, spec) if stream else spec
    local = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, spec, spec),
                          out_specs=out_specs, check_vma=False)
  result = local(params, clients, keys, valid)
  if stream:
    acc, total, outputs, u = result
    return CohortResult(outputs=outputs, score_sum=(acc, total), scores=u)
  return CohortResult(outputs=result, score_sum=None, scores=None)


def pad_cohort(idx: jax.Array, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
  """Pads cohort indices to a multiple of the mesh's `clients` size.

  Returns:
    `(padded idx, valid)`: padding repeats the first clients and is marked
    invalid, so it never enters an aggregate.
  """
  k = idx.shape[0]
  d = 1 if mesh is None else mesh.shape[CLIENTS_AXIS]
  pad = -k % d
  valid = jnp.arange(k + pad) < k
  return jnp.concatenate([idx, jnp.resize(idx, (pad,))]), valid


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
