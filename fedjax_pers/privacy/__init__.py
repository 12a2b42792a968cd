"""Privacy and communication: client-level DP-FedAvg (clipping, Gaussian noise, a
fixed denominator, adaptive clipping) and its accounting with Google's
`dp-accounting` (RDP and PLD); compressed updates (quantisation, rotation, top-k);
secure aggregation, simulated."""

from fedjax_pers.privacy._accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    calibrate_noise,
    dp_event,
    epsilon,
    local_epsilon,
    make_accountant,
)
from fedjax_pers.privacy._compression import (
    CompressedState,
    Compressor,
    bits_per_client,
    check_compressor,
    compressed,
    hadamard,
    padded_size,
    quantize,
    rotate,
    top_k,
    unrotate,
)
from fedjax_pers.privacy._gaussian import (
    DpState,
    adapt_clip_norm,
    capped_weights,
    clip_updates,
    dp_fedavg_aggregator,
    expected_weight,
    global_norms,
    update_noise_multiplier,
)
from fedjax_pers.privacy._secagg import SecAggState, secure_aggregator, secure_sum

__all__ = [
    "SecAggState",
    "secure_aggregator",
    "secure_sum",
    "CompressedState",
    "Compressor",
    "bits_per_client",
    "check_compressor",
    "compressed",
    "hadamard",
    "padded_size",
    "quantize",
    "rotate",
    "top_k",
    "unrotate",
    "ACCOUNTANTS",
    "DpState",
    "SAMPLINGS",
    "adapt_clip_norm",
    "calibrate_noise",
    "capped_weights",
    "clip_updates",
    "dp_event",
    "dp_fedavg_aggregator",
    "epsilon",
    "expected_weight",
    "global_norms",
    "local_epsilon",
    "make_accountant",
    "update_noise_multiplier",
]
