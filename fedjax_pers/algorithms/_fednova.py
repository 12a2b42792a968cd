"""FedNova (Wang et al., NeurIPS 2020): FedAvg's clients, normalised averaging."""

from __future__ import annotations

import optax

from fedjax_pers.aggregation._fednova import fednova as fednova_aggregate
from fedjax_pers.aggregation._weights import WeightFn
from fedjax_pers.algorithms._fedavg import fedavg
from fedjax_pers.core._batching import LocalWork
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm


def fednova(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    momentum: float = 0.0,
    weighting: WeightFn | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedNova: each client runs FedAvg's local steps (`client_tx`, SGD with heavy-ball
  `momentum` ρ or none), and the server takes `τ_eff Σ_i p_i Δ_i / ‖a_i‖₁`
  (`aggregation.fednova`, with the `p_i` of `weighting`, default data size),
  so clients with more local steps (`τ_i` grows with a client's data under
  epochs) no longer drag the model towards their own optimum. With equal
  `τ_i` it is FedAvg. `momentum` must be the ρ of `client_tx`.
  """
  if weighting is not None and not isinstance(weighting, WeightFn):
    raise ValueError(f"fednova normalises a weighted mean: weighting must be a WeightFn (the "
                     f"p_i), not {type(weighting).__name__}.")
  return fedavg(model, client_tx, server_tx, work, clients_per_round=clients_per_round,
                weighting=fednova_aggregate(weighting, momentum), execution=execution)
