"""Aggregation: weight functions (the dynamic weighting), robust, fair and learned aggregators.

A `WeightFn` gives the weights of the mean `Σ_i w_i Δ_i`; an `Aggregator`
returns the aggregate itself (median, Krum, q-FFL, FedLAW, the automated mixture). Both plug into
`algorithms.fedavg(..., weighting=...)`.
"""

from fedjax_pers.aggregation._attacks import scaled_updates
from fedjax_pers.aggregation._auto import (
    FAMILIES,
    TEMPERED,
    AutoState,
    auto,
    auto_objective,
    auto_weights,
    family_weights,
)
from fedjax_pers.aggregation._distribution import label_divergence, label_entropy, label_kl
from fedjax_pers.aggregation._fedlaw import (
    FedLAWState,
    fedlaw,
    fedlaw_aggregate,
    fedlaw_fit,
    fedlaw_objective,
)
from fedjax_pers.aggregation._fednova import fednova, norm_a
from fedjax_pers.aggregation._qffl import q_ffl
from fedjax_pers.aggregation._quality import (
    FedAdpState,
    cosine,
    cosine_to_mean,
    fedadp,
    gompertz,
    loss,
    loss_improvement,
)
from fedjax_pers.aggregation._robust import (
    clip_norm,
    krum,
    krum_scores,
    median,
    multi_krum,
    sort_clients,
    trimmed_mean,
)
from fedjax_pers.aggregation._weights import (
    WeightFn,
    floor,
    from_score,
    logits,
    masked_softmax,
    num_examples,
    power,
    product,
    uniform,
)
from fedjax_pers.core._aggregate import Aggregator, as_aggregator, mean_aggregator
from fedjax_pers.core._cohort import normalize

__all__ = [
    "FAMILIES",
    "TEMPERED",
    "Aggregator",
    "AutoState",
    "auto",
    "auto_objective",
    "auto_weights",
    "family_weights",
    "fedlaw_fit",
    "FedAdpState",
    "FedLAWState",
    "WeightFn",
    "as_aggregator",
    "clip_norm",
    "cosine",
    "cosine_to_mean",
    "fedadp",
    "fedlaw",
    "fednova",
    "norm_a",
    "fedlaw_aggregate",
    "fedlaw_objective",
    "floor",
    "from_score",
    "gompertz",
    "krum",
    "krum_scores",
    "label_divergence",
    "label_entropy",
    "label_kl",
    "loss",
    "logits",
    "loss_improvement",
    "masked_softmax",
    "mean_aggregator",
    "median",
    "multi_krum",
    "normalize",
    "num_examples",
    "power",
    "product",
    "q_ffl",
    "scaled_updates",
    "sort_clients",
    "trimmed_mean",
    "uniform",
]
