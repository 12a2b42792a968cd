"""Running a cohort (`core._cohort`) on a hand-made program whose client output is a number
computed in Python: every strategy's outputs, counts and executed steps, streaming with
scores, padding clients, sharding over four devices, and the small helpers by hand."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import deal_by_steps, lpt_makespan

import fedjax_pers as fp
from fedjax_pers.core._client import ClientData, ClientOutput
from fedjax_pers.core._cohort import (
  CohortSource,
  _chunk_cost,
  balance,
  balance_on_host,
  execute_cohort,
  normalize,
  pad_cohort,
  run_cohort,
  safe_divide,
  step_counts,
  weighted_sum,
  zero_nonfinite,
)
from fedjax_pers.core._execution import Plan
from fedjax_pers.core._program import LocalProgram, Steps

S = 4
SIZES = np.array([4, 1, 3, 0, 2, 4, 3, 1], np.int32)
RS = np.random.RandomState(0)
XS = RS.uniform(1, 2, size=(8, S)).astype(np.float32)
XS[5, 0] = np.nan                                  # client 5's update is not finite
YS = RS.randint(0, 3, size=(8, S))
PARAMS = {"a": np.float32(0.9), "c0": np.float32(0.5)}   # (no JAX array at import)


def _extra(key):
  return jax.random.uniform(key, (S,))


def _program():
  """carry ← a · carry + Σ real x + extra_k (the client key's uniforms), one row a step,
  n steps; Δ = (c, 2c) in the params' structure (a, c0)."""
  def start(params, client, key):
    idx = jnp.arange(S, dtype=jnp.int32)[:, None]
    return params["c0"], Steps(idx, idx < client.num_examples, _extra(key))

  def step(params, c, batch):
    return params["a"] * c + jnp.sum(jnp.where(batch.mask, batch.x, 0)) + batch.extra

  def finish(params, client, c):
    return ClientOutput(delta={"a": c, "c0": 2 * c}, num_examples=client.num_examples,
                        train_loss=c, num_steps=jnp.int32(0), label_hist=jnp.zeros(2),
                        finite=jnp.isfinite(c))

  return LocalProgram(start, step, finish, lambda client: client.num_examples)


def _reference(i, key, steps=None):
  """Client i's carry after its steps (default all n_i), in float64 Python."""
  extra = np.asarray(_extra(key), np.float64)
  c = 0.5
  for k in range(SIZES[i] if steps is None else steps):
    c = 0.9 * c + float(XS[i, k]) + extra[k]
  return c


def _delta(delta, j=None):
  """A client's (or the stream's) Δ as the pair (Δa, Δc0)."""
  at = (lambda a: a) if j is None else (lambda a: a[j])
  return np.array([at(delta["a"]), at(delta["c0"])])


def _source(deal=None):
  def rows(ids):
    return ClientData(jnp.asarray(XS)[ids], jnp.asarray(YS)[ids], jnp.asarray(SIZES)[ids],
                      None, ids)

  return CohortSource(rows=rows, sizes=jnp.asarray(SIZES), table=(jnp.asarray(XS),
                      jnp.asarray(YS)), handles=lambda ids: ids,
                      read=lambda t, h, idx: (t[0][h][idx], t[1][h][idx]), deal=deal)


PLANS = {"vmap": Plan("vmap", None, None, False), "chunked": Plan("chunked", 3, None, False),
         "scan": Plan("scan", None, None, False), "lanes": Plan("lanes", None, 2, False),
         "lanes_one_by_one": Plan("lanes", None, 3, False, plans_one_by_one=True),
         "vmap_one_by_one": Plan("vmap", None, None, False, plans_one_by_one=True),
         "differentiable": Plan("vmap", None, None, True),
         "differentiable_scan": Plan("scan", None, None, True)}
IDS = np.array([2, 0, 5, 3, 6, 1, 4])
VALID = np.array([True, True, True, True, True, False, True])


def _expected_executed(plan, counts):
  k = len(counts)
  if plan.differentiable:
    return k * S
  return {"vmap": k * max(counts), "scan": sum(counts),
          "chunked": sum(len(c) * max(c) for c in np.array_split(counts, range(3, k, 3))),
          "lanes": plan.lanes * lpt_makespan(counts, plan.lanes) if plan.lanes else 0,
          }[plan.strategy]


@pytest.mark.parametrize("name", list(PLANS))
def test_every_strategy_runs_each_clients_steps(name):
  plan, key = PLANS[name], jax.random.key(3)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(IDS))
  clients = _source().rows(jnp.asarray(IDS))
  (outputs, counts), acc, u, executed = jax.jit(
      lambda p: run_cohort(_program(), p, clients, keys, jnp.asarray(VALID), plan=plan))(PARAMS)
  assert acc is None and u is None
  want_counts = [SIZES[i] if (v or plan.differentiable) else 0 for i, v in zip(IDS, VALID)]
  np.testing.assert_array_equal(counts, want_counts)
  for j, i in enumerate(IDS):
    want = _reference(i, keys[j], want_counts[j])
    got = _delta(outputs.delta, j)
    if np.isnan(want):
      assert np.isnan(got).all() and not bool(outputs.finite[j])
    else:
      np.testing.assert_allclose(got, [want, 2 * want], rtol=1e-5)
  assert int(executed) == _expected_executed(plan, want_counts)
  assert executed.dtype == jnp.int32


