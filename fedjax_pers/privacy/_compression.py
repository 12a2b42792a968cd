"""Compressed client updates: unbiased stochastic quantisation with an optional
random Hadamard rotation, and top-k sparsification with error feedback.

Stochastic `2^b`-level quantisation (Suresh, Yu, Kumar, McMahan, "Distributed
Mean Estimation with Limited Communication", ICML 2017, §2.1-§3): a client's
update `x ∈ R^d` is sent as `x_min`, `x_max` (two float32) and, per coordinate,
a level index of `b` bits,

    s = (x_max − x_min) / (2^b − 1),   r_j = ⌊(x_j − x_min) / s⌋,
    Y_j = x_min + (r_j + 1) s  with probability (x_j − x_min − r_j s) / s,  else x_min + r_j s,

so `E[Y] = x` (unbiased) and the mean over clients has error `O(d / 2^{2b})`
times the spread. With the rotation (their §4), the client first sends
`z = H D x / √d'` (`D` random signs from a key the server shares, `H` the
Walsh-Hadamard matrix, `x` zero-padded to `d' = 2^⌈log₂ d⌉`), which spreads the
coordinates so `x_max − x_min` shrinks to `O(‖x‖ √(log d' / d'))`; the server
rotates back with `D H / √d'` (orthonormal: norms are kept).

Top-k with error feedback (Stich, Cordonnier, Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018): client `i` sends the `k` largest-magnitude coordinates
of `x_i + e_i` (values in float32 and their indices) and keeps the rest,
`e_i ← x_i + e_i − top_k(x_i + e_i)`, for its next participation. The memory
`e_i` is client state: the simulation keeps it in the aggregator's state as a
`[N, d]` array indexed by client id (4 N d bytes).

`compressed(aggregator, compressor, key)` puts either in front of any
aggregator: the aggregator sees the decoded updates, whatever it does with them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_pers.core._aggregate import Aggregator, as_aggregator

METHODS = ("quantize", "top_k")


class Compressor(NamedTuple):
  """How each client encodes its update.

  Attributes:
    method: `'quantize'` (stochastic `2^bits` levels) or `'top_k'`.
    bits: Bits per coordinate for `'quantize'` (1 to 16).
    rotate: `'quantize'`: random Hadamard rotation first.
    fraction: `'top_k'`: the fraction of coordinates sent, in (0, 1].
    error_feedback: `'top_k'`: clients keep what they did not send.
  """

  method: str
  bits: int = 8
  rotate: bool = False
  fraction: float = 0.01
  error_feedback: bool = True


class CompressedState(NamedTuple):
  """The wrapped aggregator's state, the shared randomness, the clients' memories."""

  inner: Any
  key: jax.Array
  memory: jax.Array | None


def check_compressor(c: Compressor) -> None:
  """Raises `ValueError` naming the first bad field of `c`."""
  if c.method not in METHODS:
    raise ValueError(f"compression.method must be one of {METHODS}; got {c.method!r}.")
  if c.method == "quantize" and not (
      isinstance(c.bits, int) and not isinstance(c.bits, bool) and 1 <= c.bits <= 16):
    raise ValueError(f"compression.bits must be an int in [1, 16]; got {c.bits!r}.")
  if c.method == "top_k" and not (
      isinstance(c.fraction, (int, float)) and 0 < c.fraction <= 1):
    raise ValueError(f"compression.fraction must be a number in (0, 1]; got {c.fraction!r}.")


def padded_size(d: int) -> int:
  """`d' = 2^⌈log₂ d⌉`, the length the rotation works on."""
  return 1 << max(0, math.ceil(math.log2(d)))


def hadamard(x: jax.Array) -> jax.Array:
  """`H x / √d` for `x` of length `d = 2^m` (fast Walsh-Hadamard, O(d log d)); its own
  inverse."""
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f"hadamard needs a length that is a power of 2; got {d}.")
  y, h = x, 1
  while h < d:
    y = y.reshape(-1, 2, h)
    y = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
    h *= 2
  return y.reshape(x.shape) / jnp.sqrt(jnp.asarray(d, x.dtype))


def rotate(x: jax.Array, key: jax.Array) -> jax.Array:
  """`H D x̄ / √d'`: `x` zero-padded to `d'`, random signs `D` from `key`."""
  d2 = padded_size(x.shape[0])
  signs = jax.random.rademacher(key, (d2,), x.dtype)
  return hadamard(signs * jnp.pad(x, (0, d2 - x.shape[0])))


def unrotate(z: jax.Array, key: jax.Array, d: int) -> jax.Array:
  """The inverse of `rotate` for an original length `d`."""
  signs = jax.random.rademacher(key, z.shape, z.dtype)
  return (signs * hadamard(z))[:d]


def quantize(x: jax.Array, bits: int, key: jax.Array) -> jax.Array:
  """The decoded stochastic `2^bits`-level quantisation of `x` (module docstring)."""
  lo, hi = jnp.min(x), jnp.max(x)
  s = (hi - lo) / (2 ** bits - 1)
  safe = jnp.where(s > 0, s, 1.0)
  t = (x - lo) / safe
  r = jnp.floor(t)
  up = jax.random.uniform(key, x.shape, x.dtype) < (t - r)
  level = jnp.clip(r + up, 0, 2 ** bits - 1)
  return jnp.where(s > 0, lo + level * s, x)


def top_k(x: jax.Array, k: int) -> jax.Array:
  """`x` with all but its `k` largest-magnitude coordinates set to 0."""
  _, idx = jax.lax.top_k(jnp.abs(x), k)
  return jnp.zeros_like(x).at[idx].set(x[idx])


def kept(c: Compressor, d: int) -> int:
  """Top-k's `k` for `d` coordinates: `⌈fraction · d⌉`."""
  return max(1, math.ceil(c.fraction * d))


