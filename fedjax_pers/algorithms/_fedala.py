"""FedALA (Zhang, Hua, Wang, Song, Xue, Ma & Guan, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work
from fedjax_pers.core._client import ClientData, masked_mean_loss
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import client_output, sgd_init, sgd_program
from fedjax_pers.personalization._layers import (
  Predicate,
  last_layer,
  merge,
  path_mask,
  personal_part,
)

Params = Any

NO_LOCAL, START, TRAINED = 0, 1, 2   # ALAState.phase


class ALAState(NamedTuple):
  """One client's FedALA state (over the top layers only; the lower ones are the server's).

  Attributes:
    local: θ_i, the top layers of the client's local model after its last round.
    weights: W_i, element-wise in [0, 1], the same shapes.
    phase: int32: `NO_LOCAL` (never trained: it starts from the global model),
      `START` (a local model, W_i still at ones: the next ALA trains W_i until its
      loss settles) or `TRAINED` (one ALA epoch per round).
  """

  local: tuple
  weights: tuple
  phase: jax.Array


def mixed(glob: tuple, local: tuple, weights: tuple) -> tuple:
  """ALA's θ̂ = θ + (Θ − θ) ⊙ W, written Θ − (Θ − θ) ⊙ (1 − W): exactly Θ where W = 1."""
  return tuple(g - (g - t) * (1 - w) for g, t, w in zip(glob, local, weights))


def ala(model: Model, params: Params, state: ALAState, client: ClientData, key: jax.Array,
        mask: list[bool], *, eta: float, sample_fraction: float, batch_size: int,
        threshold: float, num_pre_loss: int, max_start_epochs: int, max_examples: int
        ) -> tuple[jax.Array, tuple]:
  """Adaptive local aggregation (the paper's Eqs. 4-6): W_i's ALA epochs for this round.

  A random `sample_fraction` of the client's examples (at least one) is read in
  batches of `batch_size`, in one order for all epochs; on each batch
  W ← clip(W − η ∇_W L(θ̂(W)), 0, 1), with ∇_W L = ∇_θ̂ L ⊙ (Θ − θ). `TRAINED`
  clients run one epoch; `START` clients repeat epochs until the standard
  deviation of the last `num_pre_loss` epochs' losses (each epoch's last batch)
  is below `threshold`, after more than `num_pre_loss` epochs, or after
  `max_start_epochs` (a bound the paper leaves open); `NO_LOCAL` clients none.

  Returns:
    `(epochs run, W after them)`.
  """
  glob = personal_part(params, mask)
  n = client.num_examples
  m = jnp.maximum(jnp.floor(sample_fraction * n).astype(jnp.int32), 1)
  u = jax.random.uniform(key, (max_examples,))
  order = jnp.argsort(jnp.where(jnp.arange(max_examples) < n, u, 2.0))
  total = -(-max(int(sample_fraction * max_examples), 1) // batch_size)
  slots = jnp.arange(total * batch_size).reshape(total, batch_size)
  idx = order[jnp.minimum(slots, max_examples - 1)]
  real = slots < m

  def loss(w, j, e):   # (a model with dropout draws its masks from (e, j)'s key)
    theta = merge(params, mixed(glob, state.local, w), mask)
    drop = jax.random.fold_in(jax.random.fold_in(key, e + 1), j)
    return masked_mean_loss(model, theta, client.x[idx[j]], client.y[idx[j]], real[j],
                            drop)[0]

  def batch(carry, j, e):
    w, last = carry
    value, g = jax.value_and_grad(loss)(w, j, e)
    new = tuple(jnp.clip(wk - eta * gk, 0.0, 1.0) for wk, gk in zip(w, g))
    keep = jnp.any(real[j])
    return (jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, w),
            jnp.where(keep, value.astype(last.dtype), last)), None

  def epoch(carry):
    e, w, losses = carry
    (w, last), _ = jax.lax.scan(lambda c, j: batch(c, j, e), (w, jnp.zeros((), losses.dtype)),
                                jnp.arange(total))
    return e + 1, w, jnp.roll(losses, -1).at[-1].set(last)

  def more(carry):
    e, _, losses = carry
    settled = (e > num_pre_loss) & (jnp.std(losses) < threshold)
    start = (state.phase == START) & (e < max_start_epochs) & ~settled
    return start | ((state.phase == TRAINED) & (e < 1))

  losses = jnp.zeros((num_pre_loss,), glob[0].dtype)
  e, w, _ = jax.lax.while_loop(more, epoch, (jnp.zeros((), jnp.int32), state.weights, losses))
  return e, w


