"""`config.privacy` to client-level DP-FedAvg, and the privacy the run has spent.

`privacy.clip_norm` set turns DP on: the round's aggregate becomes
`privacy.dp_fedavg_aggregator` (clipped updates, Gaussian noise `z C`, the
fixed denominator `W = q Σ_k w_k`), whatever the algorithm, and every
evaluation reports ε at `privacy.delta` after the rounds run so far. Rounds
draw `clients_per_round` of the `N` clients uniformly without replacement, so
the accounting is fixed-size sampling at `q = k / N` (RDP; see
`privacy._accounting`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_pers import privacy
from fedjax_pers.experiment._weighting import weighting_name

# Weightings with a privacy cost defined: 1, or the paper's capped data size.
DP_WEIGHTINGS = ("uniform", "num_examples")


class DpPlan(NamedTuple):
  """What a DP run releases and how it is accounted."""

  clip_norm: float
  noise_multiplier: float
  delta: float
  sampling_rate: float
  num_clients: int
  accountant: str
  example_cap: int | None
  denominator: float

  def report(self, rounds: int) -> dict[str, Any]:
    """The `dp_*` figures after `rounds` rounds (ε from scratch: a resumed run's too)."""
    eps = privacy.epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta,
                          self.accountant, "fixed", self.num_clients)
    return {"dp_epsilon": eps if math.isfinite(eps) else None, "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sampling_rate": self.sampling_rate, "dp_steps": rounds,
            "dp_accountant": self.accountant, "dp_sampling": "fixed",
            "dp_clip_norm": self.clip_norm}


def make_plan(config: ml_collections.ConfigDict, sizes: np.ndarray) -> DpPlan | None:
  """The run's `DpPlan` from `config.privacy`, or None without `privacy.clip_norm`.

  Raises `ValueError` for what has no privacy cost defined: a weighting other than
  `uniform`/`num_examples`, sampling ∝ n_i, pFedMe (every client every round, its
  own average), both or neither of `noise_multiplier` and `target_epsilon`.
  """
  p = config.get("privacy")
  if p is None or p.get("clip_norm") is None:
    return None
  n, k = len(sizes), config.clients_per_round
  weighting = weighting_name(config)
  why = []
  if weighting not in DP_WEIGHTINGS:
    why.append(f"aggregation.weighting={weighting!r} (it depends on other clients' updates "
               f"or on private statistics, whose privacy cost is not accounted; use one of "
               f"{DP_WEIGHTINGS})")
  if config.get("sampling", "uniform") != "uniform":
    why.append(f"sampling={config.sampling!r} (the accounting is for uniform cohorts)")
  if config.algorithm == "pfedme":
    why.append("algorithm='pfedme' (it trains every client each round with its own average)")
  if why:
    raise ValueError(f"privacy.clip_norm={p.clip_norm!r} (DP-FedAvg) does not take "
                     + "; ".join(why) + ".")
  cap = p.get("example_cap")
  if weighting == "num_examples" and cap is None:
    raise ValueError("aggregation.weighting='num_examples' under DP weights clients by "
                     "min(n_i / n_cap, 1): set privacy.example_cap=n_cap (an int >= 1), or "
                     "use aggregation.weighting='uniform'.")
  if weighting == "uniform" and cap is not None:
    raise ValueError(f"privacy.example_cap={cap!r} caps the num_examples weights; with "
                     "aggregation.weighting='uniform' it would be ignored: unset it.")
  delta = p.get("delta")
  delta = 1.0 / n ** 1.1 if delta is None else delta
  q = k / n
  z, target = p.get("noise_multiplier"), p.get("target_epsilon")
  if (z is None) == (target is None):
    raise ValueError(f"privacy: set exactly one of noise_multiplier and target_epsilon; got "
                     f"noise_multiplier={z!r}, target_epsilon={target!r}.")
  if z is None:
    z = _calibrated(target, q, config.num_rounds, delta, p.accountant, "fixed", n)
  privacy.epsilon(z, q, 1, delta, p.accountant, "fixed", n)   # checks every argument
  sizes = np.asarray(sizes)
  return DpPlan(clip_norm=p.clip_norm, noise_multiplier=float(z), delta=delta,
                sampling_rate=q, num_clients=n, accountant=p.accountant,
                example_cap=cap if weighting == "num_examples" else None,
                denominator=privacy.expected_weight(
                    sizes, cap if weighting == "num_examples" else None, q))


# The driver asks for the plan twice (the algorithm, the reports); calibrate once.
_calibrated = functools.lru_cache(maxsize=16)(privacy.calibrate_noise)


def aggregator(plan: DpPlan, seed: int):
  """The plan's `privacy.dp_fedavg_aggregator`; its noise key comes from `seed`."""
  key = jax.random.fold_in(jax.random.key(seed), 0xD9)
  return privacy.dp_fedavg_aggregator(plan.clip_norm, plan.noise_multiplier,
                                      plan.denominator, key, example_cap=plan.example_cap)
