"""Automated weights: a mixture of weighting families learned online by hypergradient.

Each round the server has six candidate weightings of the cohort (family f,
client i, the finite clients' weights summing to one):

  w^size_i = n_i / Σ_j n_j                        (FedAvg)
  w^unif_i = 1 / k
  w^loss_i ∝ exp(−L_i / τ_loss)                   (local training loss)
  w^div_i  ∝ n_i exp(−KL(p_i ‖ q) / τ_div)        (label divergence from q)
  w^cos_i  ∝ n_i exp(cos(Δ_i, Δ̄) / τ_cos)          (agreement with the mean update)
  w^law_i  = λ_i                                  (FedLAW's weights of this round)

and aggregates with their mixture `w_i = Σ_f π_f w^f_i`, `π = softmax(a)`,
scaled by FedLAW's global shrinking factor γ of this round:

  w_(t+1) = γ (w_t + Σ_i w_i Δ_i).

(λ, γ) is FedLAW's fit (Li et al., ICML 2023; `fedlaw_fit`): from λ = n / N and
γ = 1, `fedlaw_steps` steps of `fedlaw_optimizer` (default Adam) on the proxy loss
of `γ (w_t + Σ_i λ_i Δ_i)` with λ = softmax(θ), γ = exp(θ_γ). The parameters z = (a, log τ) are
learned online: in round t, before aggregating, the server takes `steps`
optimizer steps on the hypergradient

  ∇_z J(z),   J(z) = ℓ_proxy(γ (w_t + Σ_i w_i(z) Δ_i)),

the loss on its proxy split of the model the round's aggregation would give,
differentiated through the aggregation (λ and γ do not depend on z; gradients
through whole rounds, `fedjax_pers.hypergrad`, do flow through them). Unlike FedLAW's
(λ, γ), which start afresh every round, z and the optimizer's moments carry
over from round to round (π starts uniform and every τ at 1), so the mixture
is a slowly learned choice among the families, FedLAW's among them: 9 numbers
fitted on the proxy set over the run.

Without the FedLAW family and γ (the first five families alone), the mixture
stayed below the loss weighting and FedLAW on non-IID data
(`configs/compare_weighting.py`; README, "The automated weighting"): the proxy
loss of one round prefers flatter weights than the accuracy does, and FedLAW's
per-round fit with its shrinking is what the proxy loss can learn well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.aggregation._distribution import label_kl
from fedjax_pers.aggregation._fedlaw import fedlaw_fit, shrunk
from fedjax_pers.aggregation._quality import cosine_to_mean
from fedjax_pers.aggregation._weights import masked_softmax
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._cohort import normalize, safe_divide, weighted_sum, zero_nonfinite

Params = Any

FAMILIES = ("num_examples", "uniform", "loss", "label_divergence", "cosine", "fedlaw")
TEMPERED = ("loss", "label_divergence", "cosine")   # the families with a temperature


class AutoState(NamedTuple):
  """The learned mixture and the optimizer's state, carried across rounds.

  Attributes:
    logits: `[6]` mixture logits a (π = softmax(a)), in the order of `FAMILIES`.
    log_temperature: `[3]` log τ of the families in `TEMPERED`.
    opt_state: The optimizer's state of (a, log τ).
    proxy_loss: The proxy loss J of the last round's aggregate (NaN before the first).
    gamma: FedLAW's shrinking factor γ of the last round (1 before the first).
  """

  logits: jax.Array
  log_temperature: jax.Array
  opt_state: Any
  proxy_loss: jax.Array
  gamma: jax.Array

  def mixture(self) -> dict[str, float]:
    """π by family name (host values; for reports)."""
    return dict(zip(FAMILIES, np.asarray(jax.nn.softmax(self.logits)).tolist()))

  def temperatures(self) -> dict[str, float]:
    """τ by family name (host values; for reports)."""
    return dict(zip(TEMPERED, np.exp(np.asarray(self.log_temperature)).tolist()))


def family_weights(outputs, log_temperature: jax.Array, population=None, *,
                   learned: jax.Array) -> jax.Array:
  """`[6, k]` each family's weights of the cohort (rows sum to one over finite clients).

  Differentiable in `log_temperature`; non-finite clients get zero in every row
  and no gradient (their losses and histograms are masked before use).
  `population`: the `[C]` label distribution q, else the cohort's pooled one.
  `learned`: the `[k]` FedLAW row (`fedlaw_fit`), taken as it is.
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
      learned,
  ])


