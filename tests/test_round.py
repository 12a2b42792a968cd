"""The round's parts (`core._round`) one at a time: the population's steps, the cohort's plan,
sampler and deal, the first state, and the round's own bookkeeping (windows, per-client
states, metrics) against sums by hand."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import logreg, small_data

import fedjax_pers as fp
from fedjax_pers.core._aggregate import Aggregator
from fedjax_pers.core._batching import width_classes
from fedjax_pers.core._client import ClientOutput
from fedjax_pers.core._cohort import balance_on_host
from fedjax_pers.core._execution import plan as plan_of_execution
from fedjax_pers.core._program import LocalProgram, Steps
from fedjax_pers.core._round import (
  ClientWindow,
  FederatedAlgorithm,
  ServerState,
  assemble,
  cohort_dealer,
  cohort_plan,
  cohort_sampler,
  cohort_state_change,
  make_init,
  make_round,
  make_sampler,
  place,
  population_counts,
  served,
  zero_client_states,
)
from fedjax_pers.core._sampling import poisson_cohort, sample_clients
from fedjax_pers.core._sgd import fedavg_program

WORK = fp.LocalWork(2, epochs=1)


def whole(message: str) -> str:
  """A `pytest.raises` pattern matching exactly `message`."""
  return f"^{re.escape(message)}$"


def _fedavg(data, work=WORK):
  return fedavg_program(logreg(), optax.sgd(0.1), work, num_classes=3,
                        max_examples=data.max_examples, min_examples=data.min_examples)


def test_the_populations_steps_are_the_programs_on_the_host():
  data = small_data(sizes=[3, 8, 5, 1])
  counts = population_counts(_fedavg(data), data)
  assert isinstance(counts, np.ndarray)
  np.testing.assert_array_equal(counts, [2, 4, 3, 1])          # ⌈n / 2⌉
  fixed = population_counts(_fedavg(data, fp.LocalWork(2, steps=5)), data)
  np.testing.assert_array_equal(fixed, [5, 5, 5, 5])
  by_id = LocalProgram(None, None, None, lambda c: c.num_examples * 0 + 2 * c.id)
  np.testing.assert_array_equal(population_counts(by_id, data), [0, 2, 4, 6])
  # `num_steps` sees what a round's clients hold: int32 sizes and ids.
  dtypes = LocalProgram(None, None, None, lambda c: np.array(
      [c.num_examples.dtype == np.int32, c.id.dtype == np.int32]).all() + 0 * c.id)
  np.testing.assert_array_equal(population_counts(dtypes, data), [1, 1, 1, 1])
  bare = dataclasses.replace(data, host_sizes=None)
  assert population_counts(_fedavg(data), bare) is None


def test_the_cohorts_plan_pads_the_cohort_caps_the_program_and_counts_width_classes():
  data = small_data(sizes=[3, 80, 5, 100, 7])
  params = logreg().init(jax.random.key(0))
  execution = fp.Execution(strategy="auto", mesh=fp.distributed.client_mesh(2))
  got = cohort_plan(_fedavg, execution, 3)(params, data)
  want = plan_of_execution(execution, params, population_counts(_fedavg(data), data), 4,
                           size_classes=len(width_classes(100, 3)))
  assert got == want and len(width_classes(100, 3)) == 2 and got.plans_one_by_one
  capped = data.with_cap(4)
  got = cohort_plan(_fedavg, fp.Execution(strategy="lanes"), 5)(params, capped)
  want = plan_of_execution(fp.Execution(strategy="lanes"), params,
                           np.array([2, 2, 2, 2, 2]), 5, size_classes=1)
  assert got == want and got.lanes == 5            # every client: ⌈min(n, 4) / 2⌉ = 2 steps
  assert cohort_plan(_fedavg, None, 5)(params, data) == plan_of_execution(
      fp.Execution(), params, population_counts(_fedavg(data), data), 5, size_classes=2)
  # 5 clients on 4 devices pad to 8, 2 a device: both of the 2 lanes asked for.
  four = fp.Execution(strategy="lanes", lanes=2, mesh=fp.distributed.client_mesh(4))
  assert cohort_plan(_fedavg, four, 5)(params, data).lanes == 2
  # The params' size decides `auto` on CPU (see test_auto_plans_the_round_by_its_models_size).
  eight = small_data(sizes=[8, 8, 8, 6, 4, 4, 2, 2])
  big = fp.models.mlp((5,), 3, hidden=(4000,)).init(jax.random.key(0))
  auto = cohort_plan(_fedavg, fp.Execution(strategy="auto"), 8)
  assert (auto(params, eight).strategy, auto(big, eight).strategy) == ("lanes", "scan")


def test_the_sampler_splits_the_key_and_draws_by_the_execution():
  rng = jax.random.key(3)
  nxt, k_sample, k_clients = jax.random.split(rng, 3)
  key_data = jax.random.key_data
  ids, keys = make_sampler(3)(rng, 10)
  np.testing.assert_array_equal(ids, sample_clients(k_sample, 10, 3))
  for got, want in zip(keys, (nxt, k_sample, k_clients)):
    np.testing.assert_array_equal(key_data(got), key_data(want))
  probs = np.array([0.0, 0.0, 0.5, 0.0, 0.5, 0.0], np.float32)
  ids, _ = make_sampler(2, fp.Execution(sampling_probs=probs))(rng, 6)
  np.testing.assert_array_equal(np.sort(ids), [2, 4])
  np.testing.assert_array_equal(ids, sample_clients(k_sample, 6, 2, probs=jnp.asarray(probs)))
  with pytest.raises(ValueError, match=r"sampling probabilities must have shape \(num_clients,\)"):
    make_sampler(2, fp.Execution(sampling_probs=probs))(rng, 7)
  ids, _ = make_sampler(4, fp.Execution(poisson_rate=0.3))(rng, 10)
  np.testing.assert_array_equal(ids, poisson_cohort(k_sample, 10, 4, 0.3)[0])
  ids, nxt_rng = cohort_sampler(3)(rng, 10)
  np.testing.assert_array_equal(ids, sample_clients(k_sample, 10, 3))
  np.testing.assert_array_equal(key_data(nxt_rng), key_data(nxt))


def test_the_dealer_balances_the_padded_cohort_on_the_host():
  data = small_data(sizes=[3, 8, 5, 1, 9, 2])
  counts = population_counts(_fedavg(data), data)          # [2, 4, 3, 1, 5, 1]
  assert cohort_dealer(_fedavg, None)(data) is None
  assert cohort_dealer(_fedavg, fp.Execution(mesh=fp.distributed.client_mesh(1)))(data) is None
  two = fp.distributed.client_mesh(2)
  assert cohort_dealer(_fedavg, fp.Execution(mesh=two, differentiable=True))(data) is None
  deal = cohort_dealer(_fedavg, fp.Execution(mesh=two))(data)
  padded, perm = deal(np.array([4, 0, 1]))
  np.testing.assert_array_equal(padded, [4, 0, 1, 4])
  np.testing.assert_array_equal(perm, balance_on_host(np.array([5, 2, 4, 0]), 2))
  np.testing.assert_array_equal(perm, [0, 3, 2, 1])        # 5 | 4, 2 | 0 ... as dealt
  padded, perm = cohort_dealer(_fedavg, fp.Execution(mesh=two))(data.with_cap(2))(
      np.array([4, 0]))
  np.testing.assert_array_equal(perm, balance_on_host(np.array([1, 1]), 2))
  bare = dataclasses.replace(data, host_sizes=None)
  _, perm = cohort_dealer(_fedavg, fp.Execution(mesh=two))(bare)(np.array([4, 0, 1, 2]))
  np.testing.assert_array_equal(perm, [0, 1, 2, 3])        # no sizes: all equal, in order
  assert counts.tolist() == [2, 4, 3, 1, 5, 1]


def test_the_first_state():
  data = small_data(num_clients=5)
  model, server = logreg(), optax.adam(0.1)
  # The weight state, the client states and the algorithm's state are built from the
  # population's size and the first params.
  weighting = Aggregator(init=lambda n: jnp.zeros(n), apply=None)
  states = lambda p, n: {"s": jnp.zeros((n, 2)) + p["Dense_0"]["bias"][None, :2]}
  init = make_init(model, server, weighting, clients_per_round=2, client_states=states,
                   algorithm=lambda p: p["Dense_0"]["bias"].sum() + 7)
  s = init(jax.random.key(4), data)
  k_model, k_rounds = jax.random.split(jax.random.key(4))
  want = model.init(k_model)
  for got, w in zip(jax.tree.leaves(s.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, w)
  np.testing.assert_array_equal(jax.random.key_data(s.rng), jax.random.key_data(k_rounds))
  assert jax.tree.structure(s.opt_state) == jax.tree.structure(server.init(want))
  bias = np.asarray(want["Dense_0"]["bias"])
  np.testing.assert_array_equal(s.client_states["s"], np.zeros((5, 2)) + bias[:2])
  assert float(s.algorithm) == pytest.approx(bias.sum() + 7)
  assert int(s.round) == 0 and s.round.dtype == jnp.int32
  np.testing.assert_array_equal(s.weight_state, np.zeros(5))
  window = dataclasses.replace(data, window=jnp.int32([3, 1]))
  s = init(jax.random.key(4), window)
  assert isinstance(s.client_states, ClientWindow)
  np.testing.assert_array_equal(s.client_states.states["s"], np.zeros((2, 2)) + bias[:2])
  bare = make_init(model, server, weighting, clients_per_round=2)(jax.random.key(4), data)
  assert bare.client_states == () and bare.algorithm == ()
  with pytest.raises(ValueError, match="clients_per_round"):
    make_init(model, server, weighting, clients_per_round=6)(jax.random.key(4), data)
  mesh = fp.distributed.client_mesh(4)
  placed = make_init(model, server, weighting, clients_per_round=2,
                     execution=fp.Execution(mesh=mesh))(jax.random.key(4), data)
  assert placed.params["Dense_0"]["kernel"].sharding.mesh == mesh


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_a_round_needs_a_positive_int_cohort(k):
  with pytest.raises(ValueError, match=whole(f"clients_per_round must be a positive int; "
                                             f"got {k!r}.")):
    make_round(_fedavg, fp.aggregation.num_examples(), optax.sgd(1.0), clients_per_round=k)


def _one_step(finish):
  """A program of one step (on the first row, if real) that ends with `finish`."""
  idx = jnp.zeros((1, 1), jnp.int32)
  return LocalProgram(lambda p, c, k: (0, Steps(idx, idx < c.num_examples)),
                      lambda p, c, b: c + 1, finish, lambda c: 1)


def _toy(data):
  """Δ = (client id + 1) on every parameter, train loss = id, one step; client 2's
  update is not finite; a personal state s ← s + id + 1."""
  def finish(params, client, c):
    d = (client.id + 1).astype(jnp.float32)
    d = jnp.where(client.id == 2, jnp.nan, d)
    delta = jax.tree.map(lambda p: jnp.full_like(p, d), params)
    return ClientOutput(delta, client.num_examples, client.id.astype(jnp.float32), 0,
                        jnp.zeros(3), jnp.isfinite(d),
                        client_state=None if client.state is None else client.state + d)

  return _one_step(finish)


def _toy_round(k, states=False, **kw):
  agg = fp.aggregation.num_examples()
  round_fn = make_round(_toy, agg, optax.sgd(1.0), clients_per_round=k, **kw)
  init = make_init(logreg(), optax.sgd(1.0), agg, clients_per_round=k,
                   client_states=(lambda p, n: jnp.zeros(n)) if states else None)
  return init, round_fn


def test_the_rounds_metrics_and_states_by_hand():
  """Cohort (4, 2, 0) of sizes (6, 4, 3): client 2 is not finite, so it weighs 0, counts
  once in num_nonfinite and keeps its state; the loss is the finite clients' mean by size."""
  data = small_data(sizes=[3, 5, 4, 7, 6])
  init, round_fn = _toy_round(3, states=True, cohort=jnp.int32([4, 2, 0]))
  s0 = init(jax.random.key(0), data)
  s0 = s0._replace(client_states=jnp.float32([10, 11, 12, 13, 14]))
  s1, m = jax.jit(round_fn)(s0, data)
  np.testing.assert_array_equal(m.clients, [4, 2, 0])
  np.testing.assert_allclose(m.weights, [6 / 9, 0, 3 / 9], rtol=1e-6)
  assert int(m.num_nonfinite) == 1 and m.num_nonfinite.dtype == jnp.int32
  np.testing.assert_allclose(float(m.train_loss), (6 * 4 + 3 * 0) / 9, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(m.client_train_loss)[[0, 2]], [4, 0])
  np.testing.assert_array_equal(s1.client_states, [11, 11, 12, 13, 19])
  delta = (6 * 5 + 3 * 1) / 9
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"], s0.params["Dense_0"]["bias"] + delta,
                             rtol=1e-6)
  assert int(s1.round) == 1 and int(m.real_steps) == 3 and m.present.all()
  assert m.stragglers.dtype == m.present.dtype == bool and not np.any(m.stragglers)
  np.testing.assert_array_equal(jax.random.key_data(s1.rng),
                                jax.random.key_data(jax.random.split(s0.rng, 3)[0]))
  # Without per-client states the program sees `client.state = None`, and the state keeps
  # its empty `()`.
  init, round_fn = _toy_round(3, cohort=jnp.int32([4, 2, 0]))
  s0 = init(jax.random.key(0), data)._replace(algorithm={"any": jnp.float32(7)})
  s1, _ = round_fn(s0, data)
  assert s1.client_states == () and jax.tree.structure(s1) == jax.tree.structure(s0)
  assert float(s1.algorithm["any"]) == 7    # an algorithm's own state passes through
  # States of any shape: rows 4 and 0 take +5 and +1; row 2 (not finite) keeps its own.
  s0 = s0._replace(client_states=jnp.arange(15, dtype=jnp.float32).reshape(5, 3))
  s1, _ = round_fn(s0, data)
  np.testing.assert_array_equal(s1.client_states, np.arange(15).reshape(5, 3)
                                + np.array([1, 0, 0, 0, 5])[:, None])