def fedala(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    eta: float = 1.0,
    sample_fraction: float = 0.8,
    threshold: float = 0.1,
    num_pre_loss: int = 10,
    max_start_epochs: int = 100,
    ala_batch_size: int | None = None,
    head: Predicate | None = None,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedALA: FedAvg whose clients start from an element-wise mix of the global and
  their own local model, the mixing weights learned on their data (Algorithm 1).

  A sampled client i receives Θ_t; its lower layers take Θ_t, its top layers
  (`head`, default the last layer: the paper's p = 1) become
  θ̂_i = θ_i + (Θ_t − θ_i) ⊙ W_i, with θ_i its local model from its last round and
  W_i learned by `ala`; it trains θ̂_i with `work` steps of `client_tx`, keeps the
  result as θ_i and sends it; the server averages (Δ_i = θ_i − Θ_t, weighted as
  FedAvg). A client's first round starts from Θ_t (it has no local model yet,
  as the paper's code skips ALA while local and global models agree); ALA's
  start phase (W_i trained to convergence from ones) runs at its second.
  With η = 0 the weights stay at one, every client starts from Θ_t and the
  global model is FedAvg's, bit for bit.

  The personalized model of client i (`personal`) is θ̂_i with its current
  W_i and Θ_t, the model it would start its next round from (the global one for
  a client that never trained). Newcomers (held-out clients) fine-tune.

  Args:
    model: The model.
    client_tx, server_tx, work, clients_per_round, weighting, execution: As
      `fedavg`.
    eta: η, ALA's learning rate (1.0 in the paper).
    sample_fraction: s, the share of local data ALA reads (0.8 in the paper).
    threshold: The start phase's bound on the loss's standard deviation (the
      paper's code: 0.1; its text, 0.01).
    num_pre_loss: Epoch losses the start phase's criterion looks back over (10).
    max_start_epochs: The start phase's most epochs.
    ala_batch_size: ALA's batch size (default the local work's).
    head: Predicate naming the top layers ALA mixes (default the last layer).

  Returns:
    The `FederatedAlgorithm`; client state: an `ALAState` per client.
  """
  check_local_work(work)
  for name, v, ok in (("eta", eta, eta >= 0), ("threshold", threshold, threshold >= 0),
                      ("sample_fraction", sample_fraction, 0 < sample_fraction <= 1)):
    if not ok:
      raise ValueError(f"fedala: {name} out of range; got {v!r} (eta >= 0, threshold >= 0, "
                       "0 < sample_fraction <= 1).")
  for name, v in (("num_pre_loss", num_pre_loss), ("max_start_epochs", max_start_epochs)):
    if not (isinstance(v, int) and v >= 1):
      raise ValueError(f"fedala: {name} must be an int >= 1; got {v!r}.")
  template = jax.eval_shape(model.init, jax.random.key(0))
  mask = path_mask(template, last_layer(template) if head is None else head)
  b = ala_batch_size or work.batch_size
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)
    sgd = sgd_program(model, client_tx, work, max_examples=data.max_examples,
                      min_examples=data.min_examples)

    def start(params, client, key):
      s = client.state
      _, weights = ala(model, params, s, client, jax.random.fold_in(key, 7), mask, eta=eta,
                       sample_fraction=sample_fraction, batch_size=b, threshold=threshold,
                       num_pre_loss=num_pre_loss, max_start_epochs=max_start_epochs,
                       max_examples=data.max_examples)
      # A client without a local model has W_i = 1 (ALA ran no epoch): θ̂ = Θ_t exactly.
      theta = merge(params, mixed(personal_part(params, mask), s.local, weights), mask)
      _, steps = sgd.start(params, client, key)   # FedAvg's batches and keys
      return (sgd_init(client_tx, theta), weights, s.phase), steps

    def step(params, carry, batch):
      state, weights, phase = carry
      return sgd.step(params, state, batch), weights, phase

    def finish(params, client, carry):
      state, weights, phase = carry
      out = client_output(model, params, client, state.w, state.loss_sum, state.count,
                          data.num_classes, client_losses=aggregator.client_losses)
      return out._replace(client_state=ALAState(personal_part(state.w, mask), weights,
                                                jnp.minimum(phase + 1, TRAINED)))

    return sgd._replace(start=start, step=step, finish=finish)

  def client_states(params, num_clients):
    top = personal_part(params, mask)
    stack = lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape).copy()
    return ALAState(tuple(stack(t) for t in top), tuple(stack(jnp.ones_like(t)) for t in top),
                    jnp.full((num_clients,), NO_LOCAL, jnp.int32))

  def personal(state):
    glob = personal_part(state.params, mask)
    one = lambda s: merge(state.params, mixed(glob, s.local, s.weights), mask)
    return jax.vmap(one)(state.client_states)

  return assemble(model, make_program, aggregator, server_tx,
                  clients_per_round=clients_per_round, execution=execution,
                  client_states=client_states, personal=personal)
