"""The engine: data, models, local programs, how cohorts execute, and the federated round."""

from fedjax_pers.core._batching import (
    BatchPlan,
    LocalWork,
    batch_plan,
    num_steps,
    shuffle_valid,
    work_steps,
)
from fedjax_pers.core._client import ClientData, ClientOutput, masked_mean_loss
from fedjax_pers.core._cohort import CohortResult, execute_cohort, run_cohort
from fedjax_pers.core._data import FederatedData
from fedjax_pers.core._evaluate import ClientEval, evaluate, summarize, worst_fraction_mean
from fedjax_pers.core._execution import (
    CLIENTS_AXIS,
    STRATEGIES,
    Execution,
    Plan,
    System,
    plan,
)
from fedjax_pers.core._model import (
    REPRESENTATION,
    Model,
    accuracy,
    from_flax,
    softmax_cross_entropy,
)
from fedjax_pers.core._program import Batch, LocalProgram, Steps, run_client
from fedjax_pers.core._round import (
    ClientWindow,
    FederatedAlgorithm,
    RoundMetrics,
    ServerState,
    assemble,
    make_init,
    make_round,
    served,
)
from fedjax_pers.core._sampling import sample_clients
from fedjax_pers.core._sgd import SGDState, fedavg_program, local_train, sgd_program

__all__ = [
    "REPRESENTATION",
    "CLIENTS_AXIS",
    "STRATEGIES",
    "Batch",
    "BatchPlan",
    "ClientData",
    "ClientEval",
    "ClientOutput",
    "CohortResult",
    "Execution",
    "System",
    "FederatedAlgorithm",
    "FederatedData",
    "LocalProgram",
    "LocalWork",
    "Model",
    "Plan",
    "RoundMetrics",
    "SGDState",
    "ServerState",
    "ClientWindow",
    "Steps",
    "accuracy",
    "assemble",
    "batch_plan",
    "evaluate",
    "execute_cohort",
    "fedavg_program",
    "from_flax",
    "local_train",
    "make_init",
    "make_round",
    "masked_mean_loss",
    "num_steps",
    "plan",
    "run_client",
    "run_cohort",
    "sample_clients",
    "served",
    "sgd_program",
    "shuffle_valid",
    "softmax_cross_entropy",
    "summarize",
    "work_steps",
    "worst_fraction_mean",
]
