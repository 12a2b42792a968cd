"""One client's data and what it sends back, and the small functions local training shares."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    id: The client's index in the population (int32), or None outside a round.
  """

  x: jax.Array
  y: jax.Array
  num_examples: jax.Array
  state: Any = None
  id: jax.Array | None = None


class ClientOutput(NamedTuple):
  """What a client sends back after local training.

  Attributes:
    delta: Local model minus the model it started from, `w_i - w_t`.
    num_examples: `n_i`, int32.
    train_loss: Mean per-example loss over the examples of local training, each
      measured before the step that used it.
    num_steps: Local steps that saw at least one real example, int32 (set by
      the engine from `LocalProgram.num_steps`).
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