def test_a_round_of_one_example_averages_its_loss_over_it():
  """One client of one example: the round's loss is that client's, Σ n ℓ / max(Σ n, 1)."""
  data = small_data(sizes=[1, 2])
  _, _, m = _seen_round(1, data, cohort=jnp.int32([0]))
  np.testing.assert_allclose(m.train_loss, m.client_train_loss[0], rtol=1e-6)
  assert float(m.client_train_loss[0]) == pytest.approx(float(np.asarray(data.x)[0, 0].sum()))


def test_the_server_optimizer_sees_the_global_params():
  """Server `add_decayed_weights(0.5)` then SGD(1): w₁ = w₀ + Δ − 0.5 w₀, Δ = 61 / 13."""
  data = small_data(sizes=[3, 5, 4, 7, 6])
  agg = fp.aggregation.num_examples()
  server = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(1.0))
  round_fn = make_round(_seen, agg, server, clients_per_round=3, cohort=jnp.int32([4, 2, 0]))
  s0 = make_init(logreg(), server, agg, clients_per_round=3)(jax.random.key(0), data)
  s1, _ = round_fn(s0, data)
  w0 = np.asarray(s0.params["Dense_0"]["kernel"])
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], 0.5 * w0 + 61 / 13, rtol=1e-5)


def test_a_windowed_round_takes_its_cohort_from_the_window_and_writes_its_slots():
  data = small_data(sizes=[3, 5, 4, 7, 6])
  window = jnp.int32([1, 2, 4])
  gathered = dataclasses.replace(data, x=data.x[window], y=data.y[window], window=window)
  init, round_fn = _toy_round(3, states=True)
  s0 = init(jax.random.key(0), gathered)
  s0 = s0._replace(client_states=ClientWindow(jnp.float32([1, 2, 3])))
  s1, m = round_fn(s0, gathered)
  np.testing.assert_array_equal(m.clients, [1, 2, 4])
  assert isinstance(s1.client_states, ClientWindow)
  np.testing.assert_array_equal(s1.client_states.states, [3, 2, 8])   # slot 1 not finite
  with pytest.raises(ValueError, match=whole("data.window holds (2,) client ids; a round of "
                                             "clients_per_round=3 needs (3,).")):
    round_fn(s0, dataclasses.replace(gathered, window=jnp.int32([1, 2])))
  with pytest.raises(ValueError, match=whole(
      "state.client_states is a ClientWindow (one cohort's states); the round needs that "
      "cohort's gathered data (data.window set).")):
    round_fn(s0, data)
  with pytest.raises(ValueError, match=whole(
      "data.deal needs a window and x rows for the 3 padded clients of the round; got "
      "window None, x rows 3.")):
    round_fn(s0, dataclasses.replace(gathered, deal=jnp.arange(3), window=None))
  # A window with a deal but rows for 2 clients, not 3 (3 examples each: the check reads
  # the rows, not the next axis).
  with pytest.raises(ValueError, match=whole(
      "data.deal needs a window and x rows for the 3 padded clients of the round; got "
      "window (3,), x rows 2.")):
    round_fn(s0, dataclasses.replace(gathered, deal=jnp.arange(3), x=gathered.x[:2, :3]))


