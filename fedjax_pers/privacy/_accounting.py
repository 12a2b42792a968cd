"""Privacy accounting of client-level DP-FedAvg with Google's `dp-accounting`.

A round of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018) releases `Σ_i w_i clip(Δ_i, C) + N(0, (zC)² I)`
over a sampled cohort, `w_i ≤ 1`. One client changes the sum by at most `C`
when it is added or removed, by at most `2C` when it is replaced by another.
The run is `T` rounds of a subsampled Gaussian mechanism:

  * Poisson sampling (each client independently with rate `q`), neighbouring
    populations differ by one client added or removed: `T` compositions of
    `PoissonSampledDpEvent(q, GaussianDpEvent(z))`.
  * Fixed-size sampling (`m` of `N` without replacement), neighbours differ by
    one client replaced (the population size is public): the sensitivity is
    `2C`, so the Gaussian's multiplier with respect to it is `z / 2`:
    `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`
    (Wang, Balle, Kasiviswanathan, AISTATS 2019, Theorem 27; RDP only, as
    `dp-accounting`'s PLD accountant has no event for it).

ε is always computed from `(z, q, T, δ)` afresh, so a resumed run reports what
an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import dp_accounting
# dp_accounting itself is imported where it is used: it pulls in scipy.signal and
# scipy.stats, 1.5 s of every process start (the CLI, each host of a run) that most
# runs, without privacy, never need.

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int,
             sampling: str = "poisson", num_clients: int | None = None
             ) -> dp_accounting.DpEvent:
  """The `DpEvent` of `steps` rounds (see the module docstring).

  Args:
    noise_multiplier: `z`: the noise's standard deviation over the clip norm `C`.
    sampling_rate: `q`: Poisson: each client's probability of taking part in a
      round; fixed: `m / N`.
    steps: Rounds `T`.
    sampling: `'poisson'` or `'fixed'`.
    num_clients: `N`, needed for `'fixed'` (`q N` must be a whole number).
  """
  import dp_accounting

  _check(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling == "poisson":
    one = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
  elif sampling == "fixed":
    if not (isinstance(num_clients, int) and num_clients >= 1):
      raise ValueError(f"sampling='fixed' needs num_clients, an int >= 1; got "
                       f"{num_clients!r}.")
    m = round(sampling_rate * num_clients)
    if m < 1 or abs(m - sampling_rate * num_clients) > 1e-6 * num_clients:
      raise ValueError(f"sampling='fixed': sampling_rate * num_clients must be a whole "
                       f"number of clients >= 1; got {sampling_rate!r} * {num_clients} = "
                       f"{sampling_rate * num_clients!r}.")
    one = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, m, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
  else:
    raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}.")
  return dp_accounting.SelfComposedDpEvent(one, steps)


def make_accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
  """A fresh `dp-accounting` accountant for `sampling`'s neighbouring relation."""
  import dp_accounting
  from dp_accounting import pld, rdp

  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}.")
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}.")
  if accountant == "pld":
    if sampling == "fixed":
      raise ValueError("accountant='pld' does not take sampling='fixed': dp-accounting's "
                       "PLD accountant has no event for sampling without replacement; use "
                       "accountant='rdp' or sampling='poisson'.")
    return pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
              else dp_accounting.NeighboringRelation.REPLACE_ONE)
  return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp", sampling: str = "poisson",
            num_clients: int | None = None) -> float:
  """ε of `steps` rounds of DP-FedAvg at `delta` (client-level; module docstring).

  Args:
    noise_multiplier: `z` (0: no noise, ε = inf).
    sampling_rate: `q` (Poisson rate, or `m / N` for fixed-size sampling).
    steps: Rounds so far (0: ε = 0).
    delta: Target δ in (0, 1).
    accountant: `'rdp'` or `'pld'`.
    sampling: `'poisson'` or `'fixed'`.
    num_clients: `N`, for `'fixed'`.
  """
  _check(delta=delta)
  acc = make_accountant(accountant, sampling)
  event = dp_event(noise_multiplier, sampling_rate, steps, sampling, num_clients)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  return float(acc.compose(event).get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                    accountant: str = "rdp", sampling: str = "poisson",
                    num_clients: int | None = None, rtol: float = 1e-4) -> float:
  """The smallest noise multiplier `z` whose ε after `steps` rounds is at most
  `target_epsilon` (to a relative `rtol`: ε(z) ≤ target < ε(z / (1 + rtol))).

  ε falls as `z` grows; bracketed by doubling, then bisected on a log scale.
  """
  _check(target_epsilon=target_epsilon, steps=steps)
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps must be an int >= 1 to calibrate; got {steps!r}.")
  eps = lambda z: epsilon(z, sampling_rate, steps, delta, accountant, sampling, num_clients)
  lo, hi = 0.0, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 1e6:
      raise ValueError(f"target_epsilon={target_epsilon!r} needs a noise multiplier above "
                       "1e6 at this sampling rate and number of rounds.")
  if lo == 0.0:
    lo = hi / 2
    while eps(lo) <= target_epsilon:
      lo, hi = lo / 2, lo
  while hi / lo > 1 + rtol:
    mid = math.sqrt(lo * hi)
    lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
  return hi


_WANT = {"noise_multiplier": ("a number >= 0", lambda v: v >= 0),
         "sampling_rate": ("a number in (0, 1]", lambda v: 0 < v <= 1),
         "delta": ("a number in (0, 1)", lambda v: 0 < v < 1),
         "target_epsilon": ("a number > 0", lambda v: v > 0),
         "steps": ("an int >= 0", lambda v: v >= 0)}


def _check(**values) -> None:
  """Raises `ValueError` naming the first argument that is not what `_WANT` says."""
  for name, v in values.items():
    want, ok = _WANT[name]
    number = (isinstance(v, int) if name == "steps" else
              isinstance(v, (int, float)) and math.isfinite(v))
    if isinstance(v, bool) or not number or not ok(v):
      raise ValueError(f"{name} must be {want}; got {v!r}.")


def local_epsilon(noise_multiplier: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
  """ε of local DP-FedAvg against the server: `steps` Gaussian releases of one client's
  clipped update, each of multiplier `z / 2` (sensitivity `2C`: the update may change
  arbitrarily), with no amplification by sampling (the server knows who took part)."""
  _check(noise_multiplier=noise_multiplier, sampling_rate=1.0, steps=steps)
  return epsilon(noise_multiplier / 2, 1.0, steps, delta, accountant, "poisson")