@pytest.mark.parametrize("differentiable", [False, True])
def test_a_scored_scan_streams_the_weighted_sum_of_the_finite_valid_clients(differentiable):
  plan = Plan("scan", None, None, differentiable)
  keys = jax.random.split(jax.random.key(4), len(IDS))
  clients = _source().rows(jnp.asarray(IDS))
  score = lambda out: out.num_examples.astype(jnp.float32) + 1.0
  (outputs, counts), (acc, total), u, executed = run_cohort(
      _program(), PARAMS, clients, keys, jnp.asarray(VALID), plan=plan, score=score)
  assert outputs.delta is None
  want_u = [SIZES[i] + 1.0 if v and i != 5 else 0.0 for i, v in zip(IDS, VALID)]
  np.testing.assert_array_equal(u, want_u)
  assert float(total) == sum(want_u)
  c = [_reference(i, keys[j]) if want_u[j] else 0.0 for j, i in enumerate(IDS)]
  want = sum(uj * cj for uj, cj in zip(want_u, c))
  np.testing.assert_allclose(_delta(acc), [want, 2 * want], rtol=1e-5)
  np.testing.assert_allclose(outputs.train_loss[1], _reference(0, keys[1]), rtol=1e-5)
  assert int(executed) == (len(IDS) * S if differentiable else
                           sum(SIZES[i] for i, v in zip(IDS, VALID) if v))
  np.testing.assert_array_equal(counts, [SIZES[i] if v or differentiable else 0
                                         for i, v in zip(IDS, VALID)])


def test_reverse_mode_goes_through_a_differentiable_streamed_cohort():
  """Σ_i u_i c_i with u_i = n_i + 1: d/dc_0 = Σ_i u_i a^{n_i} over the valid finite clients
  (client 5's NaN update weighs 0)."""
  plan = Plan("scan", None, None, True)
  keys = jax.random.split(jax.random.key(4), len(IDS))
  clients = _source().rows(jnp.asarray(IDS))
  score = lambda out: out.num_examples.astype(jnp.float32) + 1.0
  total = lambda p: run_cohort(_program(), p, clients, keys, jnp.asarray(VALID), plan=plan,
                               score=score)[1][0]["a"]
  g = jax.grad(total)(PARAMS)
  want = sum((SIZES[i] + 1.0) * 0.9 ** SIZES[i] for i, v in zip(IDS, VALID) if v and i != 5)
  np.testing.assert_allclose(float(g["c0"]), want, rtol=1e-5)


