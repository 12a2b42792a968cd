"""Weights by update quality: local loss, loss improvement, cosine, FedAdp."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.aggregation._weights import WeightFn, masked_softmax, stateless
from fedjax_pers.core._cohort import normalize, weighted_sum, zero_nonfinite
from fedjax_pers.core._traced import traced


def _check_temperature(temperature) -> None:
  if not (traced(temperature) or isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(f"temperature must be a number > 0; got {temperature!r}.")


def loss(temperature: float = 1.0) -> WeightFn:
  """Lower local training loss, more weight: `w = softmax(−L / τ)` over finite clients.

  `L_i` is the client's mean training loss during local training
  (`ClientOutput.train_loss`, reported for free). A client whose data the
  model cannot fit (noisy labels, a shifted distribution) gets less weight;
  τ → ∞ gives uniform weights.

  Args:
    temperature: τ > 0.
  """
  _check_temperature(temperature)

  def apply(outputs, state):
    return masked_softmax(-outputs.train_loss / temperature, outputs.finite), state

  return WeightFn(init=stateless, apply=apply)


def loss_improvement(temperature: float = 1.0) -> WeightFn:
  """More weight to clients whose local training lowered their loss more.

  `w = softmax((L_before − L_after) / τ)`, with `L_before` the loss of w_t and
  `L_after` of the local model, each over the client's whole data set (one
  extra forward pass per client each).

  Args:
    temperature: τ > 0.
  """
  _check_temperature(temperature)

  def apply(outputs, state):
    gain = outputs.loss_before - outputs.loss_after
    return masked_softmax(gain / temperature, outputs.finite), state

  return WeightFn(init=stateless, apply=apply, client_losses=True)


def _dots(deltas, ref) -> jax.Array:
  """`[k]` inner products `⟨Δ_i, ref⟩` summed over the leaves."""
  return sum(jnp.tensordot(d, r, axes=r.ndim)
             for d, r in zip(jax.tree.leaves(deltas), jax.tree.leaves(ref)))


def sq_norms(deltas) -> jax.Array:
  """`[k]` squared norms `||Δ_i||²` summed over the leaves."""
  return sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1)
             for d in jax.tree.leaves(deltas))


def cosine_to_mean(outputs) -> jax.Array:
  """`[k]` cosine of each finite update to the data-size-weighted mean update Δ̄.

  Δ̄ = Σ_i n_i Δ_i / Σ_i n_i over finite clients; non-finite clients get 0.
  """
  deltas = zero_nonfinite(outputs)
  n = normalize(outputs.num_examples.astype(jnp.float32), outputs.finite)
  mean = weighted_sum(n, deltas)
  mean_sq = sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean))
  denom = jnp.sqrt(sq_norms(deltas) * mean_sq)
  cos = jnp.where(denom > 0, _dots(deltas, mean) / jnp.where(denom > 0, denom, 1.0), 0.0)
  return jnp.where(outputs.finite, jnp.clip(cos, -1.0, 1.0), 0.0)


def cosine() -> WeightFn:
  """`w_i ∝ n_i · max(cos(Δ_i, Δ̄), 0)`: updates that point away from the mean get none.

  Δ̄ is the data-size-weighted mean update of the cohort. If no update has a
  positive cosine the weights fall back to `n_i / Σ n`.
  """

  def apply(outputs, state):
    n = outputs.num_examples.astype(jnp.float32)
    w = normalize(n * jnp.maximum(cosine_to_mean(outputs), 0.0), outputs.finite)
    return jnp.where(jnp.sum(w) > 0, w, normalize(n, outputs.finite)), state

  return WeightFn(init=stateless, apply=apply)


class FedAdpState(NamedTuple):
  """FedAdp's per-client smoothed angle and participation count.

  Attributes:
    angle: `[N]` smoothed angle θ̃_i (radians).
    count: `[N]` int32 rounds client i took part in.
  """

  angle: jax.Array
  count: jax.Array


def gompertz(theta: jax.Array, alpha: float = 5.0) -> jax.Array:
  """FedAdp's map `f(θ) = α (1 − exp(−exp(−α (θ − 1))))`.

  Example:
    >>> [f"{float(gompertz(t)):.5f}" for t in (0.0, 1.0, 3.14159265 / 2)]
    ['5.00000', '3.16060', '0.27993']
  """
  return alpha * (1.0 - jnp.exp(-jnp.exp(-alpha * (theta - 1.0))))


def fedadp(alpha: float = 5.0) -> WeightFn:
  """FedAdp (Wu & Wang, IEEE TCCN 2021): weights by the angle to the mean update.

  For client i in round t: θ_i = arccos(cos(Δ_i, Δ̄)) with Δ̄ the data-size-
  weighted mean update; smoothed over the rounds i took part in,
  θ̃_i ← ((t_i − 1)/t_i) θ̃_i + θ_i / t_i (t_i counting i's participations);
  then `w_i ∝ n_i · exp(f(θ̃_i))` with the Gompertz map `f` (see `gompertz`).
  The state keeps θ̃ and t_i for every client, updated only for finite
  clients of the cohort.

  Args:
    alpha: The Gompertz constant α (5 in the paper).
  """
  if not (traced(alpha) or isinstance(alpha, (int, float)) and alpha > 0):
    raise ValueError(f"alpha must be a number > 0; got {alpha!r}.")

  def init(num_clients):
    return FedAdpState(angle=jnp.zeros((num_clients,), jnp.float32),
                       count=jnp.zeros((num_clients,), jnp.int32))

  def apply(outputs, state):
    ids, ok = outputs.client_id, outputs.finite
    theta = jnp.arccos(cosine_to_mean(outputs))
    t = (state.count[ids] + 1).astype(jnp.float32)
    smooth = (t - 1.0) / t * state.angle[ids] + theta / t
    logits = jnp.log(outputs.num_examples.astype(jnp.float32)) + gompertz(smooth, alpha)
    w = masked_softmax(logits, ok & (outputs.num_examples > 0))
    # `add` of zero for non-finite clients, so a repeated id cannot undo an update.
    state = FedAdpState(
        angle=state.angle.at[ids].add(jnp.where(ok, smooth - state.angle[ids], 0.0)),
        count=state.count.at[ids].add(ok.astype(jnp.int32)))
    return w, state

  return WeightFn(init=init, apply=apply)