def auto_weights(outputs, logits: jax.Array, log_temperature: jax.Array,
                 population=None, *, learned: jax.Array) -> jax.Array:
  """`[k]` the mixture `w_i = Σ_f softmax(a)_f w^f_i` (see `family_weights`)."""
  w = jax.nn.softmax(logits) @ family_weights(outputs, log_temperature, population,
                                              learned=learned)
  return normalize(w, outputs.finite)


def auto_objective(objective: Callable[[Params], jax.Array], params: Params, outputs,
                   logits: jax.Array, log_temperature: jax.Array,
                   population=None, *, learned: jax.Array,
                   gamma: jax.Array = 1.0) -> jax.Array:
  """J(a, log τ) = `objective(γ (w_t + Σ_i w_i Δ_i))` with the mixture weights `auto_weights`."""
  w = auto_weights(outputs, logits, log_temperature, population, learned=learned)
  mean = weighted_sum(w, zero_nonfinite(outputs))
  return objective(shrunk(params, mean, gamma))


def auto(objective: Callable[[Params], jax.Array], *, steps: int = 1,
         optimizer: optax.GradientTransformation | None = None,
         population=None, fedlaw_steps: int = 100,
         fedlaw_optimizer: optax.GradientTransformation | None = None) -> Aggregator:
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
    fedlaw_steps: Steps of the FedLAW family's own fit each round (≥ 1).
    fedlaw_optimizer: Its optimizer (default Adam, lr 0.05, as `fedlaw`'s).

  Returns:
    The `Aggregator` (not separable: it needs the whole cohort's updates).
  """
  if not callable(objective):
    raise ValueError(f"objective must be a callable params -> scalar; got {objective!r}.")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps must be a positive int; got {steps!r}.")
  if not (isinstance(fedlaw_steps, int) and fedlaw_steps >= 1):
    raise ValueError(f"fedlaw_steps must be a positive int; got {fedlaw_steps!r}.")
  if population is not None:
    q = np.asarray(population, np.float64)
    if q.ndim != 1 or np.any(q <= 0) or abs(q.sum() - 1) > 1e-4:
      raise ValueError(f"population must be a 1-D distribution with every entry > 0 "
                       f"(summing to 1); got {population!r}.")
    population = jnp.asarray(q, jnp.float32)
  tx = optax.adam(0.05) if optimizer is None else optimizer
  law_tx = optax.adam(0.05) if fedlaw_optimizer is None else fedlaw_optimizer

  def init(num_clients):
    del num_clients
    z = (jnp.zeros((len(FAMILIES),), jnp.float32), jnp.zeros((len(TEMPERED),), jnp.float32))
    return AutoState(*z, tx.init(z), jnp.full((), jnp.nan, jnp.float32),
                     jnp.ones((), jnp.float32))

  def apply(outputs, state, params):
    learned, gamma = fedlaw_fit(objective, params, outputs, steps=fedlaw_steps,
                                optimizer=law_tx)
    j = lambda z: auto_objective(objective, params, outputs, *z, population, learned=learned,
                                 gamma=gamma)

    def step(carry, _):
      z, opt = carry
      updates, opt = tx.update(jax.grad(j)(z), opt, z)
      return (optax.apply_updates(z, updates), opt), None

    z = (state.logits, state.log_temperature)
    (z, opt), _ = jax.lax.scan(step, (z, state.opt_state), None, length=steps)
    w = auto_weights(outputs, *z, population, learned=learned)
    new = shrunk(params, weighted_sum(w, zero_nonfinite(outputs)), gamma)
    loss = objective(new)
    return (jax.tree.map(jnp.subtract, new, params), w,
            AutoState(*z, opt, jnp.asarray(loss, jnp.float32), gamma))

  return Aggregator(init=init, apply=apply)
