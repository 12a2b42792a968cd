"""MAML's inner adaptation and its meta-gradient: exact, first order, Hessian-free.

A client adapts the initialization θ by K SGD steps on support batches D_1..D_K,

  w_0 = θ,   w_{j+1} = w_j − α ∘ ∇f(w_j; D_j),

and the meta-objective is the query loss F(θ) = f(w_K; D′) (MAML, Finn et al.,
ICML 2017). Its gradient is the product of the steps' Jacobians applied to the
query gradient,

  ∇F(θ) = Π_{j=0}^{K−1} (I − ∇²f(w_j; D″_j) diag(α)) · ∇f(w_K; D′)

(the transposed step Jacobians, j = 0 leftmost; diag(α) = αI for a scalar α),

where the curvature batches D″_j are the support batches (MAML) or independent
batches (Per-FedAvg, Fallah et al., NeurIPS 2020). Three ways to compute it:

* `second_order`: `jax.grad` straight through the inner `lax.scan`: exact.
* `first_order`: the inner gradients are constants (FO-MAML): ∇F ≈ ∇f(w_K; D′).
* `hessian_free`: the product is applied backwards with Hessian-vector
  products, either exact (`jax.jvp` of the gradient, forward over reverse) or
  the central finite difference of Per-FedAvg's HF variant,
  ∇²f(w) v ≈ [∇f(w + δv) − ∇f(w − δv)] / 2δ.

The inner learning rate α is a scalar or, for Meta-SGD (Li et al., 2017), a
pytree shaped like θ (one rate per parameter); every method also returns the
gradient with respect to α.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pers.core._client import masked_mean_loss
from fedjax_pers.core._model import Model

Params = Any
Batch = tuple[jax.Array, jax.Array, jax.Array]   # x, y, mask
LossFn = Callable[[Params, Batch], jax.Array]

METHODS = ("second_order", "first_order", "hessian_free")
HVP_METHODS = ("exact", "finite_difference")


class MetaGradient(NamedTuple):
  """The meta-objective and its gradients.

  Attributes:
    loss: Query loss of the adapted parameters, f(w_K; D′).
    params: ∇_θ F, shaped like θ.
    inner_lr: ∇_α F, shaped like α (a scalar or a Meta-SGD pytree).
  """

  loss: jax.Array
  params: Params
  inner_lr: Any


def batch_loss(model: Model) -> LossFn:
  """`loss(params, (x, y, mask))`: the masked mean loss of a batch."""
  return lambda params, b: masked_mean_loss(model, params, *b)[0]


def _per_param(lr: Any, tree: Params) -> bool:
  """Whether α is a Meta-SGD pytree shaped like the parameters (else a scalar)."""
  return jax.tree.structure(lr) == jax.tree.structure(tree) and jnp.ndim(
      jax.tree.leaves(lr)[0]) == jnp.ndim(jax.tree.leaves(tree)[0])


def check_inner_lr(inner_lr: Any, params: Params) -> None:
  """Raises `ValueError` unless α is a scalar or a pytree of the parameters' shapes."""
  leaves = jax.tree.leaves(inner_lr)
  if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0 and not _per_param(inner_lr, params):
    return
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  if jax.tree.structure(inner_lr) != jax.tree.structure(params) or shapes(
      inner_lr) != shapes(params):
    raise ValueError(
        "inner_lr must be a scalar or (Meta-SGD) a pytree with the parameters' structure and "
        f"shapes {shapes(params)}; got {shapes(inner_lr)}.")


def _scale(lr: Any, tree: Params) -> Params:
  """`α ∘ tree` for a scalar or per-parameter α."""
  if _per_param(lr, tree):
    return jax.tree.map(jnp.multiply, lr, tree)
  return jax.tree.map(lambda t: lr * t, tree)


