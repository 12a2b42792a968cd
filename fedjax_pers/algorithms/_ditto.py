"""Ditto (Li, Hu, Beirami & Smith, ICML 2021): a global model and a personal one per client."""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, batch_plan, check_local_work
from fedjax_pers.core._client import local_train, make_client_update, stack_clients
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, assemble


def ditto(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    lam: float,
    clients_per_round: int,
    personal_tx: optax.GradientTransformation | None = None,
    personal_work: LocalWork | None = None,
    weighting: WeightFn | Aggregator | None = None,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> FederatedAlgorithm:
  """Ditto: FedAvg for the global model w, plus a personal model v_k per client.

  A sampled client k trains the global model as FedAvg does (`work`,
  `client_tx`) and, from its own v_k, takes the personal steps

    v_k ← v_k − η (∇F_k(v_k) + λ (v_k − w_t)),

  (`personal_work`, `personal_tx`; by default the same as the global ones) on
  minibatches of its data. The v_k of all clients live stacked in
  `ServerState.client_states`, start at w_0, and change only in the rounds
  their client is sampled. λ = 0 gives local training alone; λ → ∞ pins v_k
  to the global model.

  Args:
    model: The model.
    client_tx: Optimizer of the global model's local training.
    server_tx: Server optimizer (`optax.sgd(1.0)`: FedAvg).
    work: Local work of the global part.
    lam: λ ≥ 0.
    clients_per_round: Cohort size.
    personal_tx: Optimizer of the personal steps (default `client_tx`).
    personal_work: Personal steps (default `work`).
    weighting: Aggregation of the global part (default data size).
    strategy, client_chunk, sampling_probs, mesh: As `fedavg`.

  Returns:
    The `FederatedAlgorithm`; `personal(state)` returns the stacked v_k.
  """
  check_local_work(work)
  personal_work = work if personal_work is None else personal_work
  check_local_work(personal_work)
  if not (isinstance(lam, (int, float)) and lam >= 0):
    raise ValueError(f"lam (Ditto's λ) must be a number >= 0; got {lam!r}.")
  personal_tx = client_tx if personal_tx is None else personal_tx
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_client(data: FederatedData):
    base = make_client_update(
        model, client_tx, work, num_classes=data.num_classes, max_examples=data.max_examples,
        min_examples=data.min_examples, client_losses=aggregator.client_losses)

    def client_update(params, client, key):
      k_global, k_plan, k_train = jax.random.split(key, 3)
      out = base(params, client, k_global)
      plan = batch_plan(k_plan, client.num_examples, personal_work,
                        max_examples=data.max_examples, min_examples=data.min_examples)
      v, *_ = local_train(model, personal_tx, client.state, client, plan, k_train,
                          prox_mu=lam, anchor=params,
                          guard_empty_steps=personal_work.epochs is not None)
      return out._replace(client_state=v)

    return client_update

  return assemble(
      model, make_client, aggregator, server_tx, clients_per_round=clients_per_round,
      strategy=strategy, client_chunk=client_chunk, sampling_probs=sampling_probs, mesh=mesh,
      client_states=stack_clients, personal=lambda s: s.client_states)
