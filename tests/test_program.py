"""A client's local work as pure functions (`core._program`), on a hand-made program
whose carry is a number: steps run in order and stop at the client's count (loop, guarded
scan and plain scan alike), their gradient, padding of steps, capped clients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pers.core._client import ClientData, ClientOutput
from fedjax_pers.core._program import (
  Batch,
  LocalProgram,
  Steps,
  array_module,
  batch_at,
  capped,
  cohort_steps,
  num_plan_steps,
  pad_steps,
  run_client,
  run_steps,
  static_count,
  tree_where,
)

S = 5                                           # plan steps of every client
X = np.arange(1.0, 8.0, dtype=np.float32)       # one client's 7 rows
Y = np.array([3, 1, 4, 1, 5, 9, 2])


def _plan(n, key):
  """Step k reads slots (k, k + 2) mod 7, real where below n; extra = k/10 + key noise."""
  k = np.arange(S)
  idx = jnp.asarray(np.stack([k, k + 2], 1) % 7, jnp.int32)
  noise = jax.random.uniform(key, (S,)) if key is not None else jnp.zeros(S)
  return Steps(idx, idx < n, jnp.asarray(k / 10, jnp.float32) + noise)


def _program(halving=True):
  """carry ← a · carry + Σ real x + extra + Σ real y / 100, for ⌊n/2⌋ steps (or S)."""
  def step(params, c, batch):
    real = lambda v: jnp.sum(jnp.where(batch.mask, v, 0))
    return params["a"] * c + real(batch.x) + batch.extra + real(batch.y) / 100

  return LocalProgram(
      start=lambda params, client, key: (params["c0"], _plan(client.num_examples, key)),
      step=step,
      finish=lambda params, client, c: (c, client.num_examples),
      num_steps=(lambda client: client.num_examples // 2) if halving else (lambda client: S))


def _reference(a, c, n, count, extra, x=X, y=Y):
  """The same steps in float64 Python."""
  for k in range(count):
    real = [j for j in (k % 7, (k + 2) % 7) if j < n]
    c = (a * c + sum(float(x[j]) for j in real) + float(extra[k])
         + sum(int(y[j]) for j in real) / 100)
  return c


def _client(n):
  return ClientData(jnp.asarray(X), jnp.asarray(Y), jnp.int32(n), None, jnp.int32(0))


PARAMS = {"a": np.float32(0.5), "c0": np.float32(2.0)}   # (no JAX array at import)


def test_array_module_is_numpy_only_for_host_values():
  assert array_module(np.ones(2), 3, 2.5, np.int32(1)) is np
  assert array_module() is np
  for mixed in ((np.ones(2), jnp.ones(2)), (jnp.int32(3),), (3, jnp.float32(1))):
    assert array_module(*mixed) is jnp


def test_tree_where_picks_rows_by_a_leading_predicate():
  pred = jnp.array([True, False])
  new = {"m": jnp.ones((2, 3)), "v": jnp.float32([5, 6])}
  old = {"m": jnp.zeros((2, 3)), "v": jnp.float32([7, 8])}
  got = tree_where(pred, new, old)
  np.testing.assert_array_equal(got["m"], [[1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(got["v"], [5, 8])
  assert tree_where(jnp.bool_(False), new, old)["m"].shape == (2, 3)
  np.testing.assert_array_equal(tree_where(jnp.bool_(False), new, old)["v"], [7, 8])


def test_a_steps_batch_reads_its_slots_of_every_tree():
  steps = Steps({"p": jnp.int32([[0, 1], [2, 3]]), "q": jnp.int32([[4], [5]])},
                {"p": jnp.array([[True, False], [True, True]]), "q": jnp.array([[True], [False]])},
                {"k": jnp.float32([0.5, 1.5])})
  read = lambda idx: (jnp.asarray(X)[idx], jnp.asarray(Y)[idx])
  b = batch_at(read, steps, jnp.int32(1))
  np.testing.assert_array_equal(b.x["p"], [3, 4])
  np.testing.assert_array_equal(b.y["p"], [4, 1])
  np.testing.assert_array_equal(b.x["q"], [6])
  np.testing.assert_array_equal(b.y["q"], [9])
  np.testing.assert_array_equal(b.mask["p"], [True, True])
  np.testing.assert_array_equal(b.mask["q"], [False])
  assert float(b.extra["k"]) == 1.5
  assert num_plan_steps(steps) == 2 and num_plan_steps(_plan(3, None)) == S


def test_padding_adds_steps_that_hold_no_example():
  steps = _plan(4, jax.random.key(0))
  assert pad_steps(steps, S) is steps
  padded = pad_steps(steps, S + 2)
  assert num_plan_steps(padded) == S + 2
  np.testing.assert_array_equal(padded.idx[:S], steps.idx)
  np.testing.assert_array_equal(padded.idx[S:], 0)
  assert padded.idx.dtype == steps.idx.dtype and padded.mask.dtype == jnp.bool_
  np.testing.assert_array_equal(padded.mask[:S], steps.mask)
  assert not np.any(padded.mask[S:])
  np.testing.assert_array_equal(padded.extra[:S], steps.extra)
  np.testing.assert_array_equal(padded.extra[S:], [steps.extra[0]] * 2)
  wide = pad_steps(Steps(steps.idx, steps.mask, jnp.arange(2 * S).reshape(S, 2)), S + 2)
  np.testing.assert_array_equal(wide.extra[S:], [[0, 1], [0, 1]])   # each step's own row
  keys = Steps(steps.idx, steps.mask, jax.random.split(jax.random.key(1), S))
  padded = pad_steps(keys, S + 1)
  np.testing.assert_array_equal(jax.random.key_data(padded.extra[S]),
                                jax.random.key_data(keys.extra[0]))


def test_a_static_count_is_a_python_int():
  assert static_count(3) == 3 and static_count(0) == 0
  assert static_count(jnp.int32(3)) is None and static_count(np.int32(3)) is None


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("count", [0, 2, 3, S])
@pytest.mark.parametrize("static", [False, True])
def test_the_steps_run_in_order_and_stop_at_the_count(differentiable, count, static):
  steps = _plan(6, jax.random.key(2))
  c = jnp.int32(count) if not static else count
  got = jax.jit(lambda p: run_steps(_program(), p, _client(6), p["c0"], steps, c,
                                    differentiable=differentiable))(PARAMS)
  want = _reference(0.5, 2.0, 6, count, np.asarray(steps.extra))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_steps_read_their_batches_where_told():
  steps = _plan(7, None)
  other = X * 10
  read = lambda idx: (jnp.asarray(other)[idx], jnp.asarray(Y)[idx])
  for differentiable in (False, True):
    got = run_steps(_program(), PARAMS, _client(7), PARAMS["c0"], steps, jnp.int32(3),
                    differentiable=differentiable, read=read)
    np.testing.assert_allclose(float(got), _reference(0.5, 2.0, 7, 3, np.asarray(steps.extra),
                                                      x=other), rtol=1e-6)


def test_the_gradient_through_the_guarded_scan_is_that_of_the_counted_steps():
  """c_K = a^K c_0 + Σ_k a^{K−1−k} s_k for the first K = count steps, so
  dc_K/da = Σ_k (K−1−k) a^{K−2−k} s_k + K a^{K−1} c_0 and dc_K/dc_0 = a^K."""
  steps, count, a, c0 = _plan(6, None), 3, 0.5, 2.0
  grad = jax.grad(lambda p: run_steps(_program(), p, _client(6), p["c0"], steps,
                                      jnp.int32(count), differentiable=True))(PARAMS)
  # With a = 0 and c_0 = 0, k + 1 steps leave step k's own addend s_k.
  s = [_reference(0.0, 0.0, 6, k + 1, np.asarray(steps.extra)) for k in range(count)]
  da = sum((count - 1 - k) * a ** (count - 2 - k) * s[k] for k in range(count - 1))
  da += count * a ** (count - 1) * c0
  np.testing.assert_allclose(float(grad["a"]), da, rtol=1e-5)
  np.testing.assert_allclose(float(grad["c0"]), a ** count, rtol=1e-6)


def test_reverse_mode_goes_through_a_differentiable_client_and_any_full_length_one():
  """A client asked to be differentiable, and one whose count is known to be every step
  (a plain scan either way), have dc_K/dc_0 = a^K; a traced count without asking is a
  while loop, which reverse mode refuses."""
  key = jax.random.key(5)
  last = lambda program, **kw: (lambda p: run_client(program, p, _client(6), key, **kw)[0][0])
  g = jax.grad(last(_program(), differentiable=True))(PARAMS)
  assert float(g["c0"]) == pytest.approx(0.5 ** 3)
  g = jax.grad(last(_program(halving=False), differentiable=False))(PARAMS)
  assert float(g["c0"]) == pytest.approx(0.5 ** S)
  g = jax.grad(lambda p: run_steps(_program(halving=False), p, _client(6), p["c0"],
                                   _plan(6, None), S, differentiable=False))(PARAMS)
  assert float(g["c0"]) == pytest.approx(0.5 ** S)
  with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
    jax.grad(last(_program(), differentiable=False))(PARAMS)


def test_a_client_runs_start_its_steps_and_finish():
  key = jax.random.key(3)
  for differentiable in (False, True):
    (c, n), count = run_client(_program(), PARAMS, _client(6), key,
                               differentiable=differentiable)
    _, steps = _program().start(PARAMS, _client(6), key)
    assert (int(count), count.dtype, int(n)) == (3, jnp.int32, 6)
    np.testing.assert_allclose(float(c), _reference(0.5, 2.0, 6, 3, np.asarray(steps.extra)),
                               rtol=1e-6)
    (c, _), count = run_client(_program(), PARAMS, _client(6), key,
                               differentiable=differentiable, active=jnp.bool_(False))
    assert int(count) == 0 and float(c) == 2.0
    (c, _), count = run_client(_program(), PARAMS, _client(6), key,
                               differentiable=differentiable, active=jnp.bool_(True))
    assert int(count) == 3
  given = _plan(6, None)
  read = lambda idx: (jnp.asarray(X * 3)[idx], jnp.asarray(Y)[idx])
  (c, _), count = run_client(_program(halving=False), PARAMS, _client(6), key,
                             differentiable=False, steps=given, read=read)
  assert int(count) == S and count.dtype == jnp.int32
  np.testing.assert_allclose(float(c), _reference(0.5, 2.0, 6, S, np.asarray(given.extra),
                                                  x=X * 3), rtol=1e-6)


def test_a_cohorts_steps_one_by_one_or_at_once_are_each_clients_own():
  clients = jax.tree.map(lambda *a: jnp.stack(a), _client(3), _client(6))
  keys = jax.random.split(jax.random.key(4), 2)
  for one_by_one in (False, True):
    steps = cohort_steps(_program(), PARAMS, clients, keys, one_by_one=one_by_one)
    for i, n in enumerate((3, 6)):
      own = _plan(n, keys[i])
      np.testing.assert_array_equal(steps.mask[i], own.mask)
      np.testing.assert_array_equal(steps.extra[i], own.extra)


def test_a_capped_program_trains_on_the_cap_and_reports_the_true_size():
  seen = []

  def finish(params, client, c):
    seen.append(client.num_examples)
    return ClientOutput(c * params["a"], client.num_examples, c, 0, 0, True)

  base = _program()._replace(finish=finish)
  program = capped(base, 4)
  client = _client(7)
  c0, steps = program.start(PARAMS, client, jax.random.key(0))
  np.testing.assert_array_equal(steps.mask, _plan(4, jax.random.key(0)).mask)
  np.testing.assert_array_equal(steps.extra, _plan(4, jax.random.key(0)).extra)
  assert int(program.num_steps(client)) == 2 and int(program.num_steps(_client(3))) == 1
  out = program.finish(PARAMS, client, c0)
  assert int(out.num_examples) == 7 and int(seen[-1]) == 4
  assert float(out.delta) == 2.0 * 0.5 and float(out.train_loss) == 2.0
  host = client._replace(num_examples=9)
  assert program.num_steps(host) == 2 and isinstance(program.num_steps(host), (int, np.integer))
  plain = capped(_program(), 4).finish(PARAMS, client, c0)
  assert int(plain[1]) == 4                             # not a ClientOutput: as returned
  assert program.step is base.step
  b = Batch(jnp.asarray(X[:2]), jnp.asarray(Y[:2]), jnp.ones(2, bool), jnp.float32(0))
  assert float(program.step(PARAMS, jnp.float32(1), b)) == float(base.step(PARAMS, 1.0, b))