def _seen(data):
  """Δ = the examples the client trains on (`num_examples` as the program sees it) on
  every parameter, reporting the client's `num_examples`, and as its train loss the sum
  of the features of the rows it sees; one step."""
  def finish(params, client, c):
    d = client.num_examples.astype(jnp.float32)
    rows = jnp.arange(client.x.shape[0]) < client.num_examples
    seen = jnp.sum(jnp.where(rows, client.x.sum(-1), 0.0))
    return ClientOutput(jax.tree.map(lambda p: jnp.full_like(p, d), params),
                        client.num_examples, seen, 0, jnp.zeros(3), jnp.bool_(True))

  return _one_step(finish)


def _seen_round(k, data, aggregator=None, **kw):
  agg = aggregator or fp.aggregation.num_examples()
  round_fn = make_round(_seen, agg, optax.sgd(1.0), clients_per_round=k, **kw)
  s0 = make_init(logreg(), optax.sgd(1.0), agg, clients_per_round=k)(jax.random.key(0), data)
  s1, m = round_fn(s0, data)
  return s0, s1, m


def _feature_sums(x, n):
  return np.array([x[i, :n[i]].sum() for i in range(len(n))], np.float32)


def test_a_capped_round_trains_on_the_cap_and_weighs_the_true_sizes():
  """Cohort (4, 2, 0) of sizes (6, 4, 3) under cap 4: the clients see (4, 4, 3) examples,
  the rows `data.cohort` gives with the round's key `fold_in(k_sample, 1)`, and the
  weights stay (6, 4, 3) / 13, so Δ = (6·4 + 4·4 + 3·3) / 13 = 49 / 13."""
  data = small_data(sizes=[3, 5, 4, 7, 6]).with_cap(4)
  ids = jnp.int32([4, 2, 0])
  s0, s1, m = _seen_round(3, data, cohort=ids)
  np.testing.assert_allclose(m.weights, np.array([6, 4, 3]) / 13, rtol=1e-6)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"],
                             s0.params["Dense_0"]["bias"] + 49 / 13, rtol=1e-6)
  _, k_sample, _ = jax.random.split(s0.rng, 3)
  x, _, n = data.cohort(ids, jax.random.fold_in(k_sample, 1))
  np.testing.assert_array_equal(n, [6, 4, 3])                # the true sizes, cap 4 rows
  seen = np.minimum(n, 4)
  np.testing.assert_allclose(m.client_train_loss, _feature_sums(np.asarray(x), seen), rtol=1e-6)
  x_other, _, _ = data.cohort(ids, jax.random.fold_in(k_sample, 2))
  assert not np.allclose(_feature_sums(np.asarray(x_other), seen), m.client_train_loss)


