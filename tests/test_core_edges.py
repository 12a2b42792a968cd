"""Edge cases of the core package that its mutation pass found untested."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fedjax_pers as fp
from fedjax_pers.core import (
    _aggregate,
    _client,
    _cohort,
    _execution,
    _source,
    _system,
)


def token_clients():
  rs = np.random.RandomState(0)
  xs = [rs.randint(0, 50, (n, 2)).astype(np.int32) for n in (2, 9, 7)]
  ys = [rs.randint(0, 3, n) for n in (2, 9, 7)]
  return xs, ys


def test_with_cap_keeps_dtype_and_classes_and_seeds_the_shuffle():
  xs, ys = token_clients()
  data = fp.FederatedData.from_clients(xs, ys, num_classes=7, dtype=jnp.int32)
  for seed in (0, 5):
    kw = {} if seed == 0 else {"seed": seed}
    capped = data.with_cap(3, **kw)
    want = fp.FederatedData.from_clients(xs, ys, num_classes=7, dtype=jnp.int32,
                                         example_cap=3, seed=seed)
    assert capped.x.dtype == jnp.int32 and capped.num_classes == 7 and capped.cap == 3
    np.testing.assert_array_equal(capped.x, want.x)
    np.testing.assert_array_equal(capped.y, want.y)
  assert not np.array_equal(data.with_cap(3).x, data.with_cap(3, seed=5).x)


@pytest.mark.parametrize("cap", [0, -1, 2.5, True, "3", None])
def test_with_cap_rejects_what_is_not_an_int_at_least_1(cap):
  xs, ys = token_clients()
  data = fp.FederatedData.from_clients(xs, ys)
  with pytest.raises(ValueError, match=r"^cap must be an int >= 1"):
    data.with_cap(cap)


def test_balance_on_host_orders_unsigned_counts_as_signed():
  """Largest count first: an unsigned 0 must not wrap around to come first."""
  counts = np.array([0, 2, 1, 3], np.uint32)
  want = [3, 1, 2, 0]
  np.testing.assert_array_equal(_cohort.balance_on_host(counts, 1), want)
  np.testing.assert_array_equal(_cohort.balance_on_host(counts.astype(np.int64), 1), want)


def test_evaluate_without_host_sizes_reports_the_clients_sizes():
  rs = np.random.RandomState(0)
  xs = [rs.normal(size=(n, 3)).astype(np.float32) for n in (2, 4)]
  data = fp.FederatedData.from_clients(xs, [rs.randint(0, 2, n) for n in (2, 4)])
  bare = fp.FederatedData(x=data.x, y=data.y, num_examples=data.num_examples,
                          num_classes=data.num_classes, min_examples=data.min_examples)
  model = fp.models.logistic_regression((3,), 2)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ev = fp.core.evaluate(model, params, bare)
  np.testing.assert_array_equal(ev.num_examples, [2, 4])
  np.testing.assert_allclose(ev.loss, [math.log(2)] * 2, rtol=1e-6)   # zero logits


def test_a_stragglers_steps_are_a_whole_ceiling():
  """⌈share · S / levels⌉ as an integer: share 1 of 4 levels of S = 10 is 3 steps."""
  program = fp.core.LocalProgram(None, None, None, lambda client: 10)
  p = _system.straggling(program, jnp.asarray([0]), jnp.asarray([1]), 4, 2)
  client = fp.core.ClientData(None, None, jnp.asarray([5, 5]), id=jnp.asarray([0, 1]))
  steps = jax.vmap(p.num_steps)(client)
  assert steps.dtype == jnp.int32
  np.testing.assert_array_equal(steps, [3, 10])


def test_check_no_client_losses_names_the_algorithm_and_the_way_out():
  agg = _aggregate.Aggregator(init=None, apply=None)
  _aggregate.check_no_client_losses(agg, "apfl")             # no losses asked: fine
  want = ("apfl does not report the clients' losses before and after local training, "
          "which this weighting needs (loss_improvement, q_ffl); use one that does not, "
          "e.g. uniform, num_examples, loss or cosine.")
  with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
    _aggregate.check_no_client_losses(agg._replace(client_losses=True), "apfl")


def test_full_loss_is_the_mean_over_the_real_examples_only():
  """A model whose per-example loss is its input: the mean of the first n of 1, 2, 4, 8."""
  model = fp.core.Model(init=None, apply=lambda params, x: x, loss=lambda z, y: z,
                        metrics=None)
  x, y = jnp.asarray([1.0, 2.0, 4.0, 8.0]), jnp.zeros(4, jnp.int32)
  for n, want in ((0, 0.0), (1, 1.0), (2, 1.5), (4, 3.75)):
    client = fp.core.ClientData(x, y, jnp.asarray(n, jnp.int32))
    assert float(_client.full_loss(model, None, client)) == want


def test_client_of_a_gathered_cohort_points_to_its_host_store():
  data = fp.FederatedData(x=np.zeros((1, 2, 3), np.float32), y=np.zeros((1, 2), np.int32),
                          num_examples=np.array([2, 1], np.int32), num_classes=2,
                          min_examples=1, window=np.array([0], np.int32))
  want = ("FederatedData.client: this is one round's gathered cohort (window set); "
          "read clients from its HostStore.")
  with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
    data.client(0)


def test_host_put_places_on_the_sharding_or_on_the_default_device():
  devices = jax.devices()
  mesh = Mesh(np.array(devices), (fp.core.CLIENTS_AXIS,))
  sharding = NamedSharding(mesh, PartitionSpec(fp.core.CLIENTS_AXIS))
  a = np.arange(2 * len(devices), dtype=np.int32)
  out = _execution.host_put(sharding)({"a": a})["a"]
  assert out.sharding == sharding and out.devices() == set(devices)
  np.testing.assert_array_equal(out, a)
  plain = _execution.host_put(None)(a)
  assert plain.devices() == {devices[0]}
  np.testing.assert_array_equal(plain, a)


def test_from_own_shards_builds_the_sharded_array_from_the_host_copy():
  """The path `host_put` takes over several processes; one process holds every shard."""
  devices = jax.devices()
  mesh = Mesh(np.array(devices), (fp.core.CLIENTS_AXIS,))
  sharding = NamedSharding(mesh, PartitionSpec(fp.core.CLIENTS_AXIS))
  a = np.arange(2 * len(devices) * 3, dtype=np.float32).reshape(2 * len(devices), 3)
  out = _execution.from_own_shards({"a": a, "b": (a[:, 0],)}, sharding)
  for got, want in ((out["a"], a), (out["b"][0], a[:, 0])):
    assert got.sharding == sharding and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(shard.data, want[shard.index])
  whole = NamedSharding(mesh, PartitionSpec())      # `replicated`'s, PRNG keys too
  keys = jax.random.split(jax.random.key(3, impl="rbg"), 2)   # not the default impl
  out = _execution.from_own_shards({"key": keys, "n": 5}, whole)
  assert out["key"].sharding.is_equivalent_to(whole, 1) and out["key"].dtype == keys.dtype
  np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(keys))
  assert out["n"].sharding == whole and int(out["n"]) == 5


def test_system_takes_a_straggler_fraction_of_1():
  assert fp.System(straggler_fraction=1).straggler_fraction == 1
  assert fp.System(straggler_fraction=1.0, levels=2).active


@pytest.mark.parametrize("kw,msg", [
    ({"straggler_fraction": 1.5}, "system.straggler_fraction must be a number in [0, 1]; "
                                  "got 1.5."),
    ({"dropout_rate": 1}, "system.dropout_rate must be a number in [0, 1); got 1."),
    ({"levels": 0}, "system.levels must be an int >= 1; got 0."),
    ({"drop_stragglers": 1}, "system.drop_stragglers must be a bool; got 1."),
])
def test_system_refusals_say_what_is_allowed(kw, msg):
  with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
    fp.System(**kw)


def test_a_slot_drops_out_iff_its_uniform_is_below_the_rate():
  """Strictly below (so that P(dropped) = dropout_rate): a slot whose u equals it stays."""
  key = jax.random.key(1)
  u = np.asarray(jax.random.uniform(jax.random.split(key, 3)[2], (8,)))
  rate = float(np.sort(u)[2])              # exactly 2 slots lie below it
  dropped = _system.draw(key, 8, fp.System(dropout_rate=rate)).dropped
  np.testing.assert_array_equal(dropped, u < rate)
  assert int(np.sum(dropped)) == 2


def test_a_gathered_cohorts_rows_are_its_clients_rows_state_and_ids():
  window = jnp.asarray([3, 0, 4], jnp.int32)          # row r holds client window[r]
  x = 10.0 * window[:, None] + jnp.arange(2.0)[None, :]
  y = jnp.asarray([[1, 1], [2, 0], [0, 2]], jnp.int32)
  data = fp.FederatedData(x=x, y=y, num_examples=jnp.asarray([1, 2, 3, 4, 5], jnp.int32),
                          num_classes=3, min_examples=1, window=window)
  ids = jnp.asarray([4, 3], jnp.int32)
  got = _source.cohort_source(data, None, None).rows(ids)
  np.testing.assert_array_equal(got.x, x[jnp.asarray([2, 0])])
  np.testing.assert_array_equal(got.y, y[jnp.asarray([2, 0])])
  np.testing.assert_array_equal(got.num_examples, [5, 4])
  np.testing.assert_array_equal(got.id, ids)
  assert got.state is None
  slots = _source.cohort_source(data, jnp.asarray([30.0, 0.0, 40.0]), None, windowed=True)
  np.testing.assert_array_equal(slots.rows(ids).state, [40.0, 30.0])
  # Dealt: the rows are stored in the order the round asks for them, and used as they are.
  deal = jnp.asarray([1, 2, 0], jnp.int32)
  dealt = dataclasses.replace(data, x=x[deal], y=y[deal], deal=deal)
  got = _source.cohort_source(dealt, None, None).rows(window[deal])
  np.testing.assert_array_equal(got.x, x[deal])
  np.testing.assert_array_equal(got.y, y[deal])
  np.testing.assert_array_equal(got.id, window[deal])
