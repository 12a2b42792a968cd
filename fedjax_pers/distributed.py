"""Meshes over the client axis: a cohort's clients sharded over devices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_pers.core._cohort import CLIENTS_AXIS


def client_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named `clients` over the first `num_devices` devices (default: all).

  Pass it as `mesh=` to an algorithm: each device runs its share of the cohort
  and the aggregate is reduced across devices by XLA. Across hosts, call
  `jax.distributed.initialize()` first; `jax.devices()` then lists every host's
  devices. On one CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N`
  (set before JAX starts) makes N devices, one per core.

  Args:
    num_devices: How many devices to use, `1 <= num_devices <= len(jax.devices())`.

  Returns:
    The mesh.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not isinstance(n, int) or not 1 <= n <= len(devices):
    raise ValueError(
        f"num_devices must be an int in [1, {len(devices)}] (the devices JAX sees); "
        f"got {num_devices!r}.")
  return Mesh(np.array(devices[:n]), (CLIENTS_AXIS,))
