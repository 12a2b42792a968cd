"""Continuous batching of clients: `L` lanes, each taking the next client when its own ends.

A padded cohort costs `k · max_i S_i` client-steps: every client runs as many
steps as the longest. Here `L` lanes run side by side (the step is vmapped over
lanes) inside one `lax.while_loop`. Each lane holds one client's carry and a
step counter; when its client has taken its `count_i` steps, the lane writes
the carry to the cohort's output buffer and picks up the next client of the
queue. The queue is the cohort sorted by decreasing count, so lanes are filled
by the longest-processing-time rule (Graham, 1969): the round takes about
`max(Σ_i count_i / L, max_i count_i)` iterations of `L` lane-steps, within 4/3
of the best possible, and costs the real steps plus the idle lanes of the
last iterations.

The loop has no fixed trip count, so a cohort of any sizes runs in the same
compiled program, and reverse-mode `jax.grad` cannot go through it (the padded
path in `core/_program.py` is the differentiable one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.core._program import Batch, LocalProgram, Steps, tree_where

Params = Any


class LanesResult(NamedTuple):
  """Final carries of every client and what the loop executed.

  Attributes:
    carries: Each client's final carry, stacked over the cohort.
    lane_steps: `L ×` iterations: the client-steps the loop computed (int32).
  """

  carries: Any
  lane_steps: jax.Array


def _rows(tree: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(a)[i], tree)


def run_lanes(program: LocalProgram, params: Params, carry0: Any, steps: Steps,
              count: jax.Array, handles: Any,
              read: Callable[[tuple[Any, jax.Array]], tuple[jax.Array, jax.Array]], *,
              lanes: int) -> LanesResult:
  """Runs every client's first `count[i]` steps on `lanes` lanes.

  Args:
    program: The clients' program (its `step` is used).
    params: Global params, broadcast to every step.
    carry0: Each client's starting carry, stacked (from `program.start`).
    steps: Each client's `Steps`, stacked (`[k, S, ...]`).
    count: `[k]` int32 steps of each client; a client with 0 is never run and
      keeps its `carry0`.
    handles: Each client's handle to its rows, stacked (see `CohortSource`).
    read: `read((handle, idx)) -> (x, y)`: one client's rows at slots `idx`.
    lanes: `L >= 1`, clients run side by side.

  Returns:
    A `LanesResult`.
  """
  k = count.shape[0]
  none = jnp.int32(k)          # a lane without a client
  order = jnp.argsort(-count, stable=True).astype(jnp.int32)   # longest first
  todo = jnp.sum(count > 0, dtype=jnp.int32)
  lane_ids = jnp.arange(lanes, dtype=jnp.int32)

  def assign(state):
    """Idle lanes take the next clients of the queue, in lane order."""
    q, lane_c, lane_s, carry, out = state
    idle = lane_c == none
    pick = q + jnp.cumsum(idle, dtype=jnp.int32) - 1
    take = idle & (pick < todo)
    new_c = jnp.where(take, order[jnp.minimum(pick, k - 1)], lane_c)
    carry = tree_where(take, _rows(carry0, jnp.minimum(new_c, k - 1)), carry)
    return (q + jnp.sum(take, dtype=jnp.int32), new_c, jnp.where(take, 0, lane_s), carry,
            out)

  def retire(state, done):
    """Lanes whose client took its last step write it out and become idle."""
    q, lane_c, lane_s, carry, out = state
    slot = jnp.where(done, lane_c, none)
    out = jax.tree.map(lambda o, c: o.at[slot].set(c, mode="drop"), out, carry)
    return q, jnp.where(done, none, lane_c), lane_s, carry, out

  def body(loop):
    it, state = loop
    q, lane_c, _, _, _ = state
    need = jnp.any(lane_c == none) & (q < todo)
    state = jax.lax.cond(need, assign, lambda s: s, state)
    q, lane_c, lane_s, carry, out = state
    c = jnp.minimum(lane_c, k - 1)
    at = lambda tree: jax.tree.map(lambda a: a[c, lane_s], tree)
    idx, own = at(steps.idx), _rows(handles, c)
    rows = lambda j: jax.vmap(lambda h, i: read((h, i)))(own, j)
    batch = Batch(jax.tree.map(lambda j: rows(j)[0], idx),
                  jax.tree.map(lambda j: rows(j)[1], idx), at(steps.mask), at(steps.extra))
    carry = jax.vmap(program.step, (None, 0, 0))(params, carry, batch)
    lane_s = lane_s + 1
    done = (lane_c < none) & (lane_s >= count[c])
    state = (q, lane_c, lane_s, carry, out)
    state = jax.lax.cond(jnp.any(done), retire, lambda s, d: s, state, done)
    return it + 1, state

  def more(loop):
    _, (q, lane_c, _, _, _) = loop
    return (q < todo) | jnp.any(lane_c < none)

  lane_carry = _rows(carry0, jnp.zeros((lanes,), jnp.int32))
  state = (jnp.zeros((), jnp.int32), jnp.full((lanes,), none), jnp.zeros_like(lane_ids),
           lane_carry, carry0)
  iterations, (_, _, _, _, out) = jax.lax.while_loop(more, body, (jnp.zeros((), jnp.int32),
                                                                  state))
  return LanesResult(carries=out, lane_steps=iterations * lanes)
