"""The data source of a round: where the rows of the clients a cohort draws come from.

A padded `FederatedData` gives each drawn client its stored rows; a capped one a
fresh random subset of `cap` rows (`FederatedData.cohort`). The engine's step
loops read each batch straight from the stored arrays (`CohortSource.read`), so
a round never copies its clients' padded rows; `CohortSource.rows` gathers them
for what `finish` reads (XLA drops the gather where nothing does).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_pers.core._client import ClientData
from fedjax_pers.core._cohort import CohortSource
from fedjax_pers.core._data import FederatedData


def cohort_source(data: FederatedData, client_states: Any, key: jax.Array, *,
                  whole: bool = False, windowed: bool = False) -> CohortSource:
  """The `CohortSource` of a round over `data`.

  Args:
    data: The population.
    client_states: Per-client state stacked over all clients (`windowed`: over
      the slots of `data.window`), or None.
    key: The round's key for the capped store's subsets (client c's subset
      comes from `fold_in(key, c)`, so it does not depend on the order asked).
    whole: The ids asked for are `arange(N)` in order: the stored rows are used
      as they are, without a gather.
    windowed: `client_states` holds the window's clients only (`ClientWindow`).

  Returns:
    The `CohortSource`.
  """

  if data.window is not None:
    return _window_source(data, client_states, windowed)

  def rows(ids):
    state = None if client_states is None else jax.tree.map(lambda a: a[ids], client_states)
    if data.cap is not None:
      x, y, n = data.cohort(ids, key)
    elif whole:
      x, y, n = data.x, data.y, data.num_examples
      state = client_states
    else:
      x, y, n = data.x[ids], data.y[ids], data.num_examples[ids]
    return ClientData(x, y, n, state, ids)

  if data.cap is None:   # client c's slot j is row (c, j)
    handles = lambda ids: ids
    read = lambda table, c, idx: (table[0][c, idx], table[1][c, idx])
  else:                  # its slot j is the flat position handle[j]
    handles = lambda ids: data.cohort_positions(ids, key)
    read = lambda table, pos, idx: (table[0][pos[idx]], table[1][pos[idx]])
  return CohortSource(rows=rows, sizes=data.num_examples, table=(data.x, data.y),
                      handles=handles, read=read)


def _window_source(data: FederatedData, client_states: Any, windowed: bool) -> CohortSource:
  """A gathered cohort's source: client c's rows (and, `windowed`, its state) are at its
  position in `data.window`; with `data.deal`, the rows are already in the dealt order
  the round asks for them in (and split over the mesh)."""
  window = data.window
  position = lambda ids: jnp.argmax(window[None, :] == ids[:, None], axis=1)

  def rows(ids):
    p = position(ids)
    at = p if windowed else ids
    state = None if client_states is None else jax.tree.map(lambda a: a[at], client_states)
    x, y = (data.x[p], data.y[p]) if data.deal is None else (data.x, data.y)
    return ClientData(x, y, data.num_examples[ids], state, ids)

  return CohortSource(rows=rows, sizes=data.num_examples, table=(data.x, data.y),
                      handles=position,
                      read=lambda table, p, idx: (table[0][p, idx], table[1][p, idx]),
                      deal=data.deal)
