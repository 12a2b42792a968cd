"""Automated weights: a mixture of weighting families learned online by hypergradient.

Each round the server has five candidate weightings of the cohort (family f,
client i, the finite clients' weights summing to one):

  w^size_i = n_i / Σ_j n_j                        (FedAvg)
  w^unif_i = 1 / k
  w^loss_i ∝ exp(−L_i / τ_loss)                   (local training loss)
  w^div_i  ∝ n_i exp(−KL(p_i ‖ q) / τ_div)        (label divergence from q)
  w^cos_i  ∝ n_i exp(cos(Δ_i, Δ̄) / τ_cos)          (agreement with the mean update)

and aggregates with their mixture `w_i = Σ_f π_f w^f_i`, `π = softmax(a)`. The
parameters z = (a, log τ) are learned online: in round t, before aggregating,
the server takes `steps` optimizer steps on the hypergradient

  ∇_z J(z),   J(z) = ℓ_proxy(w_t + Σ_i w_i(z) Δ_i),

the loss on its proxy split of the model the round's aggregation would give,
differentiated through the aggregation (as FedLAW does for per-client weights;
Li et al., ICML 2023, with `fedjax_pers.hypergrad` for whole rounds). Unlike
FedLAW, z and the optimizer's moments carry over from round to round (it
starts at π uniform and every τ = 1), so the mixture is a slowly learned
choice of weighting, not a per-round free weight per client, and it has
8 numbers to fit on the proxy set rather than k + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.aggregation._distribution import label_kl
from fedjax_pers.aggregation._quality import cosine_to_mean
from fedjax_pers.aggregation._weights import masked_softmax
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, weighted_sum, zero_nonfinite

Params = Any

FAMILIES = ("num_examples", "uniform", "loss", "label_divergence", "cosine")
TEMPERED = ("loss", "label_divergence", "cosine")   # the families with a temperature


class AutoState(NamedTuple):
  """The learned mixture and the optimizer's state, carried across rounds.

  Attributes:
    logits: `[5]` mixture logits a (π = softmax(a)), in the order of `FAMILIES`.
    log_temperature: `[3]` log τ of the families in `TEMPERED`.
    opt_state: The optimizer's state of (a, log τ).
    proxy_loss: The proxy loss J of the last round's aggregate (NaN before the first).
  """

  logits: jax.Array
  log_temperature: jax.Array
  opt_state: Any
  proxy_loss: jax.Array

  def mixture(self) -> dict[str, float]:
    """π by family name (host values; for reports)."""
    return dict(zip(FAMILIES, np.asarray(jax.nn.softmax(self.logits)).tolist()))

  def temperatures(self) -> dict[str, float]:
    """τ by family name (host values; for reports)."""
    return dict(zip(TEMPERED, np.exp(np.asarray(self.log_temperature)).tolist()))


def family_weights(outputs, log_temperature: jax.Array, population=None) -> jax.Array:
  """`[5, k]` each family's weights of the cohort (rows sum to one over finite clients).

  Differentiable in `log_temperature`; non-finite clients get zero in every row
  and no gradient (their losses and histograms are masked before use).
  `population`: the `[C]` label distribution q, else the cohort's pooled one.
  """
  finite = outputs.finite
  n = outputs.num_examples.astype(jnp.float32)
  keep = finite & (n > 0)
  log_n = jnp.log(jnp.where(keep, n, 1.0))
  tau = jnp.exp(log_temperature)
  losses = jnp.where(finite, outputs.train_loss, 0.0)
  hist = jnp.where(finite[:, None], outputs.label_hist, 0.0)
  q = (safe_divide(jnp.sum(hist, 0), jnp.sum(hist)) if population is None else population)
  kl = jnp.where(keep, label_kl(hist, q), 0.0)
  cos = cosine_to_mean(outputs)
  return jnp.stack([
      masked_softmax(log_n, keep),
      normalize(jnp.ones_like(n), finite),
      masked_softmax(-losses / tau[0], finite),
      masked_softmax(log_n - kl / tau[1], keep),
      masked_softmax(log_n + cos / tau[2], keep),
  ])


def auto_weights(outputs, logits: jax.Array, log_temperature: jax.Array,
                 population=None) -> jax.Array:
  """`[k]` the mixture `w_i = Σ_f softmax(a)_f w^f_i` (see `family_weights`)."""
  w = jax.nn.softmax(logits) @ family_weights(outputs, log_temperature, population)
  return normalize(w, outputs.finite)


def auto_objective(objective: Callable[[Params], jax.Array], params: Params, outputs,
                   logits: jax.Array, log_temperature: jax.Array,
                   population=None) -> jax.Array:
  """J(a, log τ) = `objective(w_t + Σ_i w_i Δ_i)` with the mixture weights `auto_weights`."""
  w = auto_weights(outputs, logits, log_temperature, population)
  mean = weighted_sum(w, zero_nonfinite(outputs))
  return objective(jax.tree.map(jnp.add, params, mean))


def auto(objective: Callable[[Params], jax.Array], *, steps: int = 1,
         optimizer: optax.GradientTransformation | None = None,
         population=None) -> Aggregator:
  """Weights from a mixture of weighting families learned by hypergradient on a proxy set.

  See the module docstring for the families and the objective. Every round the
  server takes `steps` steps of `optimizer` (default Adam, lr 0.05) on
  ∇_(a, log τ) J, then aggregates with the updated mixture. The reported weights
  are the mixture's; the state (`AutoState`) has π and τ for the reports.

  Args:
    objective: `objective(params) -> scalar`, the server's proxy loss, e.g.
      `fedjax_pers.hypergrad.held_out_loss(model, proxy_x, proxy_y)`.
    steps: Optimizer steps per round (≥ 1).
    optimizer: Optax optimizer of (a, log τ); its state carries over rounds.
    population: Optional `[C]` label distribution q of the divergence family
      (> 0 for every label); default: the cohort's pooled labels.

  Returns:
    The `Aggregator` (not separable: it needs the whole cohort's updates).
  """
  if not callable(objective):
    raise ValueError(f"objective must be a callable params -> scalar; got {objective!r}.")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps must be a positive int; got {steps!r}.")
  if population is not None:
    q = np.asarray(population, np.float64)
    if q.ndim != 1 or np.any(q <= 0) or abs(q.sum() - 1) > 1e-4:
      raise ValueError(f"population must be a 1-D distribution with every entry > 0 "
                       f"(summing to 1); got {population!r}.")
    population = jnp.asarray(q, jnp.float32)
  tx = optax.adam(0.05) if optimizer is None else optimizer

  def init(num_clients):
    del num_clients
    z = (jnp.zeros((len(FAMILIES),), jnp.float32), jnp.zeros((len(TEMPERED),), jnp.float32))
    return AutoState(*z, tx.init(z), jnp.full((), jnp.nan, jnp.float32))

  def apply(outputs, state, params):
    j = lambda z: auto_objective(objective, params, outputs, *z, population)

    def step(carry, _):
      z, opt = carry
      updates, opt = tx.update(jax.grad(j)(z), opt, z)
      return (optax.apply_updates(z, updates), opt), None

    z = (state.logits, state.log_temperature)
    (z, opt), _ = jax.lax.scan(step, (z, state.opt_state), None, length=steps)
    w = auto_weights(outputs, *z, population)
    mean = weighted_sum(w, zero_nonfinite(outputs))
    loss = objective(jax.tree.map(jnp.add, params, mean))
    return mean, w, AutoState(*z, opt, jnp.asarray(loss, jnp.float32))

  return Aggregator(init=init, apply=apply)