def test_a_fixed_cohort_of_every_client_runs_each_on_its_own_rows():
  """`cohort=(4, 2, 0, 1, 3)` of all 5 clients: slot j trains on client cohort[j]'s rows
  (only a sampled cohort of every client comes in order and skips the gather)."""
  data = small_data(sizes=[3, 5, 4, 7, 6])
  ids = np.array([4, 2, 0, 1, 3])
  _, _, m = _seen_round(5, data, cohort=jnp.int32(ids))
  x, n = np.asarray(data.x), np.asarray(data.num_examples)
  np.testing.assert_allclose(m.client_train_loss, _feature_sums(x[ids], n[ids]), rtol=1e-6)


def test_the_aggregator_streams_by_its_score_or_sees_the_cohorts_ids():
  """With a `score`, a scan cohort streams Σ u_i Δ_i / Σ u_i and never calls `apply`
  (u = n: Δ = (6·6 + 4·4 + 3·3) / 13 = 61 / 13); without one, `apply` gets the outputs
  with the cohort's client ids, and the global params."""
  data = small_data(sizes=[3, 5, 4, 7, 6])
  ids = jnp.int32([4, 2, 0])

  def never(outputs, state, params):
    raise AssertionError("apply called although the aggregator has a score")

  streamed = Aggregator(init=lambda n: (), apply=never,
                        score=lambda out: out.num_examples.astype(jnp.float32))
  s0, s1, m = _seen_round(3, data, streamed, cohort=ids,
                          execution=fp.Execution(strategy="scan"))
  np.testing.assert_allclose(m.weights, np.array([6, 4, 3]) / 13, rtol=1e-6)
  np.testing.assert_allclose(s1.params["Dense_0"]["bias"],
                             s0.params["Dense_0"]["bias"] + 61 / 13, rtol=1e-6)

  def first(outputs, state, params):   # keeps what it was given as its state
    return (jax.tree.map(lambda d: d[0], outputs.delta), jnp.float32([1, 0, 0]),
            (outputs.client_id, params))

  seeing = Aggregator(init=lambda n: (jnp.zeros(3, jnp.int32), None), apply=first)
  s0, s1, _ = _seen_round(3, data, seeing, cohort=ids)
  ids_seen, params_seen = s1.weight_state
  np.testing.assert_array_equal(ids_seen, [4, 2, 0])
  jax.tree.map(np.testing.assert_array_equal, params_seen, s0.params)   # same tree too


