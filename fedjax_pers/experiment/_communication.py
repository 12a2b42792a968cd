"""`config.compression` and `config.secure_aggregation` to what clients send, and the
bits it costs.

`compression.method` set (`quantize`: stochastic `2^compression.bits` levels,
with `compression.rotate` the random Hadamard rotation; `top_k`: the
`compression.fraction` largest coordinates, with `compression.error_feedback`
the per-client memory) puts `privacy.compressed` in front of the round's
aggregator. `secure_aggregation.bits` set sums the cohort's updates in
`b`-bit fixed point under pairwise masks (`privacy.secure_aggregator`, built by
`_privacy`: it needs `privacy.clip_norm` for its range). Either way every
evaluation reports `bits_per_client` (what one client sends in a round) and
`bits_per_round` (`clients_per_round` times it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import ml_collections

from fedjax_pers import privacy
from fedjax_pers.core import Model

KEYS = ("method", "bits", "rotate", "fraction", "error_feedback")


class CommPlan(NamedTuple):
  """What one client sends in a round."""

  name: str
  bits_per_client: int
  clients_per_round: int

  def report(self) -> dict[str, Any]:
    return {"compression": self.name, "bits_per_client": self.bits_per_client,
            "bits_per_round": self.bits_per_client * self.clients_per_round}


def compressor(config: ml_collections.ConfigDict) -> privacy.Compressor | None:
  """The configured `privacy.Compressor`, or None; bad keys raise `ValueError`."""
  c = config.get("compression")
  if c is None or c.get("method") is None:
    return None
  unknown = sorted(set(c.keys()) - set(KEYS))
  if unknown:
    raise ValueError(f"Unknown compression keys {unknown}; expected some of {list(KEYS)}.")
  comp = privacy.Compressor(method=c.method, bits=c.get("bits", 8),
                            rotate=c.get("rotate", False), fraction=c.get("fraction", 0.01),
                            error_feedback=c.get("error_feedback", True))
  privacy.check_compressor(comp)
  if config.get("secure_aggregation") and config.secure_aggregation.get("bits") is not None:
    raise ValueError(f"compression.method={c.method!r} with secure_aggregation.bits="
                     f"{config.secure_aggregation.bits!r}: secure aggregation already sends "
                     "b-bit fixed point; use one or the other.")
  return comp


def num_params(model: Model) -> int:
  """The model's parameter count (the length of a client's update)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def encoder(config: ml_collections.ConfigDict, model: Model):
  """`aggregator -> compressed aggregator` for the configured compression, or None."""
  comp = compressor(config)
  if comp is None:
    return None
  key = jax.random.fold_in(jax.random.key(config.seed), 0xC0)
  d = num_params(model)
  return lambda how: privacy.compressed(how, comp, key, num_params=d)


def plan(config: ml_collections.ConfigDict, model: Model) -> CommPlan | None:
  """The run's `CommPlan`, or None when updates go as they are."""
  comp = compressor(config)
  bits = config.get("secure_aggregation", {}).get("bits")
  if comp is None and bits is None:
    return None
  d = num_params(model)
  if comp is None:
    return CommPlan(f"secure_aggregation_{bits}bit", bits * d, config.clients_per_round)
  name = (f"quantize_{comp.bits}bit{'_rotated' if comp.rotate else ''}"
          if comp.method == "quantize" else
          f"top_k_{comp.fraction:g}{'_ef' if comp.error_feedback else ''}")
  return CommPlan(name, privacy.bits_per_client(comp, d), config.clients_per_round)
