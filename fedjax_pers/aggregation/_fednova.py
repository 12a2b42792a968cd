"""FedNova (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020): normalised averaging."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, mean_aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, weighted_sum, zero_nonfinite


def norm_a(steps: jax.Array, momentum: float = 0.0) -> jax.Array:
  """`‖a_i‖₁` of a client's `τ_i` local steps (their §4 and Appendix).

  Plain SGD: `a_i = [1, ..., 1]`, `‖a_i‖₁ = τ_i`. Heavy-ball momentum ρ (buffer
  from 0, `optax.sgd(η, momentum=ρ)`): step k's gradient keeps acting with
  weight `(1 − ρ^{τ−k})/(1 − ρ)`, so `‖a_i‖₁ = [τ_i − ρ (1 − ρ^{τ_i}) / (1 − ρ)] / (1 − ρ)`.
  """
  tau = jnp.asarray(steps, jnp.float32)
  if momentum == 0:
    return tau
  rho = float(momentum)
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def fednova(weighting: WeightFn | None = None, momentum: float = 0.0) -> Aggregator:
  """FedNova's aggregate: `Δ = τ_eff Σ_i p_i Δ_i / ‖a_i‖₁`, `τ_eff = Σ_i p_i ‖a_i‖₁`.

  Client i's update after `τ_i` local steps is `Δ_i = −η Σ_k a_{i,k} g_{i,k}`;
  dividing by `‖a_i‖₁` gives its normalised gradient `d_i`, so clients that
  ran more steps do not pull the model towards their own optimum. The server
  step uses the effective number of steps `τ_eff` (the paper's default
  choice). When every `τ_i` (and so every `‖a_i‖₁`) is equal this is the
  weighted mean `Σ_i p_i Δ_i`: FedAvg.

  Args:
    weighting: The `p_i` (default data size, `n_i / Σ n_j`, the paper's).
    momentum: The clients' heavy-ball ρ in [0, 1) (0: plain SGD).

  Returns:
    The `Aggregator`; its reported weights are the effective weights on the
    raw updates, `τ_eff p_i / ‖a_i‖₁` (zero for non-finite clients and for
    clients that took no step).
  """
  if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
    raise ValueError(f"momentum (the clients' ρ) must be a number in [0, 1); got "
                     f"{momentum!r}.")
  weighting = num_examples() if weighting is None else weighting
  inner = mean_aggregator(weighting)

  def apply(outputs, state, params):
    p, state = weighting.apply(outputs, state)
    a = norm_a(outputs.num_steps, momentum)
    keep = outputs.finite & (a > 0)
    p = normalize(p, keep)
    tau_eff = jnp.sum(p * a)
    w = tau_eff * safe_divide(p, jnp.where(keep, a, 0.0))
    return weighted_sum(w, zero_nonfinite(outputs)), w, state

  return inner._replace(apply=apply, score=None)
