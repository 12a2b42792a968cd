"""FedAvg and FedProx, with any optax server optimizer (FedAvgM, FedAdam, ...)."""

from __future__ import annotations

import jax
import numpy as np
import optax

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, assemble
from fedjax_pers.core._sgd import fedavg_program


def fedavg(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    weighting: WeightFn | Aggregator | None = None,
    prox_mu: float | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """Federated Averaging (McMahan et al., AISTATS 2017) and its server-optimizer kin.

  Each sampled client runs `work` with `client_tx` from the global model w_t and
  returns Δ_i = w_i − w_t; the server applies `server_tx` to −Σ_i p_i Δ_i with
  p = `weighting` (default n_i / Σ n_j), or to −Δ of a robust, fair or learned
  `Aggregator`. `server_tx = optax.sgd(1.0)` is FedAvg;
  `optax.sgd(lr, momentum=β)` FedAvgM; `optax.adam/yogi/adagrad` FedAdam / FedYogi
  / FedAdagrad (Reddi et al., ICLR 2021).

  Args:
    model: The model.
    client_tx: Client optimizer.
    server_tx: Server optimizer on the pseudo-gradient.
    work: Local epochs or steps, and the batch size.
    clients_per_round: Cohort size.
    weighting: A `WeightFn` for a weighted mean (default `num_examples()`) or an
      `Aggregator` (see `fedjax_pers.aggregation`).
    prox_mu: FedProx's μ (None: no proximal term).
    execution: How the cohort runs and is sampled (`fedjax_pers.Execution`:
      strategy, lanes, chunks, a `clients` mesh, sampling weights, the
      differentiable path); default `Execution()`.

  Returns:
    The `FederatedAlgorithm`.
  """
  check_local_work(work)
  # A traced μ (a hyperparameter being differentiated) is not checked.
  if (prox_mu is not None and not isinstance(prox_mu, jax.core.Tracer)
      and not (np.isfinite(prox_mu) and prox_mu >= 0)):
    raise ValueError(f"prox_mu (FedProx's mu) must be finite and >= 0; got {prox_mu!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_program(data: FederatedData):
    check_local_work(work, data.num_clients)
    return fedavg_program(
        model, client_tx, work, num_classes=data.num_classes,
        max_examples=data.max_examples, min_examples=data.min_examples, prox_mu=prox_mu,
        client_losses=aggregator.client_losses)

  return assemble(model, make_program, aggregator, server_tx,
                  clients_per_round=clients_per_round, execution=execution)


def fedprox(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    mu: float,
    **kwargs,
) -> FederatedAlgorithm:
  """FedProx (Li et al., MLSys 2020): FedAvg whose clients minimise
  F_i(w) + (μ/2) ||w − w_t||². Keyword arguments as `fedavg`.
  """
  return fedavg(model, client_tx, server_tx, work, prox_mu=mu, **kwargs)
