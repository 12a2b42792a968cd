"""q-FFL's fair aggregation, q-FedAvg (Li, Sanjabi, Beirami & Smith, ICLR 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pers.aggregation._quality import sq_norms
from fedjax_pers.aggregation._weights import stateless
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, zero_nonfinite
from fedjax_pers.core._traced import traced


def q_ffl(q: float, learning_rate: float) -> Aggregator:
  """q-FedAvg: reweights clients by their loss to the power q, for a fairer accuracy spread.

  With F_k the loss of w_t on client k's data, w̄_k its local model and
  L = 1 / `learning_rate` (the Lipschitz estimate of the paper):

    ΔW_k = L (w_t − w̄_k),   Δ_k = F_k^q ΔW_k,
    h_k  = q F_k^(q−1) ||ΔW_k||² + L F_k^q,
    w_{t+1} = w_t − Σ_k Δ_k / Σ_k h_k,

  over the finite clients of the cohort. q = 0 is FedAvg with uniform weights.
  The aggregate handed to the server optimizer is `−Σ Δ_k / Σ h_k`. The
  reported weights are `F_k^q / Σ F_j^q`, the relative weight of each update.

  Args:
    q: Fairness exponent q ≥ 0.
    learning_rate: The clients' learning rate (L = 1 / learning_rate).
  """
  if not (traced(q) or isinstance(q, (int, float)) and q >= 0):
    raise ValueError(f"q (q-FFL's fairness exponent) must be a number >= 0; got {q!r}.")
  if not (traced(learning_rate) or isinstance(learning_rate, (int, float)) and learning_rate > 0):
    raise ValueError(f"learning_rate must be a number > 0; got {learning_rate!r}.")
  lip = 1.0 / learning_rate

  def apply(outputs, state, params):
    del params
    ok = outputs.finite
    loss = jnp.where(ok, jnp.maximum(outputs.loss_before, 1e-10), 1.0)
    fq = jnp.where(ok, loss ** q, 0.0)
    deltas = zero_nonfinite(outputs)                 # Δ_i = w̄_i − w_t = −ΔW_i / L
    h = fq * lip
    if q != 0:
      h = h + jnp.where(ok, q * loss ** (q - 1.0), 0.0) * lip ** 2 * sq_norms(deltas)
    total = jnp.sum(h)
    coef = safe_divide(lip * fq, total)              # Σ Δ_k / Σ h = −Σ coef_k Δ_k
    agg = jax.tree.map(lambda d: jnp.tensordot(coef.astype(d.dtype), d, axes=1), deltas)
    return agg, normalize(fq, ok), state

  return Aggregator(init=stateless, apply=apply, client_losses=True)