def test_reverse_mode_goes_through_a_differentiable_cohort_side_by_side():
  """Σ_i c_i over the finite clients of a differentiable vmap or chunked plan: d/dc_0 = Σ_i
  a^{n_i}, every client running (padding too: a differentiable plan runs them all)."""
  keys = jax.random.split(jax.random.key(4), len(IDS))
  clients = _source().rows(jnp.asarray(IDS))
  for plan in (PLANS["differentiable"], Plan("chunked", 3, None, True)):
    def total(p, plan=plan):
      (out, _), *_ = run_cohort(_program(), p, clients, keys, jnp.asarray(VALID), plan=plan)
      return jnp.sum(jnp.where(out.finite, out.delta["a"], 0.0))
    g = jax.grad(total)(PARAMS)
    np.testing.assert_allclose(float(g["c0"]), sum(0.9 ** SIZES[i] for i in IDS if i != 5),
                               rtol=1e-5)


def test_reading_from_a_table_by_handle_equals_the_clients_own_rows():
  keys = jax.random.split(jax.random.key(5), 3)
  ids = jnp.int32([4, 0, 6])
  clients = _source().rows(ids)
  twice = jnp.asarray(XS) * 2
  reader = lambda h: lambda idx: (twice[h][idx], jnp.asarray(YS)[h][idx])
  score = lambda out: jnp.float32(1)
  for plan in (PLANS["vmap"], PLANS["scan"], PLANS["lanes"]):
    (own, _), *_ = run_cohort(_program(), PARAMS, clients, keys, jnp.ones(3, bool), plan=plan)
    (read, _), *_ = run_cohort(_program(), PARAMS, clients._replace(x=clients.x * 2), keys,
                               jnp.ones(3, bool), plan=plan)
    (by_handle, _), *_ = run_cohort(_program(), PARAMS, clients, keys, jnp.ones(3, bool),
                                    plan=plan, handles=ids, reader=reader)
    np.testing.assert_array_equal(_delta(by_handle.delta), _delta(read.delta))
    assert not np.allclose(_delta(own.delta), _delta(read.delta))
  # Streamed: the sum of the updates read by handle is that of the doubled rows.
  _, (want, _), _, _ = run_cohort(_program(), PARAMS, clients._replace(x=clients.x * 2), keys,
                                  jnp.ones(3, bool), plan=PLANS["scan"], score=score)
  _, (got, _), _, _ = run_cohort(_program(), PARAMS, clients, keys, jnp.ones(3, bool),
                                 plan=PLANS["scan"], score=score, handles=ids, reader=reader)
  np.testing.assert_array_equal(_delta(got), _delta(want))


def test_an_unknown_strategy_is_refused():
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(ValueError, match="plan.strategy must be vmap, chunked, scan or lanes; "
                                       "got 'loop'"):
    run_cohort(_program(), PARAMS, _source().rows(jnp.int32([0, 1])), keys, jnp.ones(2, bool),
               plan=Plan("loop", None, None, False))


@pytest.mark.parametrize("devices", [None, 2, 4])
@pytest.mark.parametrize("name", ["vmap", "scan", "lanes", "differentiable"])
def test_executing_a_cohort_gives_each_client_its_key_and_steps(devices, name):
  """Keys `fold_in(key, id)`, outputs in the order of the ids whatever the deal over devices,
  `num_steps` set, real steps of the valid clients only; executed steps summed over devices."""
  plan, key = PLANS[name], jax.random.key(6)
  ids = jnp.asarray(np.r_[IDS, 7])
  valid = jnp.asarray(np.r_[VALID, False])
  mesh = None if devices is None else fp.distributed.client_mesh(devices)
  result = jax.jit(lambda p: execute_cohort(_program(), p, _source(), ids, valid, key,
                                            plan=plan, mesh=mesh))(PARAMS)
  counts = [SIZES[i] if v or plan.differentiable else 0 for i, v in zip(np.asarray(ids), valid)]
  np.testing.assert_array_equal(result.outputs.num_steps, counts)
  for j, i in enumerate(np.asarray(ids)):
    want = _reference(i, jax.random.fold_in(key, i), counts[j])
    if i != 5:
      np.testing.assert_allclose(_delta(result.outputs.delta, j), [want, 2 * want], rtol=1e-5)
  assert int(result.real_steps) == sum(c for c, v in zip(counts, valid) if v)
  assert result.score_sum is None and result.scores is None
  if devices is None:
    assert int(result.executed_steps) == _expected_executed(plan, counts)
  else:   # each device runs its dealt share by the plan; the total is their sum
    perm = np.asarray(balance(jnp.asarray(np.where(valid, SIZES[np.asarray(ids)], 0)), devices))
    shares = np.asarray(counts)[perm].reshape(devices, -1)
    want = sum(_expected_executed(plan, list(s)) for s in shares)
    assert int(result.executed_steps) == want


