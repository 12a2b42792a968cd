"""Reptile (Nichol, Achiam, Schulman, 2018) over a federated population."""

from __future__ import annotations

import optax

from fedjax_pers.aggregation._weights import uniform
from fedjax_pers.algorithms._fedavg import fedavg
from fedjax_pers.core._batching import LocalWork
from fedjax_pers.core._model import Model
from fedjax_pers.core._round import FederatedAlgorithm


def reptile(
    model: Model,
    client_tx: optax.GradientTransformation,
    work: LocalWork,
    *,
    outer_lr: float,
    clients_per_round: int,
    **kwargs,
) -> FederatedAlgorithm:
  """Batched Reptile: each sampled client (a task) adapts, the initialization moves toward them.

    φ ← φ + ε (1/m) Σ_i (W_i(φ) − φ),

  where W_i(φ) is `work` of `client_tx` (SGD in the paper) on client i's data
  from φ and ε = `outer_lr`. This is FedAvg with uniform weights and server
  SGD of rate ε (Jiang et al., 2019, read FedAvg as Reptile); what makes it
  meta-learning is the evaluation, which adapts φ on each client before testing
  (`personalization.personalize`). Keyword arguments as `fedavg` (a
  `weighting` replaces the uniform mean).
  """
  if not (isinstance(outer_lr, int | float) and outer_lr > 0):
    raise ValueError(f"outer_lr (Reptile's epsilon) must be > 0; got {outer_lr!r}.")
  kwargs.setdefault("weighting", uniform())
  return fedavg(model, client_tx, optax.sgd(outer_lr), work,
                clients_per_round=clients_per_round, **kwargs)
