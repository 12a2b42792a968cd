"""FedRoD (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022): a generic head for the federation, a personal head per client."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work
from fedjax_pers.core._client import label_histogram
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import tree_where
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import apply_grads, client_output, sgd_init, sgd_program
from fedjax_pers.personalization._layers import (
    Predicate,
    last_layer,
    merge,
    path_mask,
    personal_part,
)

Params = Any


def balanced_softmax_loss(model: Model, logits: jax.Array, y: jax.Array,
                          counts: jax.Array) -> jax.Array:
  """`[batch]` the balanced softmax loss (Ren et al., NeurIPS 2020; FedRoD's Eq. 5):

    ℓ_BSM(z, y) = −log( n_y e^{z_y} / Σ_c n_c e^{z_c} ) = ℓ(z + log n, y),

  with n_c the client's count of label c (a label it lacks gets probability 0),
  so that the generic head learns the class-balanced posterior.
  """
  log_n = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)
  return model.loss(logits + log_n.astype(logits.dtype).reshape(
      (1,) * (logits.ndim - 1) + (-1,)), y)


def fedrod(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    head: Predicate | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedRoD: FedAvg of a body and a generic head trained with the balanced softmax, and a
  personal head per client on top of them (the paper's Algorithm 1, linear heads).

  On each local batch, from the local model w = (θ, ψ) and the client's personal
  head φ_i, both at their values before the step:
    (θ, ψ) ← step of `client_tx` on mean ℓ_BSM(G_ψ(f_θ(x)), y)   (generic),
    φ_i ← step of `client_tx` on mean ℓ(G_ψ(f_θ(x)) + P_φ(f_θ(x)), y), only φ_i moving
                                                                 (personal).
  The server averages Δ = (θ, ψ) − w_t as FedAvg; the reported training loss is
  the balanced softmax's. The heads are linear (the
  `head` leaves, default the last layer, a Dense: kernel and bias), so the
  personalized prediction G_ψ + P_φ is the model whose head is ψ + φ_i, which is
  what `personal` returns; φ_i starts at the initial head (as the paper's code
  copies it). Newcomers (held-out clients) fine-tune.

  Args:
    model: The model; its head must be linear in the representation.
    client_tx, server_tx, work, clients_per_round, weighting, execution: As
      `fedavg`.
    head: Predicate naming the head leaves (default the last layer).

  Returns:
    The `FederatedAlgorithm`; client state: φ_i, a tuple of the head's leaves.
  """
  check_local_work(work)
  template = jax.eval_shape(model.init, jax.random.key(0))
  mask = path_mask(template, last_layer(template) if head is None else head)
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)
    sgd = sgd_program(model, client_tx, work, max_examples=data.max_examples,
                      min_examples=data.min_examples)

    def start(params, client, key):
      state, steps = sgd.start(params, client, key)
      counts = label_histogram(client, data.num_classes)
      return (state, sgd_init(client_tx, client.state), counts), steps

    def step(params, carry, batch):
      s, p, counts = carry
      x, y, mask_b, key = batch
      real = mask_b.astype(jnp.float32)
      mean = lambda v: jnp.sum(v * real) / jnp.maximum(jnp.sum(real), 1.0)

      def generic(w):
        logits = model.apply(w, x, key=key, train=True)
        losses = jnp.where(mask_b, balanced_softmax_loss(model, logits, y, counts), 0.0)
        return mean(losses), jnp.sum(losses)

      def personal(phi):   # only φ_i moves: the body and the generic head are constants
        both = tuple(g + f for g, f in zip(personal_part(s.w, mask), phi))
        logits = model.apply(merge(s.w, both, mask), x, key=key, train=True)
        return mean(jnp.where(mask_b, model.loss(logits, y), 0.0))

      (_, total), g = jax.value_and_grad(generic, has_aux=True)(s.w)
      g_phi = jax.grad(personal)(p.w)
      new_p = apply_grads(client_tx, p, g_phi, jnp.zeros((), p.loss_sum.dtype), mask_b)
      keep = jnp.any(mask_b)
      return (tree_where(keep, apply_grads(client_tx, s, g, total, mask_b), s),
              tree_where(keep, new_p, p), counts)

    def finish(params, client, carry):
      s, p, _ = carry
      out = client_output(model, params, client, s.w, s.loss_sum, s.count, data.num_classes,
                          client_losses=aggregator.client_losses, also_finite=p.w)
      return out._replace(client_state=p.w)

    return sgd._replace(start=start, step=step, finish=finish)

  def client_states(params, num_clients):
    return tuple(jnp.broadcast_to(t, (num_clients,) + t.shape).copy()
                 for t in personal_part(params, mask))

  def personal(state):
    generic = personal_part(state.params, mask)
    one = lambda phi: merge(state.params, tuple(g + f for g, f in zip(generic, phi)), mask)
    return jax.vmap(one)(state.client_states)

  return assemble(model, make_program, aggregator, server_tx,
                  clients_per_round=clients_per_round, execution=execution,
                  client_states=client_states, personal=personal)

