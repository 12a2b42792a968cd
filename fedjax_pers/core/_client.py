"""Local training of one client: optax steps under `lax.scan`, FedProx's proximal term."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.core._batching import BatchPlan, LocalWork, batch_plan
from fedjax_pers.core._model import Model

Params = Any


class ClientData(NamedTuple):
  """One client's padded rows of a `FederatedData`.

  Attributes:
    x: `[max_examples, *feature_shape]`.
    y: `[max_examples]` int32.
    num_examples: Scalar int32, the number of real examples.
    state: The client's own state kept across rounds (personal parameters of
      Ditto, pFedMe, personal layers...), or None.
  """

  x: jax.Array
  y: jax.Array
  num_examples: jax.Array
  state: Any = None


class ClientOutput(NamedTuple):
  """What a client sends back after local training.

  Attributes:
    delta: Local model minus the model it started from, `w_i - w_t`.
    num_examples: `n_i`, int32.
    train_loss: Mean per-example loss over the examples of local training, each
      measured before the step that used it.
    num_steps: Local steps that saw at least one real example, int32.
    label_hist: `[num_classes]` counts of the client's labels.
    finite: True when every entry of `delta` is finite.
    loss_before: Mean loss of `w_t` over the client's data (only when the
      aggregator asks for `client_losses`, else None).
    loss_after: Mean loss of the local model over the client's data (idem).
    client_id: The client's index in the population; set by the round, None
      inside the client update.
    client_state: The client's new state (written back into the server state
      for the sampled clients), or None for algorithms without one.
  """

  delta: Params
  num_examples: jax.Array
  train_loss: jax.Array
  num_steps: jax.Array
  label_hist: jax.Array
  finite: jax.Array
  loss_before: jax.Array | None = None
  loss_after: jax.Array | None = None
  client_id: jax.Array | None = None
  client_state: Any = None


ClientUpdate = Callable[[Params, ClientData, jax.Array], ClientOutput]


def tree_sq_norm(tree: Params) -> jax.Array:
  """`Σ ||leaf||²` over all leaves."""
  return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def masked_mean_loss(
    model: Model, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean loss over the real (masked-in) examples of a batch, and their loss sum.

  Padded examples contribute neither to the value nor to its gradient.
  """
  losses = model.loss(model.apply(params, x, key=key, train=True), y)
  losses = jnp.where(mask, losses, 0.0)
  total = jnp.sum(losses)
  return total / jnp.maximum(jnp.sum(mask), 1), total


def all_finite(tree: Params) -> jax.Array:
  """True when every entry of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def label_histogram(client: ClientData, num_classes: int) -> jax.Array:
  """`[num_classes]` counts of the client's real labels (float32)."""
  valid = jnp.arange(client.y.shape[0]) < client.num_examples
  onehot = (client.y[:, None] == jnp.arange(num_classes)[None, :]) & valid[:, None]
  return jnp.sum(onehot, axis=0, dtype=jnp.float32)


def stack_clients(tree: Params, num_clients: int) -> Params:
  """`num_clients` copies of every leaf along a new leading axis (per-client state)."""
  return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients,) + p.shape).copy(), tree)


def full_loss(model: Model, params: Params, client: ClientData) -> jax.Array:
  """Mean loss of `params` over all real examples of a client (no training mode)."""
  losses = model.loss(model.apply(params, client.x), client.y)
  valid = jnp.arange(client.y.shape[0]) < client.num_examples
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(client.num_examples, 1)