def test_the_state_helpers_by_hand():
  params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones((3,))}
  zero = zero_client_states(params, 4)
  assert (zero["w"].shape, zero["w"].dtype, zero["b"].shape) == ((4, 2, 3), jnp.bfloat16, (4, 3))
  assert not any(bool(jnp.any(a)) for a in jax.tree.leaves(zero))
  before = np.arange(12, dtype=np.float32).reshape(4, 3)
  after = before + np.float32([[1], [10], [100], [1000]])
  state = lambda s: ServerState(params, (), (), s, jnp.int32(0), jax.random.key(0), ())
  change = cohort_state_change(state({"c": before}), state({"c": after}), jnp.int32([3, 0]))
  np.testing.assert_array_equal(change["c"], [1001, 1001, 1001])     # clients 3 and 0 only
  window = lambda s: state(ClientWindow({"c": s}))
  change = cohort_state_change(window(before[:2]), window(after[:2]), jnp.int32([7, 9]))
  np.testing.assert_array_equal(change["c"], [11, 11, 11])           # every slot of it
  alg = FederatedAlgorithm(None, None)
  assert served(alg, state(())) is params
  assert served(alg._replace(serve=lambda s: s.rng), state(())).dtype == jax.random.key(0).dtype
  s = state(())
  assert place(s, None) is s and place(s, fp.Execution()) is s
  mesh = fp.distributed.client_mesh(2)
  placed = place(s, fp.Execution(mesh=mesh)).params["w"]
  assert placed.sharding.mesh == mesh and placed.sharding.is_fully_replicated