def test_padding_clients_count_no_steps_when_the_cohort_is_dealt():
  """Cohort (2, 0, 4, 3, 7, 1) of steps (3, 4, 2, 0, 1, 1), only 2, 7, 1 valid, on 3 devices:
  the valid steps (3, 0, 0, 0, 1, 1) deal as (2, 3 | 7, 0 | 1, 4), padded steps 2·3 + 2·1 +
  2·1 = 10. (Had the invalid clients counted a step each, the deal would differ: 8.)"""
  ids = jnp.int32([2, 0, 4, 3, 7, 1])
  valid = jnp.asarray([True, False, False, False, True, True])
  result = execute_cohort(_program(), PARAMS, _source(), ids, valid, jax.random.key(0),
                          plan=PLANS["vmap"], mesh=fp.distributed.client_mesh(3))
  assert int(result.executed_steps) == 10 and int(result.real_steps) == 5


def test_the_steps_read_their_batches_from_the_sources_table():
  """`rows` feeds `start` and `finish`; every batch is read from `table` (a store's arrays,
  not a copy of the cohort's rows): a table of doubled features doubles what the steps see."""
  ids, valid, key = jnp.int32([2, 0, 6]), jnp.ones(3, bool), jax.random.key(9)
  doubled = _source()._replace(table=(2 * jnp.asarray(XS), jnp.asarray(YS)))
  for plan, mesh in ((PLANS["vmap"], None), (PLANS["scan"], None), (PLANS["lanes"], None),
                     (PLANS["vmap"], fp.distributed.client_mesh(3))):
    got = execute_cohort(_program(), PARAMS, doubled, ids, valid, key, plan=plan, mesh=mesh)
    for j, i in enumerate(np.asarray(ids)):
      extra = np.asarray(_extra(jax.random.fold_in(key, i)), np.float64)
      c = 0.5
      for k in range(SIZES[i]):
        c = 0.9 * c + 2 * float(XS[i, k]) + extra[k]
      np.testing.assert_allclose(_delta(got.outputs.delta, j), [c, 2 * c], rtol=1e-5)


def test_a_scored_cohort_over_devices_sums_the_stream_across_them():
  plan, key = Plan("scan", None, None, False), jax.random.key(7)
  ids, valid = jnp.int32([0, 1, 2, 4, 6, 7, 3, 0]), jnp.asarray([True] * 7 + [False])
  score = lambda out: out.num_examples.astype(jnp.float32)
  one = execute_cohort(_program(), PARAMS, _source(), ids, valid, key, plan=plan, score=score)
  four = execute_cohort(_program(), PARAMS, _source(), ids, valid, key, plan=plan, score=score,
                        mesh=fp.distributed.client_mesh(4))
  np.testing.assert_allclose(_delta(four.score_sum[0]), _delta(one.score_sum[0]), rtol=1e-5)
  assert float(four.score_sum[1]) == float(one.score_sum[1]) == sum(SIZES[[0, 1, 2, 4, 6, 7, 3]])
  np.testing.assert_array_equal(four.scores, one.scores)
  np.testing.assert_array_equal(one.scores, [4, 1, 3, 2, 3, 1, 0, 0])


