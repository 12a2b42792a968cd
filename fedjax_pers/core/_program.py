"""A client's local training as a program: `start`, one `step` per batch, `finish`.

Algorithms say what one client computes; the engine says how a cohort's steps
run. A `LocalProgram` is the contract between the two:

* `start(params, client, key) -> (carry, steps)`: the client's state before its
  first step (local model, optimizer state, sums) and its `Steps`, the example
  slots of every step in order (static length `S`, the longest client's);
* `step(params, carry, batch) -> carry`: one local step on one `Batch`, which the
  engine gathers from the client's rows;
* `finish(params, client, carry) -> ClientOutput`: what the client sends back (a
  round's programs; evaluation returns its own sums);
* `num_steps(client) -> count`: how many of the `S` steps do work (the rest are
  all padding). A Python int means every client takes that many. It reads only
  `client.num_examples` and `client.id`, elementwise, and is also called on the
  whole population's host NumPy arrays to plan a round: write it with
  `array_module(...)` (NumPy for NumPy input, `jax.numpy` otherwise).

Because a step sees only its batch, the engine may run the steps of many clients
side by side in any order (`core/_lanes.py`), stop each client after its own
`count` steps (`lax.while_loop`), or run all `S` steps with the padding ones
masked out, the path reverse-mode `jax.grad` can go through (`run_client`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pers.core._client import ClientData, ClientOutput

Params = Any


class Steps(NamedTuple):
  """The local steps of one client, in order.

  Attributes:
    idx: `[S, *batch_shape]` int32 slots into the client's rows (or a pytree of
      such arrays, for steps that read several batches).
    mask: Like `idx`, bool, True for real examples.
    extra: Any pytree of `[S, ...]` per-step inputs (PRNG keys, phases), or `()`.
  """

  idx: jax.Array
  mask: jax.Array
  extra: Any = ()


class Batch(NamedTuple):
  """One step's input: the rows `x`, `y` of `Steps.idx` (the same pytree structure)
  and the step's `mask` and `extra`."""

  x: jax.Array
  y: jax.Array
  mask: jax.Array
  extra: Any = ()


class LocalProgram(NamedTuple):
  """One client's local training as pure functions (see the module docstring)."""

  start: Callable[[Params, ClientData, jax.Array], tuple[Any, Steps]]
  step: Callable[[Params, Any, Batch], Any]
  finish: Callable[[Params, ClientData, Any], Any]
  num_steps: Callable[[ClientData], jax.Array | int]


def array_module(*values):
  """`numpy` when every value is a NumPy array or a Python/NumPy number, else `jax.numpy`."""
  host = all(isinstance(v, (np.ndarray, np.generic, int, float)) for v in values)
  return np if host else jnp


