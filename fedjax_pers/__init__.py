"""fedjax_pers: vectorised federated learning with dynamic aggregation weights and
personalization, in JAX."""

from fedjax_pers import (
    aggregation,
    algorithms,
    core,
    data,
    distributed,
    hypergrad,
    models,
    personalization,
    privacy,
    sweep,
)
from fedjax_pers.core import (
    ClientOutput,
    Execution,
    FederatedAlgorithm,
    FederatedData,
    LocalWork,
    Model,
    RoundMetrics,
    ServerState,
    System,
)

__version__ = "0.1.0"

__all__ = [
    "ClientOutput",
    "Execution",
    "System",
    "FederatedAlgorithm",
    "FederatedData",
    "LocalWork",
    "Model",
    "RoundMetrics",
    "ServerState",
    "aggregation",
    "algorithms",
    "core",
    "data",
    "distributed",
    "hypergrad",
    "models",
    "personalization",
    "privacy",
    "sweep",
]