def test_assemble_builds_the_round_and_its_helpers_from_one_program():
  data = small_data(sizes=[3, 5, 4, 7, 6])
  agg, server = fp.aggregation.num_examples(), optax.sgd(1.0)
  ex = fp.Execution(strategy="lanes", mesh=fp.distributed.client_mesh(2))
  personal = lambda s: s.client_states
  alg = assemble(logreg(), _fedavg, agg, server, clients_per_round=4, execution=ex,
                 client_states=lambda p, n: jnp.arange(n), personal=personal)
  s0 = alg.init(jax.random.key(2), data)
  np.testing.assert_array_equal(s0.client_states, np.arange(5))
  assert s0.params["Dense_0"]["kernel"].sharding.mesh == ex.mesh      # placed on the mesh
  assert alg.personal is personal and alg.plan(s0.params, data).strategy == "lanes"
  want = make_init(logreg(), server, agg, clients_per_round=4, execution=ex)(
      jax.random.key(2), data)
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(a, b)
  ids, _ = alg.sample(s0.rng, 5)
  s1, m = jax.jit(alg.round)(s0, data)
  np.testing.assert_array_equal(m.clients, ids)
  assert int(s1.round) == 1 and alg.deal(data) is not None
  only = fp.Execution(sampling_probs=np.float32([0, 1, 0, 1, 0]))    # the sampler sees it
  alg = assemble(logreg(), _fedavg, agg, server, clients_per_round=2, execution=only)
  s0 = alg.init(jax.random.key(2), data)
  ids, _ = alg.sample(s0.rng, 5)
  assert sorted(np.asarray(ids).tolist()) == [1, 3]
  np.testing.assert_array_equal(jax.jit(alg.round)(s0, data)[1].clients, ids)