def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `pred` else `old`, leaf by leaf; `pred` broadcasts from the leading axes."""

  def pick(a, b):
    p = jnp.reshape(pred, jnp.shape(pred) + (1,) * (jnp.ndim(a) - jnp.ndim(pred)))
    return jnp.where(p, a, b)

  return jax.tree.map(pick, new, old)


def batch_at(read: Callable[[jax.Array], tuple[jax.Array, jax.Array]], steps: Steps,
             i: jax.Array) -> Batch:
  """The `Batch` of step `i` of one client whose rows at slots `idx` are `read(idx)`."""
  at = lambda tree: jax.tree.map(lambda a: a[i], tree)
  idx = at(steps.idx)
  return Batch(jax.tree.map(lambda j: read(j)[0], idx), jax.tree.map(lambda j: read(j)[1], idx),
               at(steps.mask), at(steps.extra))


def num_plan_steps(steps: Steps) -> int:
  """`S`, the static number of steps of a `Steps`."""
  return jax.tree.leaves(steps.idx)[0].shape[0]


def pad_steps(steps: Steps, total: int) -> Steps:
  """`steps` lengthened to `total` steps with steps that hold no example (slot 0,
  masked out; `extra` repeats the first step's)."""
  extra = total - num_plan_steps(steps)
  if extra == 0:
    return steps

  def pad(a, fill=None):
    tail = (jnp.zeros((extra,) + a.shape[1:], a.dtype) if fill is None
            else jnp.repeat(a[:1], extra, axis=0))
    return jnp.concatenate([a, tail])

  return Steps(jax.tree.map(pad, steps.idx), jax.tree.map(pad, steps.mask),
               jax.tree.map(lambda a: pad(a, fill=True), steps.extra))


def static_count(count: jax.Array | int) -> int | None:
  """`count` as a Python int when it is one (the same for every client), else None."""
  return count if isinstance(count, int) else None


def run_steps(program: LocalProgram, params: Params, client: ClientData, carry: Any,
              steps: Steps, count: jax.Array | int, *, differentiable: bool,
              read: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None) -> Any:
  """Runs one client's steps from `carry`; returns the final carry.

  Batches come from `read(idx) -> (x, y)` (default: the client's own rows).

  `differentiable=False`: a `lax.while_loop` over the first `count` steps, so
  the client costs its real steps. `True`: a `lax.scan` over all `S` steps in
  which a step at or after `count` leaves the carry unchanged (`jnp.where`), so
  reverse-mode differentiation can go through it; bit for bit the same steps.
  A count known to be `S` (the same steps for every client) is a plain scan.
  """
  if read is None:
    read = lambda idx: (client.x[idx], client.y[idx])
  total = num_plan_steps(steps)
  if differentiable or static_count(count) == total:   # every step does work: a scan
    guard = static_count(count) != total

    def body(c, i):
      new = program.step(params, c, batch_at(read, steps, i))
      return (tree_where(i < count, new, c) if guard else new), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(total))
    return carry

  def loop(state):
    i, c = state
    return i + 1, program.step(params, c, batch_at(read, steps, i))

  _, carry = jax.lax.while_loop(lambda s: s[0] < count, loop,
                                (jnp.zeros((), jnp.int32), carry))
  return carry


def run_client(program: LocalProgram, params: Params, client: ClientData, key: jax.Array,
               *, differentiable: bool, active: jax.Array | bool = True,
               steps: Steps | None = None,
               read: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
               ) -> tuple[Any, jax.Array]:
  """One client's whole local work: `start`, its steps (`run_steps`), `finish`.

  `active=False` (padding clients of a sharded cohort) runs no step. `steps`:
  the client's `Steps` if already built (see `cohort_steps`). `read`: where its
  batches come from (see `run_steps`).

  Returns:
    `(finish's output, the client's count of steps that did work)`.
  """
  carry, own = program.start(params, client, key)
  steps = own if steps is None else steps
  count = program.num_steps(client)
  if active is not True:
    count = jnp.where(active, count, 0)
  carry = run_steps(program, params, client, carry, steps, count,
                    differentiable=differentiable, read=read)
  return program.finish(params, client, carry), jnp.asarray(count, jnp.int32)


def cohort_steps(program: LocalProgram, params: Params, clients: ClientData,
                 keys: jax.Array, *, one_by_one: bool) -> Steps:
  """Every client's `Steps`, stacked: built one client at a time (`lax.map`, where a
  plan sorts only what its client holds, `shuffle_fitted`) or all at once (`vmap`).
  (The carries `start` also returns are dead code here, which XLA removes.)"""
  plan_of = lambda args: program.start(params, args[0], args[1])[1]
  if one_by_one:
    return jax.lax.map(plan_of, (clients, keys))
  return jax.vmap(plan_of)((clients, keys))


def capped(program: LocalProgram, cap: int) -> LocalProgram:
  """`program` on a capped store: it trains on `min(n, cap)` of a client's examples
  (the rows `FederatedData.cohort` gave it) and reports (in a `ClientOutput`) the
  true `n`, which the aggregation weights use."""

  def see(client):
    n = client.num_examples
    return client._replace(num_examples=array_module(n).minimum(n, cap))

  def finish(params, client, carry):
    out = program.finish(params, see(client), carry)
    if isinstance(out, ClientOutput):
      out = out._replace(num_examples=client.num_examples)
    return out

  return LocalProgram(
      start=lambda params, client, key: program.start(params, see(client), key),
      step=program.step, finish=finish, num_steps=lambda client: program.num_steps(see(client)))
