"""Where a loader's clients go: padded device arrays, or a host store written as they come.

Every loader ends the same way: client after client, a train split and a test
split. `federate` takes them from an iterator and either stacks them into two
`FederatedData` (the default) or, with `store=PATH`, writes `PATH/train` and
`PATH/test` (`StoreWriter`) a chunk of clients at a time, so the padded
population is never built and a generator never holds more than a chunk.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from fedjax_pers.core._data import FederatedData
from fedjax_pers.data._store import HEADER, HostStore, StoreWriter, open_store

Client = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]   # x_tr, y_tr, x_te, y_te
SPLITS = ("train", "test")


def store_exists(path: str) -> bool:
  """Whether `path` holds a sealed pair of stores (`path/train`, `path/test`)."""
  return all(os.path.exists(os.path.join(path, s, HEADER)) for s in SPLITS)


def open_split_store(path: str, *, in_memory: bool = False) -> tuple[HostStore, HostStore]:
  """`(train, test)` host stores of a pair written by a loader with `store=path`."""
  return tuple(open_store(os.path.join(path, s), in_memory=in_memory) for s in SPLITS)


def _chunks(clients: Iterable[Client], chunk: int) -> Iterator[list[Client]]:
  part = []
  for c in clients:
    part.append(c)
    if len(part) == chunk:
      yield part
      part = []
  if part:
    yield part


def federate(clients: Iterable[Client], *, num_classes: int, dtype=np.float32,
             store: str | None = None, source: dict[str, Any] | None = None,
             chunk: int = 1024) -> tuple[FederatedData, FederatedData] | tuple[HostStore,
                                                                                 HostStore]:
  """The train and test populations of `clients`, on the device or in a store.

  Args:
    clients: `(x_train, y_train, x_test, y_test)` per client, in client order.
    num_classes: Labels lie in `[0, num_classes)`.
    dtype: Feature dtype (float32; int32 for token ids).
    store: None: two padded `FederatedData`. A path: the pair of stores
      `store/train` and `store/test`, written a chunk at a time, then opened
      memory-mapped (refused if `store` already holds them).
    source: What produced the clients (a loader's arguments), kept in both
      headers so a later run can check it reads the data it asked for.
    chunk: Clients per write.

  Returns:
    `(train, test)`: `FederatedData`, or `HostStore` with `store`.
  """
  if store is None:
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for xa, ya, xb, yb in clients:
      tr_x.append(xa)
      tr_y.append(ya)
      te_x.append(xb)
      te_y.append(yb)
    build = lambda xs, ys: FederatedData.from_clients(xs, ys, num_classes=num_classes,
                                                      dtype=dtype)
    return build(tr_x, tr_y), build(te_x, te_y)
  if store_exists(store):
    raise ValueError(f"Store {store!r} already holds train and test stores; open them "
                     "with open_split_store, or write to a new directory.")
  with contextlib.ExitStack() as stack:
    writers = None
    for part in _chunks(clients, chunk):
      if writers is None:   # the first client gives the feature shape
        shape = np.asarray(part[0][0]).shape[1:]
        writers = [stack.enter_context(StoreWriter(
            os.path.join(store, s), shape, num_classes, x_dtype=dtype, source=source))
            for s in SPLITS]
      writers[0].add([c[0] for c in part], [c[1] for c in part])
      writers[1].add([c[2] for c in part], [c[3] for c in part])
    if writers is None:
      raise ValueError(f"Store {store!r}: the loader gave no client.")
  return open_split_store(store)
