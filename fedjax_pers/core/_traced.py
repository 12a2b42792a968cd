"""Numbers that may be traced: a sweep (`fedjax_pers.sweep`) builds an algorithm with
its hyperparameters as traced scalars, after checking every variant's own number."""

from __future__ import annotations

import jax


def traced(value) -> bool:
  """Whether `value` is a traced JAX value (a factory's checks of it are then skipped:
  they were made on the concrete numbers it stands for)."""
  return isinstance(value, jax.core.Tracer)