def test_a_dealt_source_needs_a_mesh_and_a_cohort_of_its_shape():
  ids, valid = jnp.int32([0, 1, 2, 4]), jnp.ones(4, bool)
  two = fp.distributed.client_mesh(2)
  tail = (", which takes no deal: gather the cohort without one (CohortFeed without mesh).")
  for mesh, deal, plan, says in (
      (None, jnp.arange(4), PLANS["vmap"], r"\(4,\) lays a cohort of 4 over a mesh; this round "
                                          r"runs on 1 device\(s\)"),
      (two, jnp.arange(6), PLANS["vmap"], r"\(6,\) lays a cohort of 4 over a mesh; this round "
                                         r"runs on 2 device\(s\)"),
      (two, jnp.arange(4), PLANS["differentiable"],
       r"\(4,\) lays a cohort of 4 over a mesh; this round runs on 2 device\(s\) with a "
       r"differentiable plan")):
    with pytest.raises(ValueError, match="^data.deal " + says + re.escape(tail) + "$"):
      execute_cohort(_program(), PARAMS, _source(deal), ids, valid, jax.random.key(0),
                     plan=plan, mesh=mesh)


def test_a_dealt_source_runs_each_device_on_its_own_rows():
  """A host feed's deal: the table holds the dealt clients' rows, device j the rows
  j k/d ... (j+1) k/d − 1 at local positions; the outputs are those of the undealt round."""
  ids, valid = jnp.int32([2, 0, 5, 3, 6, 1]), jnp.asarray([True] * 5 + [False])
  key = jax.random.key(8)
  perm = jnp.int32([4, 1, 0, 5, 3, 2])
  dealt = _source(deal=perm)._replace(
      table=(jnp.asarray(XS)[ids[perm]], jnp.asarray(YS)[ids[perm]]),
      handles=lambda i: pytest.fail("a dealt source reads at local positions"))
  mesh = fp.distributed.client_mesh(2)
  for plan in (PLANS["vmap"], PLANS["scan"]):
    got = execute_cohort(_program(), PARAMS, dealt, ids, valid, key, plan=plan, mesh=mesh)
    want = execute_cohort(_program(), PARAMS, _source(), ids, valid, key, plan=plan)
    np.testing.assert_array_equal(got.outputs.num_steps, want.outputs.num_steps)
    np.testing.assert_allclose(_delta(got.outputs.delta), _delta(want.outputs.delta), rtol=1e-6)


def test_step_counts_of_a_cohort():
  sizes, ids = jnp.int32([5, 2, 7]), jnp.int32([2, 2, 0, 1])
  per_client = LocalProgram(None, None, None, lambda c: c.num_examples + c.id)
  np.testing.assert_array_equal(step_counts(per_client, sizes, ids), [9, 9, 5, 3])
  fixed = step_counts(per_client._replace(num_steps=lambda c: 6), sizes, ids)
  assert fixed.dtype == jnp.int32
  np.testing.assert_array_equal(fixed, [6, 6, 6, 6])