def check_method(method: str, hvp: str = "exact", delta: float = 1e-3) -> None:
  """Raises `ValueError` unless the options name a meta-gradient."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  if hvp not in HVP_METHODS:
    raise ValueError(f"hvp must be one of {HVP_METHODS}; got {hvp!r}.")
  if not (np.isscalar(delta) and np.isfinite(delta) and delta > 0):
    raise ValueError(f"delta (finite-difference step) must be a finite number > 0; got "
                     f"{delta!r}.")


def adapt(loss_fn: LossFn, params: Params, inner_lr: Any, support: Batch,
          curvature: Batch | None = None, *, first_order: bool = False,
          remat: bool = False) -> Params:
  """K inner SGD steps `w ← w − α ∘ ∇f(w; D_j)` under `lax.scan`.

  Args:
    loss_fn: `loss(params, batch) -> scalar`.
    params: θ.
    inner_lr: α, a scalar or a pytree shaped like θ (Meta-SGD).
    support: Batches `D_j` stacked on a leading axis of length K.
    curvature: Optional batches `D″_j` (same leading K) that carry the
      derivative of the steps: each step's value is `w − α ∘ ∇f(w; D_j)`, its
      Jacobian `I − α ∘ ∇²f(w; D″_j)` (Per-FedAvg). Default: the support.
    first_order: Treat the inner gradients as constants (FO-MAML).
    remat: Recompute each step's activations in the backward pass
      (`jax.checkpoint`) instead of keeping K of them.

  Returns:
    The adapted parameters w_K.
  """
  grad = jax.grad(loss_fn)

  def step(w, batches):
    d, dd = batches
    g = grad(w, d)
    if first_order:
      g = jax.lax.stop_gradient(g)
    elif dd is not None:
      # Value ∇f(w; D), derivative ∇²f(w; D″).
      h = grad(w, dd)
      g = jax.tree.map(lambda a, b: jax.lax.stop_gradient(a) + b - jax.lax.stop_gradient(b),
                       g, h)
    return jax.tree.map(jnp.subtract, w, _scale(inner_lr, g)), None

  if remat:
    step = jax.checkpoint(step)
  w, _ = jax.lax.scan(step, params, (support, curvature))
  return w


def hvp(loss_fn: LossFn, params: Params, batch: Batch, v: Params, *,
        method: str = "exact", delta: float = 1e-3) -> Params:
  """The Hessian-vector product ∇²f(w; batch) v.

  `exact`: `jax.jvp` of `jax.grad` (forward over reverse). `finite_difference`:
  [∇f(w + δv) − ∇f(w − δv)] / 2δ, Per-FedAvg's HF estimate (error O(δ²)).
  """
  grad = lambda w: jax.grad(loss_fn)(w, batch)
  if method == "exact":
    return jax.jvp(grad, (params,), (v,))[1]
  # Both points in one batched gradient call.
  points = jax.tree.map(lambda p, vi: jnp.stack([p + delta * vi, p - delta * vi]), params, v)
  both = jax.vmap(grad)(points)
  return jax.tree.map(lambda g: (g[0] - g[1]) / (2 * delta), both)


def meta_gradient(loss_fn: LossFn, params: Params, inner_lr: Any, support: Batch,
                  query: Batch, curvature: Batch | None = None, *,
                  method: str = "second_order", hvp_method: str = "exact",
                  delta: float = 1e-3, remat: bool = False) -> MetaGradient:
  """F(θ) = f(adapt(θ); D′) and its gradients with respect to θ and α.

  Args:
    loss_fn: `loss(params, batch) -> scalar`.
    params: θ.
    inner_lr: α, a scalar or a Meta-SGD pytree shaped like θ.
    support: K support batches (leading axis K).
    query: The query batch D′.
    curvature: Optional K curvature batches D″ (see `adapt`); default the support.
    method: `second_order`, `first_order` or `hessian_free` (module docstring).
    hvp_method: For `hessian_free`: `exact` or `finite_difference`.
    delta: The finite difference's δ.
    remat: Rematerialise the inner steps (`second_order`, `first_order`).

  Returns:
    A `MetaGradient`.
  """
  check_method(method, hvp_method, delta)
  check_inner_lr(inner_lr, params)
  if method != "hessian_free":
    def outer(theta, lr):
      w = adapt(loss_fn, theta, lr, support, curvature,
                first_order=method == "first_order", remat=remat)
      return loss_fn(w, query)
    loss, (g_theta, g_lr) = jax.value_and_grad(outer, argnums=(0, 1))(params, inner_lr)
    return MetaGradient(loss, g_theta, g_lr)

  grad = jax.grad(loss_fn)
  curvature = support if curvature is None else curvature

  def forward(w, d):
    g = grad(w, d)
    return jax.tree.map(jnp.subtract, w, _scale(inner_lr, g)), (w, g)

  w_k, (ws, gs) = jax.lax.scan(forward, params, support)
  loss, v = jax.value_and_grad(loss_fn)(w_k, query)

  # Backwards: v_j = (I − ∇²f(w_j; D″_j) α∘) v_{j+1};  ∂F/∂α += −∇f(w_j; D_j) ∘ v_{j+1}.
  def backward(carry, inputs):
    v, g_lr = carry
    w, g, dd = inputs
    contrib = jax.tree.map(lambda gi, vi: -gi * vi, g, v)
    if per_param:
      g_lr = jax.tree.map(jnp.add, g_lr, contrib)
    else:
      g_lr = g_lr + sum(jnp.sum(c) for c in jax.tree.leaves(contrib))
    # H (α∘v) = ᾱ · H ((α∘v)/ᾱ) with ᾱ = mean |α|: for a scalar α the product is
    # taken along v itself, so the finite difference steps by δ·v as Per-FedAvg's HF.
    hv = hvp(loss_fn, w, dd, jax.tree.map(lambda u: u / scale, _scale(inner_lr, v)),
             method=hvp_method, delta=delta)
    return (jax.tree.map(lambda vi, h: vi - scale * h, v, hv), g_lr), None

  per_param = _per_param(inner_lr, params)
  dtype = jax.tree.leaves(params)[0].dtype
  leaves = [jnp.abs(a) for a in jax.tree.leaves(inner_lr)]
  scale = sum(jnp.sum(a) for a in leaves) / sum(a.size for a in leaves)
  scale = jnp.where(scale > 0, scale, 1.0).astype(dtype)
  zero_lr = (jax.tree.map(jnp.zeros_like, inner_lr) if per_param
             else jnp.zeros(jnp.shape(inner_lr), dtype))
  (v, g_lr), _ = jax.lax.scan(backward, (v, zero_lr), (ws, gs, curvature), reverse=True)
  return MetaGradient(loss, v, g_lr)


class MetaSGDParams(NamedTuple):
  """Meta-SGD's meta-parameters: the initialization and one inner rate per parameter.

  Attributes:
    model: θ, the model's parameters.
    inner_lr: α, a pytree shaped like θ.
  """

  model: Params
  inner_lr: Params


def meta_sgd_model(model: Model, inner_lr: float) -> Model:
  """`model` whose parameters are `MetaSGDParams` (Meta-SGD, Li et al., 2017).

  `init` adds α = `inner_lr` for every parameter; `apply` uses θ only, so the
  global model evaluates as before and the server averages θ and α alike.
  """

  if not (np.isscalar(inner_lr) and np.isfinite(inner_lr) and inner_lr > 0):
    raise ValueError(f"inner_lr (the initial Meta-SGD rate) must be a finite number > 0; got "
                     f"{inner_lr!r}.")

  def init(key):
    theta = model.init(key)
    return MetaSGDParams(theta, jax.tree.map(lambda p: jnp.full_like(p, inner_lr), theta))

  def apply(params, x, key=None, train=False):
    return model.apply(params.model, x, key=key, train=train)

  return model._replace(init=init, apply=apply)


def meta_sgd_tx() -> optax.GradientTransformation:
  """The adaptation step of Meta-SGD as an optax transformation: θ ← θ − α ∘ ∇θ.

  Use with a `meta_sgd_model`: the updates of α are zero.
  """
  def update(grads, state, params):
    if params is None:
      raise ValueError("meta_sgd_tx needs params (the Meta-SGD rates live in them).")
    step = jax.tree.map(lambda a, g: -a * g, params.inner_lr, grads.model)
    return MetaSGDParams(step, jax.tree.map(jnp.zeros_like, grads.inner_lr)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
