"""Per-client state of a host store's population, kept on the host a round at a time.

Ditto's v_k, FedPer's personal layers, APFL's (v_k, α_k): a population of 10^6
clients cannot keep them stacked on the device. `HostClientStates` holds them in
host arrays; before a round it puts the cohort's states in the state
(`ClientWindow`, slot j for client `window[j]`), after it copies them back.

Memory: the arrays are allocated zeroed (the operating system commits a page
only when written), and a client never written reads as the initial state; so
a run costs about the pages of the clients it has sampled. `snapshot` gives only
those clients' rows, for checkpoints.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._round import ClientWindow, ServerState


class HostClientStates:
  """The population's per-client state on the host.

  Args:
    window: The `ClientWindow` of a state `alg.init` built over windowed data
      (every slot holds a client's initial state).
    num_clients: Clients of the population.
  """

  def __init__(self, window: ClientWindow, num_clients: int):
    if not isinstance(window, ClientWindow):
      raise ValueError("HostClientStates needs the ClientWindow of a state initialised over "
                       f"windowed data (a store's cohort); got {type(window).__name__}.")
    local = jax.tree.map(_local, window.states)
    leaves, self._tree = jax.tree.flatten(local)
    self.num_clients = num_clients
    self._first = [np.asarray(a[0]) for a in leaves]
    self._rows = [np.zeros((num_clients, *a.shape[1:]), a.dtype) for a in leaves]
    self.written = np.zeros(num_clients, bool)

  @property
  def nbytes(self) -> int:
    """Bytes of the rows of the clients written so far."""
    return int(self.written.sum()) * sum(a[0].nbytes for a in self._rows)

  def gather(self, ids) -> Any:
    """Clients `ids`' states, stacked (the initial state for a client never written)."""
    ids = np.asarray(ids, np.int64)
    seen = self.written[ids]
    out = [np.where(seen.reshape((-1,) + (1,) * (r.ndim - 1)), r[ids], f[None])
           for r, f in zip(self._rows, self._first)]
    return jax.tree.unflatten(self._tree, out)

  def scatter(self, ids, states: Any) -> None:
    """Writes clients `ids`' stacked states."""
    ids = np.asarray(ids, np.int64)
    for r, a in zip(self._rows, jax.tree.leaves(jax.tree.map(_local, states))):
      r[ids] = a
    self.written[ids] = True

  def load(self, state: ServerState, data: FederatedData, put=jax.device_put) -> ServerState:
    """`state` carrying the states of `data.window`'s clients (`put` on the devices)."""
    ids = np.asarray(_local(data.window))
    return state._replace(client_states=ClientWindow(put(self.gather(ids))))

  def save(self, state: ServerState, data: FederatedData) -> None:
    """Copies the states a round over `data` left in `state` back to the host."""
    self.scatter(np.asarray(_local(data.window)), state.client_states.states)

  def snapshot(self) -> dict[str, np.ndarray]:
    """The written clients' ids and rows (`ids`, `leaf_0`, ...) and the initial state
    (`initial_0`, ...), for a checkpoint."""
    ids = np.flatnonzero(self.written)
    return {"ids": ids, **{f"leaf_{i}": r[ids] for i, r in enumerate(self._rows)},
            **{f"initial_{i}": f for i, f in enumerate(self._first)}}

  def restore(self, snap: dict[str, np.ndarray]) -> None:
    """Back to a `snapshot`: those clients written, every other at the snapshot's
    initial state (a resumed run's window holds the last cohort's, not the initial)."""
    if len(snap) != 1 + 2 * len(self._rows):
      raise ValueError(f"client-state snapshot holds {(len(snap) - 1) // 2} arrays per "
                       f"client; this algorithm's state has {len(self._rows)}.")
    self._first = [np.asarray(snap[f"initial_{i}"]) for i in range(len(self._rows))]
    for r in self._rows:
      r[self.written] = 0
    self.written[:] = False
    self.scatter(snap["ids"], jax.tree.unflatten(
        self._tree, [snap[f"leaf_{i}"] for i in range(len(self._rows))]))


def _local(a):
  """A (global) array on this process's host: its own copy where it is replicated,
  else gathered from every process (a collective: every process calls it)."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    if a.sharding.is_fully_replicated:
      a = a.addressable_data(0)
    else:
      a = multihost_utils.process_allgather(a, tiled=True)
  return np.asarray(a)
