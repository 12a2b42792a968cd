"""FedAvg and FedProx, with any optax server optimizer (FedAvgM, FedAdam, ...)."""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_pers.aggregation._weights import WeightFn, num_examples
from fedjax_pers.core._aggregate import Aggregator, as_aggregator
from fedjax_pers.core._batching import LocalWork, check_local_work
from fedjax_pers.core._client import make_client_update
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm, assemble


def fedavg(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    weighting: WeightFn | Aggregator | None = None,
    strategy: str = "auto",
    client_chunk: int | None = None,
    sampling_probs: np.ndarray | None = None,
    prox_mu: float | None = None,
    mesh: Mesh | None = None,
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
    strategy: `auto`, `vmap`, `chunked` or `scan` (see `run_cohort`).
    client_chunk: Clients per chunk for `chunked`.
    sampling_probs: Optional `[N]` client sampling weights (default uniform).
    prox_mu: FedProx's μ (None: no proximal term).
    mesh: Optional `jax.sharding.Mesh` with a `clients` axis (see
      `fedjax_pers.distributed.client_mesh`): the cohort is sharded over its
      devices and the aggregate becomes a cross-device sum.

  Returns:
    The `FederatedAlgorithm`.
  """
  check_local_work(work)
  # A traced μ (a hyperparameter being differentiated) is not checked.
  if (prox_mu is not None and not isinstance(prox_mu, jax.core.Tracer)
      and not (np.isfinite(prox_mu) and prox_mu >= 0)):
    raise ValueError(f"prox_mu (FedProx's mu) must be finite and >= 0; got {prox_mu!r}.")
  aggregator = as_aggregator(num_examples() if weighting is None else weighting)

  def make_client(data: FederatedData):
    return make_client_update(
        model, client_tx, work, num_classes=data.num_classes,
        max_examples=data.max_examples, min_examples=data.min_examples, prox_mu=prox_mu,
        client_losses=aggregator.client_losses)

  return assemble(
      model, make_client, aggregator, server_tx, clients_per_round=clients_per_round,
      strategy=strategy, client_chunk=client_chunk, sampling_probs=sampling_probs, mesh=mesh)


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
