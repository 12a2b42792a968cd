"""Secure aggregation, simulated: the server learns only the sum of the cohort's
updates (Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal,
Seth, "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, §3-§4).

Each client clips its update to `C'` and encodes it in `b`-bit fixed point: with
`R = min(⌊(2^{b−1} − 1) / k⌋, 2^23)` and scale `s = R / C`, `q_i = round(s x_i)`
by unbiased stochastic rounding, as an integer modulo `2^b` (two's complement),
so the sum of the `k` clients' integers can never wrap (`2^23`: float32 holds
`s x` to within one unit). `C' = C − 2√d / s`: the rounding moves each
coordinate by less than `2 / s`, so the decoded update's norm stays ≤ `C`, the
bound the DP accounting assumes.

Client `i` then adds masks modulo `2^b` (the protocol's double masking):

    y_i = q_i + PRG(b_i) + Σ_{j > i} PRG(s_{i,j}) − Σ_{j < i} PRG(s_{j,i})   (mod 2^b),

`s_{i,j}` a seed agreed by the pair (here derived from the round's key and the
two client ids, standing in for the Diffie-Hellman agreement) and `b_i` the
client's own seed. The pairwise masks cancel in the sum over all clients. A
client that drops after masking never sends `y_j`: the survivors reveal their
shares of `s_{i,j}` for the dropped `j` (and of `b_i` for themselves), the
server regenerates those masks and removes them, and obtains exactly
`Σ_{i alive} q_i mod 2^b`, decoded as a signed integer over `s`. The Shamir
sharing of the seeds (threshold `t`) is not simulated: it changes who could
collude, not the numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.privacy._gaussian import capped_weights, clip_updates


class SecAggState(NamedTuple):
  """The round's randomness: masks, rounding, dropouts and DP noise each split from it."""

  key: jax.Array


def modulus_mask(bits: int) -> jax.Array:
  """`2^b − 1` as uint32: `x & mask` is `x mod 2^b`."""
  return jnp.uint32((1 << bits) - 1 if bits < 32 else 0xFFFFFFFF)


def _prg(key, d, bits):
  return jax.random.bits(key, (d,), jnp.uint32) & modulus_mask(bits)


def _masks(ids: jax.Array, key: jax.Array, d: int, bits: int, pair_on, self_on) -> jax.Array:
  """`[k, d]` uint32: row i is `[self_on(i)] PRG(b_i) + Σ_j [pair_on(i, j)] ±PRG(s_ij)`,
  `+` where `ids[i] < ids[j]`, modulo 2^32 (callers reduce mod 2^b)."""
  k_pair, k_self = jax.random.split(key)

  def one(i):
    def pair(j):
      lo, hi = jnp.minimum(ids[i], ids[j]), jnp.maximum(ids[i], ids[j])
      m = _prg(jax.random.fold_in(jax.random.fold_in(k_pair, lo), hi), d, bits)
      return jnp.where(pair_on(i, j), jnp.where(ids[i] < ids[j], m, -m), jnp.uint32(0))
    pairs = jnp.sum(jax.lax.map(pair, jnp.arange(ids.shape[0])), axis=0, dtype=jnp.uint32)
    own = _prg(jax.random.fold_in(k_self, ids[i]), d, bits)
    return pairs + jnp.where(self_on(i), own, jnp.uint32(0))

  return jax.lax.map(one, jnp.arange(ids.shape[0]))


def masks(ids: jax.Array, key: jax.Array, d: int, bits: int) -> jax.Array:
  """`[k, d]` uint32: each client's `PRG(b_i) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ji)`."""
  return _masks(ids, key, d, bits, lambda i, j: i != j, lambda i: True) & modulus_mask(bits)


def unmask(masked_sum: jax.Array, ids: jax.Array, alive: jax.Array, key: jax.Array,
           bits: int) -> jax.Array:
  """The server's recovery: `masked_sum` (of the alive clients' `y_i`) less the alive
  clients' own masks and their pairwise masks with the dropped ones (which do not cancel)."""
  revealed = _masks(ids, key, masked_sum.shape[0], bits,
                    lambda i, j: alive[i] & ~alive[j], lambda i: alive[i])
  return (masked_sum - jnp.sum(revealed, axis=0, dtype=jnp.uint32)) & modulus_mask(bits)


def secure_sum(q: jax.Array, ids: jax.Array, alive: jax.Array, key: jax.Array,
               bits: int) -> jax.Array:
  """The protocol end to end on `[k, d]` uint32 inputs: `Σ_{i alive} q_i mod 2^b`,
  computed only from the masked `y_i` of the alive clients and the revealed seeds."""
  y = (q + masks(ids, key, q.shape[1], bits)) & modulus_mask(bits)
  masked_sum = jnp.sum(jnp.where(alive[:, None], y, 0), axis=0, dtype=jnp.uint32)
  return unmask(masked_sum & modulus_mask(bits), ids, alive, key, bits)


