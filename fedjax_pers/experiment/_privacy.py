"""`config.privacy` to client-level DP-FedAvg, and the privacy the run has spent.

`privacy.clip_norm` set turns DP on: the round's aggregate becomes
`privacy.dp_fedavg_aggregator` (clipped updates, Gaussian noise `z C`, the
fixed denominator `W = q Σ_k w_k`), whatever the algorithm, and every
evaluation reports ε at `privacy.delta` after the rounds run so far. With
`privacy.sampling='fixed'` (default) rounds draw `clients_per_round` of the `N`
clients uniformly without replacement, accounted as fixed-size sampling at
`q = k / N` (RDP; see `privacy._accounting`). With `'poisson'` each client takes
part with probability `q = k / N` on its own (`Execution(poisson_rate=q)`), in
`K` static slots, the smallest with `P(Binomial(N, q) > K) ≤ 1e-12`; a round
that draws more keeps `K` (the reported `dp_delta_truncation`, `T` times that
tail, bounds the chance it ever happens: the run is `(ε, δ + it)`-DP), and
either accountant applies. `privacy.local=True`: local DP, each client noising
its own clipped update; ε is then `privacy.local_epsilon` (every round a
participation, no amplification) and `target_epsilon` calibrates for it.
`privacy.target_quantile=γ` makes `C` adaptive (Andrew et al., NeurIPS 2021):
`clip_norm` is then its start, it follows the γ-quantile of the update norms by
`privacy.clip_learning_rate`, from a count noised by
`privacy.clipped_count_stddev` (default `max(k / 20, z)`), inside the same `z`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_pers import privacy
from fedjax_pers.core._sampling import poisson_max_cohort, poisson_tail
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
  sampling: str = "fixed"
  local: bool = False
  max_cohort: int | None = None
  target_quantile: float | None = None
  clip_learning_rate: float = 0.2
  count_stddev: float | None = None
  expected_clients: float = 1.0

  def report(self, rounds: int, weight_state=None) -> dict[str, Any]:
    """The `dp_*` figures after `rounds` rounds (ε from scratch: a resumed run's too);
    `dp_clip_norm` is the current `C` of `weight_state` where clipping is adaptive."""
    if self.local:
      eps = (privacy.local_epsilon(self.noise_multiplier, rounds, self.delta, self.accountant)
             if self.noise_multiplier > 0 else math.inf)
    else:
      eps = privacy.epsilon(self.noise_multiplier, self.sampling_rate, rounds, self.delta,
                            self.accountant, self.sampling, self.num_clients)
    extra = {} if self.sampling == "fixed" else {
        "dp_cohort_slots": self.max_cohort,
        "dp_delta_truncation": rounds * poisson_tail(self.num_clients, self.sampling_rate,
                                                     self.max_cohort)}
    return {"dp_epsilon": eps if math.isfinite(eps) else None, "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sampling_rate": self.sampling_rate, "dp_steps": rounds,
            "dp_accountant": self.accountant, "dp_sampling": self.sampling,
            "dp_local": self.local, **extra,
            "dp_clip_norm": self.clip_norm if self.target_quantile is None or weight_state
            is None else current_clip_norm(weight_state)}


def make_plan(config: ml_collections.ConfigDict, sizes: np.ndarray) -> DpPlan | None:
  """The run's `DpPlan` from `config.privacy`, or None without `privacy.clip_norm`.

  Raises `ValueError` for what has no privacy cost defined: a weighting other than
  `uniform`/`num_examples`, sampling ∝ n_i, pFedMe (every client every round, its
  own average), both or neither of `noise_multiplier` and `target_epsilon`.
  """
  p = config.get("privacy")
  secure = config.get("secure_aggregation", {}).get("bits")
  if secure is not None and (p is None or p.get("clip_norm") is None):
    raise ValueError(f"secure_aggregation.bits={secure!r} needs privacy.clip_norm: updates "
                     "are clipped to it to fit the fixed-point range (privacy."
                     "noise_multiplier=0 for no noise).")
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
  sampling = p.get("sampling", "fixed")
  if sampling not in privacy.SAMPLINGS:
    why.append(f"privacy.sampling={sampling!r} (expected one of {privacy.SAMPLINGS})")
  if sampling == "poisson" and config.get("data", {}).get("store") is not None:
    why.append("privacy.sampling='poisson' with data.store (a host feed of Poisson cohorts "
               "is not built; use sampling='fixed')")
  if config.algorithm == "pfedme":
    why.append("algorithm='pfedme' (it trains every client each round with its own average)")
  if config.algorithm == "fednova":
    why.append("algorithm='fednova' (its normalised weights τ_eff p_i / ‖a_i‖₁ exceed 1)")
  if config.algorithm == "fedbuff":
    why.append("algorithm='fedbuff' (its rounds are asynchronous server steps, not sampled "
               "cohorts)")
  if config.algorithm in ("scaffold", "feddyn"):
    why.append(f"algorithm={config.algorithm!r} (its server state moves by the clients' "
               "unclipped, unnoised updates)")
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
  gamma = p.get("target_quantile")
  for key in ("clip_learning_rate", "clipped_count_stddev"):
    if gamma is None and p.get(key) is not None and p.get(key) != DEFAULTS.get(key):
      raise ValueError(f"privacy.{key}={p.get(key)!r} is for adaptive clipping; set "
                       f"privacy.target_quantile (γ in (0, 1)) or unset it.")
  local = p.get("local", False)
  if not isinstance(local, bool):
    raise ValueError(f"privacy.local must be a bool; got {local!r}.")
  if secure is not None and local:
    raise ValueError(f"privacy.local=True with secure_aggregation.bits={secure!r}: the "
                     "secure sum adds no client-side noise; use one or the other.")
  if secure is not None and gamma is not None:
    raise ValueError(f"privacy.target_quantile={gamma!r} with secure_aggregation.bits="
                     f"{secure!r}: adaptive clipping's count of unclipped clients would need "
                     "its own secure sum, which is not built; fix privacy.clip_norm.")
  delta = p.get("delta")
  delta = 1.0 / n ** 1.1 if delta is None else delta
  q = k / n
  z, target = p.get("noise_multiplier"), p.get("target_epsilon")
  if (z is None) == (target is None):
    raise ValueError(f"privacy: set exactly one of noise_multiplier and target_epsilon; got "
                     f"noise_multiplier={z!r}, target_epsilon={target!r}.")
  if z is None and local:   # local_epsilon(z) = ε of z / 2, unsampled
    z = 2 * _calibrated(target, 1.0, config.num_rounds, delta, p.accountant, "poisson", None)
  elif z is None:
    z = _calibrated(target, q, config.num_rounds, delta, p.accountant, sampling, n)
  privacy.epsilon(z, q, 1, delta, p.accountant, sampling, n)   # checks every argument
  sizes = np.asarray(sizes)
  plan = DpPlan(clip_norm=p.clip_norm, noise_multiplier=float(z), delta=delta,
                sampling_rate=q, num_clients=n, accountant=p.accountant,
                example_cap=cap if weighting == "num_examples" else None,
                denominator=privacy.expected_weight(
                    sizes, cap if weighting == "num_examples" else None, q),
                sampling=sampling, local=local,
                max_cohort=poisson_max_cohort(n, q) if sampling == "poisson" else None,
                target_quantile=gamma,
                clip_learning_rate=p.get("clip_learning_rate", DEFAULTS["clip_learning_rate"]),
                count_stddev=p.get("clipped_count_stddev"), expected_clients=float(k))
  aggregator(plan, config)   # checks γ, η_C, σ_b and secure_aggregation.* before compiling
  return plan


# Adaptive clipping's settings (Andrew et al.'s defaults), refused without γ if changed.
DEFAULTS = {"clip_learning_rate": 0.2, "clipped_count_stddev": None}


def current_clip_norm(weight_state) -> float:
  """`C` of the `privacy.DpState` inside an aggregator's state."""
  found = [s for s in jax.tree.leaves(weight_state, is_leaf=lambda x: isinstance(
      x, privacy.DpState)) if isinstance(s, privacy.DpState)]
  return float(found[0].clip_norm)


# The driver asks for the plan twice (the algorithm, the reports); calibrate once.
_calibrated = functools.lru_cache(maxsize=16)(privacy.calibrate_noise)


def aggregator(plan: DpPlan, config: ml_collections.ConfigDict):
  """The plan's `privacy.dp_fedavg_aggregator` (its noise key from `config.seed`), or
  its release through `privacy.secure_aggregator` with `secure_aggregation.bits`."""
  key = jax.random.fold_in(jax.random.key(config.seed), 0xD9)
  secure = config.get("secure_aggregation", {})
  if secure.get("bits") is not None:
    return privacy.secure_aggregator(
        plan.clip_norm, secure.bits, plan.max_cohort or config.clients_per_round, key,
        dropout_rate=secure.get("dropout_rate", 0.0), noise_multiplier=plan.noise_multiplier,
        denominator=plan.denominator, example_cap=plan.example_cap)
  return privacy.dp_fedavg_aggregator(
      plan.clip_norm, plan.noise_multiplier, plan.denominator, key,
      example_cap=plan.example_cap, target_quantile=plan.target_quantile,
      clip_learning_rate=plan.clip_learning_rate, count_stddev=plan.count_stddev,
      expected_clients=plan.expected_clients, local=plan.local)
