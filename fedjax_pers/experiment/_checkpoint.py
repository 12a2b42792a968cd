"""Orbax checkpoints of the server state, so an interrupted run resumes."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fedjax_pers.core import ServerState
from fedjax_pers.experiment import _outputs


def _to_saveable(state: ServerState) -> ServerState:
  return state._replace(rng=jax.random.key_data(state.rng))


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A checkpoint manager over `workdir/checkpoints`."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, state: ServerState) -> None:
  """Saves `state` under its round number (a sweep's stacked state: the variants' round)."""
  mngr.save(int(np.max(state.round)), args=ocp.args.StandardSave(_to_saveable(state)))


def restore_latest(mngr: ocp.CheckpointManager, like: ServerState) -> ServerState | None:
  """The latest saved state shaped like `like`, or None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
  restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  return restored._replace(rng=jax.random.wrap_key_data(restored.rng))


# Keys a resumed run may change: they say how long to run, what to print, and how the
# clients are executed (up to float rounding) and over how many processes, not what the
# rounds compute; `compare.*` describes the comparison a run belongs to.
RESUMABLE_KEYS = ("num_rounds", "eval_every", "eval_train", "checkpoint_every", "progress",
                  "tensorboard")
RESUMABLE_SECTIONS = ("compare.", "execution.", "distributed.")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_same_run(workdir: str, config: ml_collections.ConfigDict, resuming: bool) -> None:
  """Records `config` in `workdir/config.json`; refuses to resume a different run.

  A workdir with checkpoints resumes its run. If its recorded config differs
  from `config` in any key but `RESUMABLE_KEYS` and `RESUMABLE_SECTIONS`,
  restoring would report the old run's results under the new config, so this
  raises `ValueError` naming the keys instead.
  """
  path = os.path.join(workdir, "config.json")
  now = json.loads(config.to_json_best_effort())
  if resuming and os.path.exists(path):
    with open(path) as f:
      before = _flat(json.load(f))
    after = _flat(now)
    changed = sorted(k for k in set(before) | set(after)
                     if k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_SECTIONS)
                     and before.get(k) != after.get(k))
    if changed:
      diffs = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:8])
      raise ValueError(
          f"--workdir={workdir} holds checkpoints of a run with a different config ({diffs}"
          f"{'; ...' if len(changed) > 8 else ''}). Resuming would mix the two runs: use a new "
          "--workdir, or delete this one.")
  if jax.process_index() == 0:   # one writer in a run over several processes, and atomic:
    _outputs.write_json(path, now, indent=1)   # the others read it meanwhile