def scale(clip_norm: float, bits: int, clients: int) -> float:
  """`s = min(⌊(2^{b−1} − 1) / k⌋, 2^23) / C`: integers per unit of update."""
  return min((2 ** (bits - 1) - 1) // clients, 1 << 23) / clip_norm


def encode(x: jax.Array, s: float, bits: int, key: jax.Array) -> jax.Array:
  """`x` (float) to `b`-bit fixed point: unbiased stochastic rounding of `s x`, mod `2^b`."""
  t = x.astype(jnp.float32) * s
  r = jnp.floor(t)
  up = jax.random.uniform(key, x.shape) < (t - r)
  return (r + up).astype(jnp.int32).astype(jnp.uint32) & modulus_mask(bits)


def decode(total: jax.Array, s: float, bits: int) -> jax.Array:
  """A sum mod `2^b` read as a signed `b`-bit integer, over `s`."""
  if bits < 32:
    total = jnp.where(total >= (1 << (bits - 1)), total - jnp.uint32(1 << bits), total)
  v = jax.lax.bitcast_convert_type(total, jnp.int32)
  return v.astype(jnp.float32) / s


def secure_aggregator(clip_norm: float, bits: int, clients_per_round: int,
                      key: jax.Array, *, dropout_rate: float = 0.0,
                      noise_multiplier: float = 0.0, denominator: float | None = None,
                      example_cap: int | None = None) -> Aggregator:
  """The cohort's mean (or DP sum) through simulated secure aggregation.

  Args:
    clip_norm: `C` > 0: every update is clipped (to `C'`, module docstring).
    bits: `b` in [8, 32], the field of the masked sum.
    clients_per_round: `k`, which sets the fixed-point scale.
    key: The state's key (masks, rounding, dropouts, noise each split from it).
    dropout_rate: Probability that a sampled client drops after masking.
    noise_multiplier: `z` ≥ 0; > 0 needs `denominator`: DP-FedAvg's release,
      `(Σ_alive w_i x_i + N(0, (zC)²)) / W`, the noise added by the server to
      the unmasked sum (central DP: the server sees the sum, never an update).
    denominator: `W` of DP-FedAvg; None: the mean over the alive clients.
    example_cap: DP's capped data-size weights `min(n_i / n_cap, 1)`, applied by
      each client to its clipped update before encoding; None: weight 1.

  Returns:
    The `Aggregator`; a dropped or non-finite client gets weight 0.
  """
  if not (isinstance(bits, int) and 8 <= bits <= 32):
    raise ValueError(f"secure_aggregation.bits must be an int in [8, 32]; got {bits!r}.")
  if not (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate < 1):
    raise ValueError(f"secure_aggregation.dropout_rate must be a number in [0, 1); got "
                     f"{dropout_rate!r}.")
  if denominator is None and (noise_multiplier or example_cap is not None):
    raise ValueError("secure_aggregator: noise_multiplier and example_cap are DP-FedAvg's "
                     "and need its fixed denominator.")
  s = scale(clip_norm, bits, clients_per_round)

  def apply(outputs, state: SecAggState, params):
    del params
    leaves, tree = jax.tree.flatten(outputs.delta)
    k = leaves[0].shape[0]
    flat = jnp.concatenate([jnp.reshape(d, (k, -1)).astype(jnp.float32) for d in leaves], 1)
    d = flat.shape[1]
    inner_clip = clip_norm - 2 * math.sqrt(d) / s
    if inner_clip <= 0:
      raise ValueError(f"secure_aggregation.bits={bits} leaves no room: the rounding of "
                       f"{d} coordinates at scale {s:.4g} exceeds clip_norm={clip_norm}; "
                       f"use more bits.")
    key, k_round, k_mask, k_drop, k_noise = jax.random.split(state.key, 5)
    alive = outputs.finite & (jax.random.uniform(k_drop, (k,)) >= dropout_rate)
    x, _ = clip_updates(jnp.where(alive[:, None], flat, 0.0), inner_clip)
    w = jnp.where(alive, capped_weights(outputs.num_examples, example_cap), 0.0)
    q = jax.vmap(lambda v, i: encode(v, s, bits, jax.random.fold_in(k_round, i)))(
        w[:, None] * x, outputs.client_id)
    total = decode(secure_sum(q, outputs.client_id, alive, k_mask, bits), s, bits)
    if denominator is None:
      total, weights = total / jnp.maximum(jnp.sum(w), 1), w / jnp.maximum(jnp.sum(w), 1)
    else:
      sigma = noise_multiplier * clip_norm
      total = (total + sigma * jax.random.normal(k_noise, total.shape)) / denominator
      weights = w / denominator
    parts, start = [], 0
    for leaf in leaves:
      size = math.prod(leaf.shape[1:])
      parts.append(total[start:start + size].reshape(leaf.shape[1:]).astype(leaf.dtype))
      start += size
    return jax.tree.unflatten(tree, parts), weights, SecAggState(key)

  return Aggregator(init=lambda num_clients: SecAggState(key), apply=apply)
