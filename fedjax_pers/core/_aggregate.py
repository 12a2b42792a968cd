"""The aggregation interface of the round, and the weighted mean every weighting uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedjax_pers.core._client import ClientOutput
from fedjax_pers.core._cohort import normalize, weighted_sum, zero_nonfinite

Params = Any


class Aggregator(NamedTuple):
  """How the server turns a cohort's outputs into one update.

  Attributes:
    init: `init(num_clients) -> state`, kept in `ServerState.weight_state`.
    apply: `apply(outputs, state, params) -> (delta, weights, state)`: `outputs`
      are the stacked `ClientOutput`s of the cohort (with `client_id` set),
      `params` the global model `w_t`, `delta` the aggregate update the server
      optimizer receives as `−delta`, and `weights[k]` the weight each client
      had (reported in the round metrics; zero for non-finite clients).
    score: Optional `score(output) -> u` of one client for a weighted mean with
      `w_i = u_i / Σ u_j`: a cohort run by `lax.scan` then streams `Σ u_i Δ_i`
      and never holds all updates at once.
    client_losses: Clients also report `loss_before` / `loss_after`, the mean
      loss over their data at `w_t` and after local training (one forward pass
      over the client's data each).
  """

  init: Callable[[int], Any]
  apply: Callable[[ClientOutput, Any, Params], tuple[Params, jax.Array, Any]]
  score: Callable[[ClientOutput], jax.Array] | None = None
  client_losses: bool = False


def mean_aggregator(weighting) -> Aggregator:
  """The weighted mean `Σ_i w_i Δ_i` with the weights of a `WeightFn`.

  Non-finite updates get weight zero and the remaining weights are
  renormalised, whatever `weighting` returned for them.

  Args:
    weighting: Anything with `init`, `apply(outputs, state) -> (w, state)`,
      `score` and `client_losses` (an `aggregation.WeightFn`).

  Returns:
    The `Aggregator`.
  """

  def apply(outputs, state, params):
    del params
    weights, state = weighting.apply(outputs, state)
    weights = normalize(weights, outputs.finite)
    return weighted_sum(weights, zero_nonfinite(outputs)), weights, state

  return Aggregator(init=weighting.init, apply=apply, score=weighting.score,
                    client_losses=weighting.client_losses)


def as_aggregator(how) -> Aggregator:
  """`how` itself if it is an `Aggregator`, else the weighted mean with weighting `how`."""
  return how if isinstance(how, Aggregator) else mean_aggregator(how)


def check_no_client_losses(aggregator: Aggregator, algorithm: str) -> None:
  """Raises `ValueError` if `aggregator` needs losses that `algorithm`'s clients do not report."""
  if aggregator.client_losses:
    raise ValueError(
        f"{algorithm} does not report the clients' losses before and after local training, "
        "which this weighting needs (loss_improvement, q_ffl); use one that does not, e.g. "
        "uniform, num_examples, loss or cosine.")