def test_a_round_runs_its_cohort_over_the_executions_mesh():
  """Steps (4, 2, 2, 3) of cohort (3, 0, 2, 4) dealt on 2 devices as {4, 2} | {3, 2}: vmap
  executes 2·4 + 2·3 = 14 client-steps (16 on one device); a cohort of one client runs."""
  data = small_data(sizes=[3, 5, 4, 7, 6])                   # steps ⌈n / 2⌉
  agg, server = fp.aggregation.num_examples(), optax.sgd(1.0)
  ex = fp.Execution(strategy="vmap", mesh=fp.distributed.client_mesh(2))
  init = make_init(logreg(), server, agg, clients_per_round=4, execution=ex)
  round_fn = make_round(_fedavg, agg, server, clients_per_round=4, execution=ex,
                        cohort=jnp.int32([3, 0, 2, 4]))
  _, m = jax.jit(round_fn)(init(jax.random.key(0), data), data)
  assert (int(m.real_steps), int(m.executed_steps)) == (11, 14)
  one = make_round(_fedavg, agg, server, clients_per_round=1)
  s, m = jax.jit(one)(make_init(logreg(), server, agg, clients_per_round=1)(
      jax.random.key(0), data), data)
  assert m.clients.shape == (1,) and int(s.round) == 1


@pytest.mark.parametrize("hidden, strategy_steps", [((), "lanes"), ((4000,), "scan")])
def test_auto_plans_the_round_by_its_models_size(hidden, strategy_steps):
  """`auto` on CPU, cohort of 8 with steps (4, 4, 4, 3, 2, 2, 1, 1), 21 in all: ⌈8 · 2.625 / 4⌉
  = 6 lanes for logistic regression (18 parameters), 6 · 4 = 24 lane-steps; one client at a
  time (scan: exactly the 21 real steps) for an MLP of 36,003 ≥ AUTO_SCAN_MIN_PARAMS."""
  data = small_data(sizes=[8, 8, 8, 6, 4, 4, 2, 2])
  model = fp.models.mlp((5,), 3, hidden=hidden) if hidden else logreg()
  make = lambda d: fedavg_program(model, optax.sgd(0.1), WORK, num_classes=3,
                                  max_examples=d.max_examples, min_examples=d.min_examples)
  agg, server = fp.aggregation.num_examples(), optax.sgd(1.0)
  ex = fp.Execution(strategy="auto", mesh=None)
  state = make_init(model, server, agg, clients_per_round=8, execution=ex)(
      jax.random.key(0), data)
  assert sum(a.size for a in jax.tree.leaves(state.params)) == (18 if not hidden else 36_003)
  round_fn = make_round(make, agg, server, clients_per_round=8, execution=ex)
  _, m = jax.jit(round_fn)(state, data)
  real, executed = int(m.real_steps), int(m.executed_steps)
  assert (real, executed) == (21, 21 if strategy_steps == "scan" else 24)
