"""FedBN (Li, Jiang, Zhang, Kamp & Dou, "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021)."""

from __future__ import annotations

import optax

from fedjax_pers.aggregation._weights import WeightFn
from fedjax_pers.algorithms._fedper import fedper
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import LocalWork
from fedjax_pers.core._execution import Execution
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm


def norm_layers(path: str) -> bool:
  """The leaves of normalisation layers (flax's `BatchNorm_i`, `LayerNorm_i`, `GroupNorm_i`),
  at any depth (a residual block's too): their scale and bias and, for batch norm, their
  running statistics."""
  return any(part.strip("['").startswith(("BatchNorm_", "LayerNorm_", "GroupNorm_"))
             for part in path.split("]"))


def fedbn(
    model: Model,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    clients_per_round: int,
    weighting: WeightFn | Aggregator | None = None,
    execution: Execution | None = None,
) -> FederatedAlgorithm:
  """FedBN: FedAvg whose normalisation layers stay with each client (the paper's Algorithm 1).

  Every client keeps its own batch-norm scale, bias and running statistics
  (`norm_layers`, in `ServerState.client_states`); the rest is averaged as in
  FedAvg. A client's personalized model (`personal`) is the shared layers with
  its own normalisation; a model without normalisation layers makes it FedAvg,
  bit for bit. It is `fedper` with the normalisation layers as the personal set.

  Args:
    model, client_tx, server_tx, work, clients_per_round, weighting, execution: As
      `fedavg`.

  Returns:
    The `FederatedAlgorithm`.
  """
  return fedper(model, client_tx, server_tx, work, clients_per_round=clients_per_round,
                personal=norm_layers, weighting=weighting, execution=execution)
