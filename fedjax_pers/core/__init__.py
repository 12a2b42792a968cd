"""The engine: data, models, local training, cohorts and the federated round."""

from fedjax_pers.core._batching import BatchPlan, LocalWork, batch_plan, num_steps, shuffle_valid
from fedjax_pers.core._client import (
    ClientData,
    ClientOutput,
    local_train,
    make_client_update,
    masked_mean_loss,
)
from fedjax_pers.core._cohort import (
    CLIENTS_AXIS,
    STRATEGIES,
    execute_cohort,
    resolve_strategy,
    run_cohort,
)
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._evaluate import ClientEval, evaluate, summarize, worst_fraction_mean
from fedjax_pers.core._model import Model, accuracy, from_flax, softmax_cross_entropy
from fedjax_pers.core._round import (
    FederatedAlgorithm,
    RoundMetrics,
    ServerState,
    assemble,
    make_init,
    make_round,
)
from fedjax_pers.core._sampling import sample_clients

__all__ = [
    "CLIENTS_AXIS",
    "STRATEGIES",
    "BatchPlan",
    "ClientData",
    "ClientEval",
    "ClientOutput",
    "FederatedAlgorithm",
    "FederatedData",
    "LocalWork",
    "Model",
    "RoundMetrics",
    "ServerState",
    "accuracy",
    "assemble",
    "batch_plan",
    "evaluate",
    "execute_cohort",
    "from_flax",
    "local_train",
    "make_client_update",
    "make_init",
    "make_round",
    "masked_mean_loss",
    "num_steps",
    "resolve_strategy",
    "run_cohort",
    "sample_clients",
    "shuffle_valid",
    "softmax_cross_entropy",
    "summarize",
    "worst_fraction_mean",
]