def test_balance_by_hand_and_on_the_host():
  """[9, 1, 5, 5, 3, 1] on 2 devices, 3 each, largest first to the lighter device: 9 → d0,
  5 → d1, 5 → d1 (10), 3 → d0 (12), 1 → d1 (now full), 1 → d0: device 0 runs clients
  (0, 4, 5), device 1 (2, 3, 1)."""
  counts = np.array([9, 1, 5, 5, 3, 1])
  np.testing.assert_array_equal(balance(jnp.asarray(counts, jnp.int32), 2), [0, 4, 5, 2, 3, 1])
  np.testing.assert_array_equal(balance_on_host(counts, 2), [0, 4, 5, 2, 3, 1])
  np.testing.assert_array_equal(balance(jnp.int32([3, 3, 3, 3]), 2), [0, 2, 1, 3])
  np.testing.assert_array_equal(balance(jnp.int32([2, 7, 4]), 1), [1, 2, 0])
  rs = np.random.RandomState(1)
  for devices, k in [(2, 10), (4, 12), (3, 9)]:
    counts = (np.exp(rs.normal(3, 1.5, k))).astype(np.int32)
    perm = np.asarray(balance(jnp.asarray(counts), devices))
    np.testing.assert_array_equal(balance_on_host(counts, devices), perm)
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(k))
    got = [sorted(perm[j * (k // devices):(j + 1) * (k // devices)].tolist())
           for j in range(devices)]
    assert got == [sorted(g) for g in deal_by_steps(counts.tolist(), devices)]


def test_chunk_cost_by_hand():
  counts = jnp.int32([3, 1, 4, 1, 5])
  assert int(_chunk_cost(counts, 2)) == 2 * 3 + 2 * 4 + 1 * 5
  assert int(_chunk_cost(counts, 5)) == 5 * 5
  assert int(_chunk_cost(counts, 3)) == 3 * 4 + 2 * 5
  assert int(_chunk_cost(counts, 1)) == 14
  big = jnp.int32([2**24 + 1, 3])                 # exact in int32, not in float32
  assert _chunk_cost(big, 3).dtype == jnp.int32 and int(_chunk_cost(big, 3)) == 2 * (2**24 + 1)


def test_padding_a_cohort_repeats_its_first_clients_as_invalid():
  idx, valid = pad_cohort(np.array([5, 7, 9]), 2)
  assert isinstance(idx, np.ndarray) and isinstance(valid, np.ndarray)
  np.testing.assert_array_equal(idx, [5, 7, 9, 5])
  np.testing.assert_array_equal(valid, [True, True, True, False])
  idx, valid = pad_cohort(jnp.int32([5, 7]), 4)
  assert isinstance(idx, jax.Array)
  np.testing.assert_array_equal(idx, [5, 7, 5, 7])
  np.testing.assert_array_equal(valid, [True, True, False, False])
  idx, valid = pad_cohort(np.array([5, 7, 9]), 4)
  np.testing.assert_array_equal(idx, [5, 7, 9, 5])
  np.testing.assert_array_equal(valid, [True, True, True, False])
  idx, valid = pad_cohort(np.array([6]), 4)
  np.testing.assert_array_equal(idx, [6, 6, 6, 6])
  np.testing.assert_array_equal(valid, [True, False, False, False])
  idx, valid = pad_cohort(np.array([1, 2, 3, 4]), 4)
  np.testing.assert_array_equal(idx, [1, 2, 3, 4])
  assert valid.all() and valid.shape == (4,)


def test_weighted_sums_divisions_and_non_finite_updates_by_hand():
  deltas = {"a": jnp.float32([[1, 2], [3, 4], [5, 6]]), "b": jnp.float32([1, 10, 100])}
  got = weighted_sum(jnp.float32([0.5, 0.0, 2.0]), deltas)
  np.testing.assert_allclose(got["a"], [10.5, 13.0])
  assert float(got["b"]) == 200.5
  np.testing.assert_allclose(safe_divide(jnp.float32([1, 2]), jnp.float32(4)), [0.25, 0.5])
  for total in (0.0, -2.0):
    np.testing.assert_array_equal(safe_divide(jnp.float32([1, 2]), jnp.float32(total)), [0, 0])
  g = jax.grad(lambda t: safe_divide(jnp.float32(3), t))(jnp.float32(0))
  assert float(g) == 0.0
  np.testing.assert_allclose(normalize(jnp.float32([1, 3, 4]), jnp.array([True, False, True])),
                             [0.2, 0, 0.8])
  np.testing.assert_array_equal(normalize(jnp.float32([1, 3]), jnp.array([False, False])), [0, 0])
  outputs = ClientOutput({"m": jnp.float32([[[1]], [[np.inf]]]), "v": jnp.float32([np.nan, 2])},
                         None, None, None, None, jnp.array([True, False]))
  z = zero_nonfinite(outputs)
  np.testing.assert_array_equal(z["m"], [[[1]], [[0]]])
  np.testing.assert_array_equal(z["v"], [np.nan, 0])       # the finite client keeps its own
