"""Aggregation weight functions."""

from fedjax_pers.aggregation._weights import (
    WeightFn,
    from_score,
    normalize,
    num_examples,
    uniform,
)

__all__ = ["WeightFn", "from_score", "normalize", "num_examples", "uniform"]