def bits_per_client(c: Compressor | None, d: int) -> int:
  """Bits one client sends for an update of `d` float32 coordinates.

  None: `32 d`. Quantised: `b d` (`b d'` rotated) plus `x_min`, `x_max` (64).
  Top-k: `k (32 + ⌈log₂ d⌉)`: a float32 value and an index per kept coordinate.
  """
  if c is None:
    return 32 * d
  if c.method == "quantize":
    return c.bits * (padded_size(d) if c.rotate else d) + 64
  return kept(c, d) * (32 + max(1, math.ceil(math.log2(d))))


def compressed(aggregator, compressor: Compressor, key: jax.Array,
               num_params: int | None = None) -> Aggregator:
  """`aggregator` fed with the clients' compressed-then-decoded updates.

  Args:
    aggregator: An `Aggregator` or `WeightFn`.
    compressor: The `Compressor`.
    key: Key of the quantisation's and the rotation's randomness (the state
      carries its successors; client `c`'s is `fold_in(round key, c)`).
    num_params: The model's parameter count `d`; needed by top-k with error
      feedback (the `[N, d]` memory).

  Returns:
    The `Aggregator` (not streamable: it must see each update). Clients with a
    non-finite update keep their memory unchanged.
  """
  check_compressor(compressor)
  inner = as_aggregator(aggregator)
  c = compressor
  remember = c.method == "top_k" and c.error_feedback
  if remember and not (isinstance(num_params, int) and num_params >= 1):
    raise ValueError(f"top-k with error feedback keeps a [N, num_params] memory: num_params "
                     f"must be the model's parameter count, an int >= 1; got {num_params!r}.")

  def encode_one(x, memory, key):
    """Returns `(decoded, new memory)` for one client's flat update."""
    if c.method == "quantize":
      k_rot, k_q = jax.random.split(key)
      if c.rotate:
        return unrotate(quantize(rotate(x, k_rot), c.bits, k_q), k_rot, x.shape[0]), memory
      return quantize(x, c.bits, k_q), memory
    full = x if memory is None else x + memory
    sent = top_k(full, kept(c, x.shape[0]))
    return sent, (None if memory is None else full - sent)

  def apply(outputs, state: CompressedState, params):
    flat = jax.vmap(lambda d: ravel_pytree(d)[0])(outputs.delta)
    unravel = ravel_pytree(jax.tree.map(lambda d: d[0], outputs.delta))[1]
    key, k_round = jax.random.split(state.key)
    keys = jax.vmap(lambda i: jax.random.fold_in(k_round, i))(outputs.client_id)
    ids = outputs.client_id
    ok = outputs.finite & jnp.all(jnp.isfinite(flat), axis=1)
    x = jnp.where(ok[:, None], flat, 0.0)
    if state.memory is None:
      decoded, _ = jax.vmap(lambda v, k: encode_one(v, None, k))(x, keys)
      memory = None
    else:
      if state.memory.shape[1] != flat.shape[1]:
        raise ValueError(f"num_params={state.memory.shape[1]} but the updates have "
                         f"{flat.shape[1]} parameters.")
      decoded, new = jax.vmap(encode_one)(x, state.memory[ids], keys)
      memory = state.memory.at[ids].set(jnp.where(ok[:, None], new, state.memory[ids]))
    decoded = jnp.where(ok[:, None], decoded, flat)   # non-finite stays so: the inner sees it
    out = outputs._replace(delta=jax.vmap(unravel)(decoded.astype(flat.dtype)))
    delta, weights, inner_state = inner.apply(out, state.inner, params)
    return delta, weights, CompressedState(inner_state, key, memory)

  def init(num_clients):
    memory = jnp.zeros((num_clients, num_params), jnp.float32) if remember else None
    return CompressedState(inner.init(num_clients), key, memory)

  return inner._replace(init=init, apply=apply, score=None)
