"""A population on the host: the store format, and rounds fed from it one cohort at a time.

A round over a host store's gathered cohort must train the same clients on the
same batches with the same keys as a round over the whole population on device.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest
from test_engine import run
from test_execution import assert_same_rounds

import fedjax_pers as fp
from fedjax_pers.data._store import HEADER, OFFSETS, X, Y

SIZES = [3, 41, 7, 12, 26, 5, 9, 60, 2, 15, 33, 8]
LR = fp.models.logistic_regression((5,), 3)


def clients(sizes=SIZES, seed=0):
  rs = np.random.RandomState(seed)
  xs = [rs.normal(size=(n, 5)).astype(np.float32) for n in sizes]
  ys = [rs.randint(0, 3, n) for n in sizes]
  return xs, ys


@pytest.fixture
def stored(tmp_path):
  xs, ys = clients()
  path = fp.data.save_store(str(tmp_path / "pop"), (xs, ys), num_classes=3, chunk=5)
  return fp.data.open_store(path), fp.FederatedData.from_clients(xs, ys, num_classes=3)


def test_store_reads_back_every_client_and_as_device_data(stored):
  store, device = stored
  xs, ys = clients()
  assert store.num_clients == len(SIZES) and list(store.sizes) == SIZES
  for c in range(len(SIZES)):
    x, y = store.client(c)
    np.testing.assert_array_equal(x, xs[c])
    np.testing.assert_array_equal(y, ys[c])
  again = store.to_federated_data()
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(device)):
    np.testing.assert_array_equal(a, b)
  gx, gy = store.gather(np.array([7, 2, 8]))
  np.testing.assert_array_equal(gx, np.asarray(device.x)[[7, 2, 8]])
  np.testing.assert_array_equal(gy, np.asarray(device.y)[[7, 2, 8]])


def test_chunk_by_chunk_writer_writes_the_same_files(tmp_path, stored):
  store, _ = stored
  xs, ys = clients()
  with fp.data.StoreWriter(str(tmp_path / "w"), (5,), 3) as w:
    for a in (0, 1, 4, 9):   # uneven chunks, one client at a time at the start
      b = {0: 1, 1: 4, 4: 9, 9: 12}[a]
      w.add(xs[a:b], ys[a:b])
  for name in (X, Y, OFFSETS):
    with open(tmp_path / "w" / name, "rb") as f, open(os.path.join(store.path, name), "rb") as g:
      assert f.read() == g.read(), name


def build(name, execution=None, k=5):
  sgd, one, work = optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=2)
  kw = dict(clients_per_round=k, execution=execution)
  if name == "fedavg":
    return fp.algorithms.fedavg(LR, sgd, one, work, **kw)
  if name == "q_ffl":   # a dynamic weighting of the clients' losses
    return fp.algorithms.fedavg(LR, sgd, one, work, weighting=fp.aggregation.q_ffl(1.0, 10.0),
                                **kw)
  return fp.algorithms.ditto(LR, sgd, one, work, lam=0.5, **kw)


def host_rounds(alg, store, device, n=3, seed=1, prefetch=True, sharding=None, mesh=None,
                feeds=None):
  state = alg.init(jax.random.key(seed), device)
  feed = fp.data.CohortFeed(alg, store, state.rng, prefetch=prefetch, sharding=sharding,
                            mesh=mesh)
  if feeds is not None:
    feeds.append(feed)
  traces = []
  step = jax.jit(lambda s, d: (traces.append(1), alg.round(s, d))[1])
  metrics = []
  for _ in range(n):
    state, m = step(state, next(feed))
    metrics.append(m)
  feed.close()
  assert len(traces) == 1   # one compile: every cohort has the same shapes
  assert len({tuple(np.asarray(m.clients)) for m in metrics}) == n
  return state, metrics


@pytest.mark.parametrize("name", ["fedavg", "q_ffl", "ditto"])
def test_host_store_rounds_equal_device_rounds(stored, name):
  store, device = stored
  ref = run(build(name), device, 3, seed=1)
  got = host_rounds(build(name), store, device)
  assert_same_rounds(ref, got)
  # Prefetching only moves the gather to a thread: the same arrays, bit for bit.
  plain = host_rounds(build(name), store, device, prefetch=False)
  for a, b in zip(jax.tree.leaves((got[0].params, got[0].client_states, got[1])),
                  jax.tree.leaves((plain[0].params, plain[0].client_states, plain[1]))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["ditto", "fedper", "apfl"])
def test_per_client_state_on_the_host_equals_the_device_rounds(stored, name):
  """Ditto's v_k, FedPer's heads, APFL's (v_k, α_k) kept on the host: each round gets
  its cohort's states in a ClientWindow and writes them back; after 3 rounds every
  client's state and the global model equal the rounds with every state on device."""
  store, device = stored
  sgd, one, work = optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(4, epochs=2)
  make = {"ditto": lambda: fp.algorithms.ditto(LR, sgd, one, work, lam=0.5,
                                               clients_per_round=5),
          "fedper": lambda: fp.algorithms.fedper(LR, sgd, one, work, clients_per_round=5,
                                                 personal=lambda path: "bias" in path),
          "apfl": lambda: fp.algorithms.apfl(LR, sgd, one, work, alpha=0.3, alpha_lr=0.05,
                                             clients_per_round=5)}[name]
  ref = run(make(), device, 3, seed=1)
  alg = make()
  state = alg.init(jax.random.key(1), store.cohort_data(np.arange(5)))
  assert isinstance(state.client_states, fp.core.ClientWindow)
  states = fp.data.HostClientStates(state.client_states, store.num_clients)
  feed = fp.data.CohortFeed(alg, store, state.rng)
  traces = []
  step = jax.jit(lambda s, d: (traces.append(1), alg.round(s, d))[1])
  snaps = []
  for _ in range(3):
    data = next(feed)
    state, m = step(states.load(state, data), data)
    states.save(state, data)
    snaps.append(states.snapshot())
  feed.close()
  assert len(traces) == 1
  np.testing.assert_allclose(m.weights, ref[1][-1].weights, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref[0].params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  every = states.gather(np.arange(store.num_clients))
  for a, b in zip(jax.tree.leaves(every), jax.tree.leaves(ref[0].client_states)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  sampled = np.unique(np.concatenate([np.asarray(r.clients) for r in ref[1]]))
  np.testing.assert_array_equal(np.flatnonzero(states.written), sampled)
  # A snapshot restores exactly the states of its round (clients written later revert).
  states.restore(snaps[0])
  assert states.written.sum() == 5
  again = states.gather(np.arange(store.num_clients))
  states.restore(snaps[2])
  for a, b in zip(jax.tree.leaves(states.gather(np.arange(store.num_clients))),
                  jax.tree.leaves(every)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                      jax.tree.leaves(every)))


def test_host_store_rounds_sharded_over_four_devices(stored):
  store, device = stored
  mesh = fp.distributed.client_mesh(4)
  ex = fp.Execution(strategy="lanes", mesh=mesh)
  got = host_rounds(build("fedavg", ex, k=6), store, device,
                    sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert_same_rounds(run(build("fedavg", k=6), device, 3, seed=1), got, atol=1e-5)


@pytest.mark.parametrize("name", ["fedavg", "ditto"])
def test_dealt_cohorts_split_over_the_mesh_equal_the_device_rounds(stored, name):
  """CohortFeed(mesh=): each cohort of 6 is padded to 8, dealt as the round deals it and
  split over the 4 devices (2 rows each); the rounds equal those on the device."""
  store, device = stored
  mesh = fp.distributed.client_mesh(4)
  ex = fp.Execution(strategy="lanes", mesh=mesh)
  alg = build(name, ex, k=6)
  feeds = []
  got = host_rounds(alg, store, device, prefetch=False, mesh=mesh, feeds=feeds)
  assert_same_rounds(run(build(name, k=6), device, 3, seed=1), got, atol=1e-5)
  assert feeds[0].rows_gathered == 3 * 8
  state = alg.init(jax.random.key(1), device)
  feed = fp.data.CohortFeed(alg, store, state.rng, prefetch=False, mesh=mesh)
  d = next(feed)
  assert d.deal.shape == (8,) and sorted(np.asarray(d.deal)) == list(range(8))
  assert [s.data.shape[0] for s in d.x.addressable_shards] == [2, 2, 2, 2]
  padded = np.concatenate([np.asarray(d.window), np.asarray(d.window)[:2]])
  for s in d.x.addressable_shards:   # each device holds the rows of its dealt clients
    rows = padded[np.asarray(d.deal)][s.index[0]]
    np.testing.assert_array_equal(s.data, store.gather(rows)[0])
  feed.close()


def test_host_balance_is_the_rounds_balance():
  rng = np.random.default_rng(0)
  for k, dev in ((8, 4), (12, 3), (6, 2), (16, 8)):
    counts = rng.integers(0, 5, k)   # ties: the stable order decides
    want = np.asarray(fp.core._cohort.balance(jax.numpy.asarray(counts, np.int32), dev))
    np.testing.assert_array_equal(fp.core._cohort.balance_on_host(counts, dev), want)


def test_a_deal_needs_a_mesh_round(stored):
  store, device = stored
  mesh = fp.distributed.client_mesh(4)
  dealt = fp.data.CohortFeed(build("fedavg", fp.Execution(mesh=mesh), k=6), store,
                             jax.random.key(0), prefetch=False, mesh=mesh)
  data = next(dealt)
  dealt.close()
  alg = build("fedavg", k=6)   # one device: no deal
  with pytest.raises(ValueError, match="data.deal needs .* 6 padded clients"):
    jax.jit(alg.round)(alg.init(jax.random.key(1), device), data)
  with pytest.raises(ValueError, match="mesh .the round's. or sharding, not both"):
    fp.data.CohortFeed(alg, store, jax.random.key(0), mesh=mesh, sharding=mesh)


@pytest.mark.parametrize("clients_", [None, np.array([9, 0, 4])])
def test_streamed_store_evaluation_equals_device_evaluation(stored, clients_):
  store, device = stored
  params = LR.init(jax.random.key(0))
  want = fp.core.evaluate(LR, params, device)
  got = fp.data.evaluate_store(LR, params, store, clients=clients_, chunk=5)
  ids = slice(None) if clients_ is None else clients_
  np.testing.assert_allclose(got.loss, np.asarray(want.loss)[ids], rtol=1e-6)
  np.testing.assert_allclose(got.accuracy, np.asarray(want.accuracy)[ids], rtol=1e-6)
  np.testing.assert_array_equal(got.num_examples, np.asarray(want.num_examples)[ids])


def corrupt(path, what):
  if what == "missing":
    return path + "-nowhere", "does not exist"
  if what == "unsealed":
    os.remove(os.path.join(path, HEADER))
    return path, "never sealed"
  if what == "truncated":
    with open(os.path.join(path, X), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(path, X)) - 4)
    return path, r"x.bin holds \d+ bytes"
  if what == "header":
    with open(os.path.join(path, HEADER)) as f:
      h = json.load(f)
    h["num_examples"] += 1
    with open(os.path.join(path, HEADER), "w") as f:
      json.dump(h, f)
    return path, "x.bin holds"
  if what == "offsets":
    o = np.fromfile(os.path.join(path, OFFSETS), "<i8")
    o[3], o[4] = o[4], o[3]
    o.tofile(os.path.join(path, OFFSETS))
    return path, "offsets.bin must rise strictly"
  raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing", "unsealed", "truncated", "header", "offsets"])
def test_bad_store_is_refused_naming_the_path(stored, what):
  store, _ = stored
  path, match = corrupt(store.path, what)
  with pytest.raises(ValueError, match=match) as e:
    fp.data.open_store(path)
  assert repr(path) in str(e.value)


def test_bad_input_to_writer_feed_and_model_is_refused(tmp_path, stored):
  store, device = stored
  with pytest.raises(ValueError, match="already holds a store"):
    fp.data.StoreWriter(store.path, (5,), 3)
  with pytest.raises(ValueError, match=r"Client 0: expected x \[n, \*\(5,\)\]"):
    with fp.data.StoreWriter(str(tmp_path / "b"), (5,), 3) as w:
      w.add([np.zeros((2, 4))], [np.zeros(2, int)])
  assert not os.path.exists(tmp_path / "b" / HEADER)   # a failed writer leaves no header
  with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
    fp.data.StoreWriter(str(tmp_path / "c"), (5,), 3).add([np.zeros((2, 5))], [np.array([0, 3])])
  wide = fp.models.logistic_regression((7,), 3)
  with pytest.raises(ValueError, match=r"features of shape \(5,\).*do not fit the model"):
    fp.data.check_model(store, wide, wide.init(jax.random.key(0)))
  few = fp.models.logistic_regression((5,), 2)
  with pytest.raises(ValueError, match=r"labels lie in \[0, 3\) but the model gives 2"):
    fp.data.check_model(store, few, few.init(jax.random.key(0)))
  fp.data.check_model(store, LR, LR.init(jax.random.key(0)))
  alg = build("fedavg")
  state = alg.init(jax.random.key(0), device)
  feed = fp.data.CohortFeed(build("fedavg", k=4), store, state.rng, prefetch=False)
  with pytest.raises(ValueError, match=r"clients_per_round=5 needs \(5,\)"):
    alg.round(state, next(feed))
  with pytest.raises(ValueError, match="gathered cohort"):
    fp.core.evaluate(LR, state.params, next(feed))
