"""Orbax checkpoints of the server state, so an interrupted run resumes."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from fedjax_pers.core import ServerState


def _to_saveable(state: ServerState) -> ServerState:
  return state._replace(rng=jax.random.key_data(state.rng))


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A checkpoint manager over `workdir/checkpoints`."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, state: ServerState) -> None:
  """Saves `state` under its round number."""
  mngr.save(int(state.round), args=ocp.args.StandardSave(_to_saveable(state)))


def restore_latest(mngr: ocp.CheckpointManager, like: ServerState) -> ServerState | None:
  """The latest saved state shaped like `like`, or None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
  restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  return restored._replace(rng=jax.random.wrap_key_data(restored.rng))
