"""Rounds over a host store: each round's cohort gathered on the host, one round ahead.

A `HostStore` never goes to the device whole. `CohortFeed` draws round t's
cohort with the algorithm's own sampler (`FederatedAlgorithm.sample`, the
function the round calls on the same key), gathers those clients' rows into
fixed-shape buffers `[k, max_examples, ...]` and puts them on the device as a
windowed `FederatedData`; a host thread prepares round t + 1 while round t
computes. The round then trains exactly the clients, batches and keys it
would on the whole population on device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._evaluate import ClientEval
from fedjax_pers.core._execution import CLIENTS_AXIS, host_put
from fedjax_pers.core._model import Model
from fedjax_pers.data._store import HostStore


@functools.partial(jax.jit, static_argnums=(0, 5))
def _chunk_eval(model, params, x, y, owner, chunk):
  """Per-client sums of loss and metric over a flat chunk (owner `chunk`: padding)."""
  logits = model.apply(params, x)
  sums = lambda v: jax.ops.segment_sum(v, owner, num_segments=chunk + 1)[:chunk]
  return sums(model.loss(logits, y)), sums(model.metrics(logits, y))


class CohortFeed:
  """Each round's cohort from `store`, following the key chain of `rng`.

  Iterate it alongside the rounds, starting from the state whose key is `rng`:

      state = alg.init(key, store.cohort_data([0]))   # (init reads the population size)
      feed = CohortFeed(alg, store, state.rng)
      for _ in range(num_rounds):
        state, metrics = round_fn(state, next(feed))

  Args:
    alg: The algorithm (its `sample` draws the cohorts).
    store: The population.
    rng: `state.rng` of the state the first round starts from (resume: the
      restored state's).
    prefetch: Gather round t + 1 on a host thread while round t runs.
    readahead: Also ask the kernel for the clients of this many rounds after
      the one being gathered (a store on disk: their reads run in parallel).
    sharding: Where the gathered arrays go (default: the default device).
    mesh: The round's mesh (instead of `sharding`): each cohort is dealt to its
      devices as the round deals it (`alg.deal`, `FederatedData.deal`) and each
      process gathers only the clients of its own devices
      (`jax.make_array_from_callback`); the small arrays are replicated. Where
      the round does not deal (a differentiable plan), the cohort is gathered
      whole and replicated.

  Attributes:
    rows_gathered: Client rows this process has gathered so far (its share of
      each cohort with `mesh`, the whole cohort without).
    cohorts_gathered: Cohorts gathered so far (prefetched ones included).
  """

  def __init__(self, alg, store: HostStore, rng: jax.Array, *, prefetch: bool = True,
               readahead: int = 2, sharding: Any = None, mesh: Mesh | None = None):
    if alg.sample is None:
      raise ValueError("CohortFeed: the algorithm has no `sample` (it was not built by "
                       "make_round/assemble), so its cohorts cannot be drawn on the host.")
    if not (isinstance(readahead, int) and readahead >= 0):
      raise ValueError(f"readahead must be an int >= 0; got {readahead!r}.")
    if mesh is not None and sharding is not None:
      raise ValueError("CohortFeed takes mesh (the round's) or sharding, not both.")
    self.store, self.readahead = store, readahead
    self.rows_gathered = self.cohorts_gathered = 0
    if mesh is not None:
      sharding = NamedSharding(mesh, PartitionSpec())
      self._rows = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
    self._put = put = host_put(sharding)
    self._sizes = put(np.asarray(store.sizes, np.int32))
    n = store.num_clients
    self._sample = jax.jit(lambda r: alg.sample(r, n))
    self._deal = None
    if mesh is not None and alg.deal is not None:   # (its static shapes only)
      self._deal = alg.deal(store.cohort_data(np.arange(1), put=np.asarray))
    self._rng = rng                      # key of the next round not drawn yet
    self._drawn = collections.deque()    # cohorts drawn (and announced), not yet gathered
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    self._next = None if self._pool is None else self._pool.submit(self._prepare)

  def _prepare(self) -> FederatedData:
    """The next round's cohort, gathered; the rounds after it drawn and announced to
    the kernel once each (a store on disk: their reads run in parallel). One call at a
    time: the worker thread, or the caller without prefetching."""
    while len(self._drawn) < 1 + self.readahead:
      ids, self._rng = self._sample(self._rng)
      ids = np.asarray(ids)
      self.store.advise(ids)
      self._drawn.append(ids)
    ids = self._drawn.popleft()
    self.cohorts_gathered += 1
    if self._deal is None:
      self.rows_gathered += ids.size
      return self.store.cohort_data(ids, put=self._put, sizes=self._sizes)
    return self._dealt(ids, *self._deal(ids))

  def _dealt(self, ids: np.ndarray, padded: np.ndarray, deal: np.ndarray) -> FederatedData:
    """Cohort `ids` (`padded` as the round pads it) in the order of `deal`, split over
    the mesh: this process gathers the rows of its own devices only."""
    store = self.store
    dealt = padded[deal]
    shards = {}

    def shard(index, which):
      rows = index[0]
      key = (rows.start, rows.stop)
      if key not in shards:
        shards[key] = store.gather(dealt[rows])
        self.rows_gathered += len(dealt[rows])
      return shards[key][which]

    shape = (deal.size, store.max_examples)
    x = jax.make_array_from_callback((*shape, *store.feature_shape), self._rows,
                                     lambda index: shard(index, 0))
    y = jax.make_array_from_callback(shape, self._rows, lambda index: shard(index, 1))
    return FederatedData(x=x, y=y, num_examples=self._sizes, num_classes=store.num_classes,
                         min_examples=store.min_examples, host_sizes=store.host_sizes,
                         window=self._put(ids.astype(np.int32)),
                         deal=self._put(deal.astype(np.int32)))

  def __iter__(self) -> CohortFeed:
    return self

  def __next__(self) -> FederatedData:
    if self._pool is None:
      return self._prepare()
    data = self._next.result()
    self._next = self._pool.submit(self._prepare)
    return data

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)


def evaluate_store(model: Model, params: Any, store: HostStore, *,
                   clients: np.ndarray | None = None, chunk: int = 1024) -> ClientEval:
  """Loss and accuracy of `params` on the clients of a host store, streamed in chunks.

  Each chunk of `chunk` clients (all clients in order, or the ids `clients`)
  is read as one flat run of its real examples, padded to the longest chunk's
  total so one compilation serves every chunk; memory is one chunk.

  Returns:
    `ClientEval` over the clients asked for, in their order.
  """
  ids = np.arange(store.num_clients) if clients is None else np.asarray(clients, np.int64)
  if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= store.num_clients:
    raise ValueError(f"clients must be a non-empty 1-D array of ids in [0, "
                     f"{store.num_clients}); got shape {ids.shape}.")
  if not (isinstance(chunk, int) and chunk >= 1):
    raise ValueError(f"chunk must be an int >= 1; got {chunk!r}.")
  sizes = store.sizes[ids]
  starts = range(0, ids.size, chunk)
  length = max(int(sizes[a:a + chunk].sum()) for a in starts)

  losses, hits = [], []
  for a in starts:
    part = ids[a:a + chunk]
    n = store.sizes[part]
    first = store.offsets[part]
    rows = np.repeat(first - np.cumsum(n) + n, n) + np.arange(n.sum())
    pad = length - rows.size
    x = np.concatenate([store.x[rows], np.zeros((pad, *store.feature_shape), store.x.dtype)])
    y = np.concatenate([store.y[rows], np.zeros((pad,), np.int32)])
    owner = np.concatenate([np.repeat(np.arange(part.size), n), np.full(pad, chunk)])
    loss, hit = _chunk_eval(model, params, x, y, owner.astype(np.int32), chunk)
    losses.append(np.asarray(loss)[:part.size] / n)
    hits.append(np.asarray(hit)[:part.size] / n)
  return ClientEval(loss=jnp.asarray(np.concatenate(losses), jnp.float32),
                    accuracy=jnp.asarray(np.concatenate(hits), jnp.float32),
                    num_examples=jnp.asarray(sizes, jnp.int32))


def check_model(store: HostStore, model: Model, params: Any) -> None:
  """Raises `ValueError` naming the store unless the model takes its features and labels."""
  x = jax.ShapeDtypeStruct((1, *store.feature_shape), store.x.dtype)
  try:
    logits = jax.eval_shape(model.apply, params, x)
  except Exception as e:  # noqa: BLE001 (any failure of the model on this shape)
    raise ValueError(
        f"Store {store.path!r}: features of shape {store.feature_shape} ({store.x.dtype}) "
        f"do not fit the model ({type(e).__name__}: {str(e).splitlines()[0]}).") from None
  if logits.shape[-1] < store.num_classes:
    raise ValueError(
        f"Store {store.path!r}: labels lie in [0, {store.num_classes}) but the model "
        f"gives {logits.shape[-1]} logits.")