def local_train(
    model: Model,
    tx: optax.GradientTransformation,
    params: Params,
    client: ClientData,
    plan: BatchPlan,
    key: jax.Array,
    *,
    prox_mu: float | jax.Array | None = None,
    anchor: Params | None = None,
    guard_empty_steps: bool = True,
) -> tuple[Params, jax.Array, jax.Array, jax.Array]:
  """Runs the local steps of `plan` with optimizer `tx` from `params`.

  Each step minimises, on its batch `b` of real examples,

    f_b(w) = (1/|b|) Σ_{j∈b} ℓ(w; x_j, y_j) + (μ/2) ||w − w_t||²,

  where `w_t = anchor` (default `params`) and the proximal term (FedProx, Li et
  al., MLSys 2020; Ditto's λ with the global model as anchor) is present when
  `prox_mu` is not None. A step whose batch is all padding leaves
  the parameters and the optimizer state unchanged.

  Args:
    model: The model.
    tx: Client optimizer (any optax transformation).
    params: Starting point `w_t`.
    client: The client's padded data.
    plan: Batches of every step.
    key: PRNG key (dropout).
    prox_mu: FedProx's μ, or None for no proximal term.
    anchor: Centre of the proximal term (default: the starting `params`).
    guard_empty_steps: Keep the state of all-padding steps unchanged. Only
      plans that can have such steps (local epochs) need it; with local steps
      every step holds a real example and the select is skipped.

  Returns:
    `(w_local, loss_sum, example_count, steps_taken)`.
  """
  anchor = params if anchor is None else anchor
  step_keys = jax.random.split(key, plan.idx.shape[0])

  def objective(w, xb, yb, mb, k):
    mean, total = masked_mean_loss(model, w, xb, yb, mb, k)
    if prox_mu is not None:
      diff = jax.tree.map(jnp.subtract, w, anchor)
      mean = mean + 0.5 * prox_mu * tree_sq_norm(diff)
    return mean, total

  def step(carry, inputs):
    w, opt_state, loss_sum, count, steps = carry
    idx, mb, k = inputs
    (_, total), grads = jax.value_and_grad(objective, has_aux=True)(
        w, client.x[idx], client.y[idx], mb, k)
    updates, new_opt_state = tx.update(grads, opt_state, w)
    new_w = optax.apply_updates(w, updates)
    active = jnp.any(mb)
    if guard_empty_steps:
      keep = lambda new, old: jnp.where(active, new, old)
      new_w = jax.tree.map(keep, new_w, w)
      new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    carry = (new_w, new_opt_state, loss_sum + total.astype(loss_sum.dtype),
             count + jnp.sum(mb, dtype=jnp.int32), steps + active)
    return carry, None

  zero = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
  init = (params, tx.init(params), zero, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  (w, _, loss_sum, count, steps), _ = jax.lax.scan(
      step, init, (plan.idx, plan.mask, step_keys))
  return w, loss_sum, count, steps


def make_client_update(
    model: Model,
    tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    num_classes: int,
    max_examples: int,
    min_examples: int = 1,
    prox_mu: float | None = None,
    client_losses: bool = False,
) -> ClientUpdate:
  """The FedAvg / FedProx client update, written for one client.

  Args:
    model: The model.
    tx: Client optimizer.
    work: Local epochs or steps and the batch size.
    num_classes: Size of the label histogram.
    max_examples: Padded length of the client rows (static).
    min_examples: Smallest client (static; see `batch_plan`).
    prox_mu: FedProx's μ (None: plain FedAvg).
    client_losses: Also report `loss_before` and `loss_after` (see
      `ClientOutput`), for weightings and aggregators that use them.

  Returns:
    `client_update(params, client, key) -> ClientOutput`.
  """

  def client_update(params, client, key):
    k_plan, k_train = jax.random.split(key)
    plan = batch_plan(k_plan, client.num_examples, work, max_examples=max_examples,
                      min_examples=min_examples)
    w, loss_sum, count, steps = local_train(
        model, tx, params, client, plan, k_train, prox_mu=prox_mu,
        guard_empty_steps=work.epochs is not None)
    delta = jax.tree.map(jnp.subtract, w, params)
    finite = all_finite(delta)
    hist = label_histogram(client, num_classes)
    losses = (full_loss(model, params, client), full_loss(model, w, client)
              ) if client_losses else (None, None)
    return ClientOutput(
        delta=delta, num_examples=client.num_examples,
        train_loss=loss_sum / jnp.maximum(count, 1), num_steps=steps,
        label_hist=hist, finite=finite, loss_before=losses[0], loss_after=losses[1])

  return client_update
