"""Simulated system heterogeneity inside a round: stragglers doing part of their local work,
clients that drop out (`Execution(system=System(...))`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.core._execution import System
from fedjax_pers.core._program import LocalProgram


class SystemDraw(NamedTuple):
  """One round's draw over the cohort's `k` slots."""

  straggler: jax.Array   # [k] bool
  share: jax.Array       # [k] int32 j_i in {1, ..., levels} (levels for non-stragglers)
  dropped: jax.Array     # [k] bool: never reports


def draw(key: jax.Array, k: int, system: System) -> SystemDraw:
  """`round(fraction · k)` stragglers at random slots, each with its `j_i`; each slot drops
  out with probability `dropout_rate`, independently."""
  k_who, k_share, k_drop = jax.random.split(key, 3)
  m = round(system.straggler_fraction * k)
  straggler = jnp.zeros(k, bool).at[jax.random.permutation(k_who, k)[:m]].set(True)
  j = jax.random.randint(k_share, (k,), 1, system.levels + 1)
  share = jnp.where(straggler, j, system.levels).astype(jnp.int32)
  dropped = jax.random.uniform(k_drop, (k,)) < system.dropout_rate
  return SystemDraw(straggler, share, dropped)


def straggling(program: LocalProgram, ids: jax.Array, share: jax.Array, levels: int,
               num_clients: int) -> LocalProgram:
  """`program` whose client `ids[s]` does `⌈share[s] · S_i / levels⌉` of its `S_i` steps
  (the first ones: whole epochs first); every other client all of its steps."""
  frac = jnp.full((num_clients,), levels, jnp.int32).at[ids].set(share)

  def num_steps(client):
    full = jnp.asarray(program.num_steps(client), jnp.int32)
    part = (frac[client.id] * full + levels - 1) // levels
    return jnp.minimum(full, part)

  return program._replace(num_steps=num_steps)
