"""MOON (Li, He & Song, "Model-Contrastive Federated Learning", CVPR 2021)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work, work_steps
from fedjax_pers.core._client import masked_mean_loss, stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._program import LocalProgram, tree_where
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import apply_grads, client_output, sgd_init, sgd_steps
from fedjax_pers.core._traced import traced

Params = Any


def model_contrastive_loss(z: jax.Array, z_glob: jax.Array, z_prev: jax.Array,
                           temperature: float) -> jax.Array:
  """`[batch]` MOON's ℓ_con (their Eq. 3) with cosine similarity `sim`:

    ℓ_con = −log( e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}) ).
  """
  def cos(a, b):
    num = jnp.sum(a * b, axis=-1)
    return num / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)

  logits = jnp.stack([cos(z, z_glob), cos(z, z_prev)], axis=-1) / temperature
  return -jax.nn.log_softmax(logits, axis=-1)[..., 0]


def moon(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    mu: float,
    clients_per_round: int,
    temperature: float = 0.5,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """MOON: FedAvg whose clients add μ ℓ_con to their loss (the paper's Algorithm 1).

  On each batch the local model w is trained on

    ℓ = ℓ_sup(w) + μ · mean_j ℓ_con(R_w(x_j), R_{w_t}(x_j), R_{w_prev}(x_j)),

  with R the model's representation (`Model.represent`, the penultimate layer;
  the paper's projection head is part of the model there), w_t the round's
  global model and w_prev the client's own local model from its last round
  (kept in `client_states`, starting at w_0). The representation pulls towards
  the global model's and away from the client's previous one. μ = 0 is FedAvg.

  Args:
    model: A model with `represent`.
    client_tx: Client optimizer.
    server_tx: Server optimizer.
    work: Local epochs or steps, and the batch size.
    mu: μ ≥ 0 (the paper uses 1 or 5).
    clients_per_round: Cohort size.
    temperature: τ > 0 (0.5 in the paper).
    weighting: Aggregation (default data size, as FedAvg).
    execution: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; client state: each client's previous local model.
  """
  check_local_work(work)
  if model.represent is None:
    raise ValueError("moon needs a model with a representation (Model.represent): the "
                     "models of fedjax_pers.models have one; a flax module gets one by "
                     "sowing it (self.sow('intermediates', REPRESENTATION, h)).")
  if not (traced(mu) or isinstance(mu, (int, float)) and mu >= 0):
    raise ValueError(f"mu (MOON's μ) must be a number >= 0; got {mu!r}.")
  if not (traced(temperature) or isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(f"temperature (MOON's τ) must be a number > 0; got {temperature!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData) -> LocalProgram:
    check_local_work(work, data.num_clients)

    def start(params, client, key):
      return (sgd_init(client_tx, params), client.state), sgd_steps(
          key, client, work, max_examples=data.max_examples, min_examples=data.min_examples)

    def step(params, carry, batch):
      s, prev = carry
      x, y, mask, key = batch

      def objective(w):
        mean, total = masked_mean_loss(model, w, x, y, mask, key)
        if traced(mu) or mu:   # μ = 0 given as a number: FedAvg, bit for bit
          z = model.represent(w, x, key=key, train=True)
          fixed = jax.lax.stop_gradient
          con = model_contrastive_loss(z, fixed(model.represent(params, x)),
                                       fixed(model.represent(prev, x)), temperature)
          m = mask.astype(con.dtype)
          mean = mean + mu * jnp.sum(con * m) / jnp.maximum(jnp.sum(m), 1.0)
        return mean, total

      (_, total), g = jax.value_and_grad(objective, has_aux=True)(s.w)
      new = apply_grads(client_tx, s, g, total, mask)
      return tree_where(jnp.any(mask), new, s), prev

    def finish(params, client, carry):
      s, _ = carry
      out = client_output(model, params, client, s.w, s.loss_sum, s.count, data.num_classes,
                          client_losses=aggregator.client_losses)
      return out._replace(client_state=s.w)

    return LocalProgram(start, step, finish,
                        lambda client: work_steps(work, client.num_examples, client.id))

  return assemble(model, make_program, aggregator, server_tx,
                  clients_per_round=clients_per_round, execution=execution,
                  client_states=stack_clients)
