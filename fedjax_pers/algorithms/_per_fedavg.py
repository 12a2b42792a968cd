"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020): a meta-learned initialization."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.aggregation._weights import WeightFn, uniform
from fedjax_pers.core._aggregate import Aggregator, as_aggregator, check_no_client_losses
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import ClientOutput, all_finite, label_histogram
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, Steps
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.personalization._meta import (
  MetaSGDParams,
  batch_loss,
  check_method,
  meta_gradient,
)


class MetaCarry(NamedTuple):
  """A Per-FedAvg client during its τ meta-steps."""

  w: Any
  opt_state: Any
  loss_sum: jax.Array


# `hessian` option -> (meta_gradient method, Hessian-vector product).
HESSIANS = {
    "exact": ("hessian_free", "exact"),
    "autodiff": ("second_order", "exact"),
    "finite_difference": ("hessian_free", "finite_difference"),
    "none": ("first_order", "exact"),
}


def per_fedavg(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    inner_lr: float,
    clients_per_round: int,
    hessian: str = "exact",
    delta: float = 1e-3,
    inner_steps: int = 1,
    meta_sgd: bool = False,
    remat: bool = False,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """Per-FedAvg: clients take τ meta-steps on the MAML objective; the server averages.

  Each of the τ = `work.steps` local steps of client i draws independent batches
  D (K = `inner_steps` of them), D′ and D″ (K of them) and updates

    w ← w − β (I − α ∇²f_i(w; D″)) ∇f_i(w − α ∇f_i(w; D); D′)

  with β the step of `client_tx` (`optax.sgd(β)` in the paper) and α =
  `inner_lr` (for K > 1, the product of the K steps' Jacobians; see
  `personalization.meta_gradient`). How the Hessian term is computed
  (`hessian`) gives the paper's three variants:

  * `exact`: Per-FedAvg, the exact Hessian-vector product ∇²f(w; D″) g by
    forward-over-reverse differentiation (`jax.jvp` of `jax.grad`);
  * `autodiff`: the same exact meta-gradient by `jax.grad` through the inner
    steps (more memory and time; `remat` applies to it);
  * `finite_difference`: Per-FedAvg (HF), the product replaced by
    [∇f(w + δg; D″) − ∇f(w − δg; D″)] / 2δ;
  * `none`: Per-FedAvg (FO), the Hessian term dropped (no D″ drawn).

  The server
  applies `server_tx` to the mean of w_i − w_t (uniform weights, as the paper's
  (1/rn) Σ w_i; `sgd(1.0)` averages the models). A client's personalized model
  is the global one after a few steps of SGD with rate α on its own data
  (`personalization.personalize`).

  With `meta_sgd=True` the inner rate is one learned α per parameter (Meta-SGD,
  Li et al., 2017): `model` must be `meta_sgd_model(plain_model, α_0)`, whose
  parameters are `MetaSGDParams(θ, α)`; α is meta-trained and averaged with θ
  (`inner_lr` is then unused), and clients adapt with `meta_sgd_tx()`.

  Args:
    model: The model (a `meta_sgd_model` with `meta_sgd`).
    client_tx: The outer (meta) optimizer of local training, `optax.sgd(β)`.
    server_tx: Server optimizer on the mean update.
    work: `LocalWork(batch_size, steps=τ)`: τ meta-steps of batches of this size.
    inner_lr: α (the initial α comes from the `meta_sgd_model` with `meta_sgd`).
    clients_per_round: Cohort size.
    hessian: `exact`, `autodiff`, `finite_difference` or `none` (above).
    delta: The finite difference's δ.
    inner_steps: K, adaptation steps inside the meta-objective (the paper: 1).
    meta_sgd: Learn one inner rate per parameter.
    remat: Rematerialise the inner steps in the backward pass (`jax.checkpoint`;
      `hessian='autodiff'` only: the other forms keep no activations).
    weighting: Aggregation (default uniform, as the paper).
    execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`.
  """
  check_local_work(work)
  if not isinstance(work.steps, int):
    raise ValueError("Per-FedAvg counts local meta-steps: work must set steps (τ), one int for "
                     f"every client; got {work}.")
  if hessian not in HESSIANS:
    raise ValueError(f"hessian must be one of {sorted(HESSIANS)}; got {hessian!r}.")
  method, hvp = HESSIANS[hessian]
  check_method(method, hvp, delta)
  if not (isinstance(inner_steps, int) and inner_steps >= 1):
    raise ValueError(f"inner_steps (K) must be an int >= 1; got {inner_steps!r}.")
  # A traced α (a hyperparameter being differentiated) is not checked.
  if not isinstance(inner_lr, jax.core.Tracer) and not (
      np.ndim(inner_lr) == 0 and np.isfinite(inner_lr) and inner_lr > 0):
    raise ValueError(f"inner_lr (alpha) must be a finite number > 0; got {inner_lr!r}.")
  aggregator = as_aggregator(uniform() if weighting is None else weighting)
  check_no_client_losses(aggregator, "per_fedavg")
  k = inner_steps
  per_step = k + 1 + (0 if hessian == "none" else k)
  plan_work = LocalWork(work.batch_size, steps=work.steps * per_step)
  is_meta_sgd = isinstance(jax.eval_shape(model.init, jax.random.key(0)), MetaSGDParams)
  if meta_sgd != is_meta_sgd:
    raise ValueError(
        f"meta_sgd={meta_sgd} needs {'a' if meta_sgd else 'no'} meta_sgd_model: the model's "
        f"params are {'' if is_meta_sgd else 'not '}MetaSGDParams.")
  loss_fn = batch_loss(model)
  if meta_sgd:
    loss_fn = lambda theta, b, f=loss_fn: f(MetaSGDParams(theta, None), b)

  def meta_step(w, batches):
    support = jax.tree.map(lambda a: a[:k], batches)
    query = jax.tree.map(lambda a: a[k], batches)
    curvature = None if hessian == "none" else jax.tree.map(lambda a: a[k + 1:], batches)
    theta, lr = (w.model, w.inner_lr) if meta_sgd else (w, inner_lr)
    mg = meta_gradient(loss_fn, theta, lr, support, query, curvature, method=method,
                       hvp_method=hvp, delta=delta, remat=remat)
    grads = MetaSGDParams(mg.params, mg.inner_lr) if meta_sgd else mg.params
    return grads, mg.loss

  def make_program(data: FederatedData):
    shape = (work.steps, per_step, work.batch_size)

    def start(params, client, key):
      plan = batch_plan(key, client.num_examples, plan_work, max_examples=data.max_examples,
                        min_examples=data.min_examples)
      zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
      keys = jax.random.split(jax.random.fold_in(key, 1), work.steps)   # dropout's
      return (MetaCarry(params, client_tx.init(params), zero),
              Steps(plan.idx.reshape(shape), plan.mask.reshape(shape), keys))

    def step(params, c, batch):
      keys = jax.random.split(batch.extra, per_step)   # one per batch of the meta-step
      grads, loss = meta_step(c.w, (batch.x, batch.y, batch.mask, keys))
      updates, opt_state = client_tx.update(grads, c.opt_state, c.w)
      return MetaCarry(optax.apply_updates(c.w, updates), opt_state, c.loss_sum + loss)

    def finish(params, client, c):
      delta_ = jax.tree.map(jnp.subtract, c.w, params)
      return ClientOutput(
          delta=delta_, num_examples=client.num_examples,
          train_loss=c.loss_sum / work.steps, num_steps=jnp.asarray(work.steps, jnp.int32),
          label_hist=label_histogram(client, data.num_classes), finite=all_finite(delta_))

    return LocalProgram(start, step, finish, lambda client: work.steps)

  return assemble(model, make_program, aggregator, server_tx,
                  clients_per_round=clients_per_round, execution=execution)
