"""Execution whose cost follows the real steps: every path equals the padded one.

The padded path (`Execution(differentiable=True)`: every client runs the longest
client's steps, masked) is the reference; `vmap`, `chunked`, `scan` and `lanes`
stop each client after its own last real step and must give the same rounds,
on one device and sharded over a 4-device `clients` mesh.
"""

import functools
import re
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import fedavg_round, lpt_makespan
from test_engine import run

import fedjax_pers as fp
from fedjax_pers.core import _execution, _lanes, _program

SIZES = [3, 41, 7, 12, 26, 5, 9, 60, 2, 15]


def skewed_data(sizes=SIZES, dim=5, num_classes=3, seed=0, cap=None):
  rs = np.random.RandomState(seed)
  xs = [rs.normal(size=(n, dim)).astype(np.float32) for n in sizes]
  ys = [rs.randint(0, num_classes, n) for n in sizes]
  return fp.FederatedData.from_clients(xs, ys, num_classes=num_classes, example_cap=cap)


LR = fp.models.logistic_regression((5,), 3)
EPOCHS, STEPS = fp.LocalWork(4, epochs=2), fp.LocalWork(4, steps=5)
PER_CLIENT = fp.LocalWork(3, steps=(4, 1, 7, 2, 5, 3, 6, 2, 8, 1))


def build(name, work, execution, k=6):
  """The algorithms the issue lists, each with `execution`."""
  sgd, one = optax.sgd(0.1), optax.sgd(1.0)
  kw = dict(clients_per_round=k, execution=execution)
  table = {
      "fedavg": lambda: fp.algorithms.fedavg(LR, sgd, one, work, **kw),
      "fedprox": lambda: fp.algorithms.fedprox(LR, sgd, optax.adam(0.05), work, mu=0.5, **kw),
      "loss_weights": lambda: fp.algorithms.fedavg(
          LR, sgd, one, work, weighting=fp.aggregation.q_ffl(1.0, 10.0), **kw),
      "median": lambda: fp.algorithms.fedavg(LR, sgd, one, work,
                                             weighting=fp.aggregation.median(), **kw),
      "ditto": lambda: fp.algorithms.ditto(LR, sgd, one, work, lam=0.5, **kw),
      "pfedme": lambda: fp.algorithms.pfedme(
          LR, work, learning_rate=0.05, personal_learning_rate=0.05, lam=5.0, inner_steps=2,
          clients_per_round=3, execution=execution),
      "per_fedavg": lambda: fp.algorithms.per_fedavg(LR, optax.sgd(0.05), one, work,
                                                     inner_lr=0.1, **kw),
  }
  return table[name]()


def rounds(alg, data, n=3, seed=1):
  return run(alg, data, n, seed=seed)


@functools.cache
def padded_rounds(name, work):
  """The masked fixed-length path's rounds on `skewed_data()`: the reference every path
  must equal (computed once per worker; several tests compare against it)."""
  return rounds(build(name, work, fp.Execution(strategy="vmap", differentiable=True)),
                skewed_data())


def assert_same_rounds(a, b, atol=1e-6):
  (sa, ma), (sb, mb) = a, b
  for x, y in zip(jax.tree.leaves((sa.params, sa.client_states)),
                  jax.tree.leaves((sb.params, sb.client_states))):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)
  for x, y in zip(ma, mb):
    np.testing.assert_array_equal(x.clients, y.clients)
    np.testing.assert_allclose(x.weights, y.weights, atol=atol)
    np.testing.assert_allclose(x.client_train_loss, y.client_train_loss, atol=atol)
    assert int(x.real_steps) == int(y.real_steps)


CASES = [("fedavg", EPOCHS), ("fedavg", STEPS), ("fedavg", PER_CLIENT), ("fedprox", EPOCHS),
         ("loss_weights", EPOCHS), ("median", STEPS), ("ditto", EPOCHS), ("ditto", PER_CLIENT),
         ("pfedme", STEPS), ("per_fedavg", STEPS)]
# `lanes` without a count runs 2 lanes here (6 clients, mean steps / max steps = 9.8 / 30).
PATHS = [dict(strategy="vmap"), dict(strategy="chunked", client_chunk=4),
         dict(strategy="scan"), dict(strategy="lanes", lanes=1), dict(strategy="lanes")]
DISTINCT = [PATHS[0], PATHS[2], PATHS[4]]


@pytest.mark.parametrize("name,work", CASES)
def test_every_path_equals_the_padded_one(name, work):
  data = skewed_data()
  ref = padded_rounds(name, work)
  # FedAvg runs every path; the other algorithms share its cohort machinery and
  # run the three distinct loops (vmapped while loops, one at a time, lanes).
  for options in PATHS if name == "fedavg" else DISTINCT:
    got = rounds(build(name, work, fp.Execution(**options)), data)
    assert_same_rounds(ref, got)


@pytest.mark.parametrize("name,work", [("fedavg", EPOCHS), ("ditto", EPOCHS),
                                       ("pfedme", STEPS), ("per_fedavg", STEPS),
                                       ("loss_weights", PER_CLIENT)])
@pytest.mark.parametrize("strategy", ["lanes", "scan", "vmap"])
def test_sharded_over_four_devices_equals_the_padded_path(name, work, strategy):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (conftest sets 4 fake CPU devices)")
  data = skewed_data()
  ref = padded_rounds(name, work)
  mesh = fp.distributed.client_mesh(4)
  assert_same_rounds(ref, rounds(build(name, work, fp.Execution(strategy=strategy, mesh=mesh)),
                                 data))


def test_capped_store_equals_the_padded_path():
  data = skewed_data(cap=8)
  ref = rounds(build("fedavg", EPOCHS, fp.Execution(strategy="vmap", differentiable=True)),
               data)
  for options in PATHS:
    assert_same_rounds(ref, rounds(build("fedavg", EPOCHS, fp.Execution(**options)), data))


def test_per_client_steps_match_numpy_reference():
  data = skewed_data()
  alg = build("fedavg", PER_CLIENT, fp.Execution(strategy="lanes", lanes=2), k=6)
  state0 = alg.init(jax.random.key(3), data)
  state1, m = jax.jit(alg.round)(state0, data)
  w, b, weights, losses = fedavg_round(state0.params, data, state0.rng, PER_CLIENT, 0.1, 6)
  np.testing.assert_allclose(state1.params["Dense_0"]["kernel"], w, atol=1e-5)
  np.testing.assert_allclose(state1.params["Dense_0"]["bias"], b, atol=1e-5)
  np.testing.assert_allclose(m.weights, weights, atol=1e-6)
  np.testing.assert_allclose(m.client_train_loss, losses, rtol=1e-5)
  # Each client took its own K_c steps, and the round cost exactly those.
  assert int(m.real_steps) == sum(PER_CLIENT.steps[c] for c in np.asarray(m.clients))


def test_steps_reported_match_the_work():
  data = skewed_data()
  sizes = np.asarray(SIZES)
  steps = 2 * -(-sizes // 4)                          # E · ⌈n / B⌉
  for options, executed in [
      (dict(strategy="vmap", differentiable=True), lambda ids: 6 * steps.max()),
      (dict(strategy="vmap"), lambda ids: 6 * steps[ids].max()),
      (dict(strategy="scan"), lambda ids: steps[ids].sum()),
      (dict(strategy="lanes", lanes=2), lambda ids: 2 * lpt_makespan(steps[ids], 2))]:
    _, ms = rounds(build("fedavg", EPOCHS, fp.Execution(**options)), data, n=2)
    for m in ms:
      ids = np.asarray(m.clients)
      assert int(m.real_steps) == steps[ids].sum()
      assert int(m.executed_steps) == executed(ids), options


@pytest.mark.parametrize("options", [dict(strategy="lanes"), dict(strategy="scan"),
                                     dict(strategy="vmap"), dict()])
def test_no_recompilation_across_cohorts(options):
  data = skewed_data()
  traces = []
  for mesh in (None, fp.distributed.client_mesh(4) if len(jax.devices()) >= 4 else None):
    alg = build("fedavg", EPOCHS, fp.Execution(mesh=mesh, **options), k=4)
    step = jax.jit(lambda s, d, alg=alg: (traces.append(1), alg.round(s, d))[1])
    state = alg.init(jax.random.key(0), data)
    cohorts = set()
    for _ in range(5):
      state, m = step(state, data)
      cohorts.add(tuple(np.asarray(m.clients).tolist()))
    assert len(cohorts) > 1                 # the sizes of the cohort changed ...
    if mesh is None:
      assert step._cache_size() == 1        # ... and nothing was compiled again
  assert len(traces) == 2


def test_lanes_run_the_lpt_schedule():
  """A program whose carry counts its steps: every client's count comes out, and the
  loop takes exactly the list-scheduling makespan (longest first) of iterations."""
  rs = np.random.RandomState(0)
  counts = rs.randint(0, 30, 23).astype(np.int32)
  k, total = counts.shape[0], 30

  def start(params, client, key):
    return jnp.zeros((), jnp.int32), _program.Steps(jnp.zeros((total, 1), jnp.int32),
                                                    jnp.ones((total, 1), bool))

  program = _program.LocalProgram(start, lambda p, c, b: c + 1, lambda p, cl, c: c,
                                  lambda client: client.num_examples)
  clients = fp.core.ClientData(jnp.zeros((k, 1, 1)), jnp.zeros((k, 1), jnp.int32),
                               jnp.asarray(counts))
  carry0, steps = jax.vmap(start, (None, 0, None))(None, clients, None)
  read = lambda handle_idx: (handle_idx[0].x[handle_idx[1]], handle_idx[0].y[handle_idx[1]])
  for lanes in (1, 2, 5, 23, 40):
    result = jax.jit(lambda c0, st, lanes=lanes: _lanes.run_lanes(
        program, None, c0, st, jnp.asarray(counts), clients, read, lanes=lanes))(carry0, steps)
    np.testing.assert_array_equal(result.carries, counts)
    assert int(result.lane_steps) == lanes * lpt_makespan(counts, lanes)


def test_auto_plan_follows_sizes_model_and_gradients():
  data, uniform = skewed_data(), skewed_data(sizes=[8] * 10)
  mild = skewed_data(sizes=[20] * 9 + [40])       # steps 10 (x9) and 20: 6 lanes for 10
  big = fp.models.mlp((5,), 3, hidden=(200, 200))
  plan = lambda model, d, k=6, **kw: fp.algorithms.fedavg(
      model, optax.sgd(0.1), optax.sgd(1.0), EPOCHS, clients_per_round=k,
      execution=fp.Execution(**kw)).plan(model.init(jax.random.key(0)), d)
  lanes = int(np.ceil(6 * np.mean(2 * -(-np.asarray(SIZES) // 4)) / (2 * 15)))
  assert lanes == 2 and plan(LR, data, strategy="lanes").lanes == 2
  assert plan(LR, data).strategy == "scan"            # 2 lanes: one client at a time on CPU
  assert plan(LR, mild, k=10) == fp.core.Plan("lanes", None, 6, False)
  assert plan(LR, uniform).strategy == "vmap"
  assert plan(LR, data, differentiable=True) == fp.core.Plan("vmap", None, None, True)
  assert plan(big, data).strategy == "scan"
  assert plan(LR, data, strategy="lanes", lanes=99).lanes == 6   # at most one per client


def test_auto_lanes_and_is_large_by_hand():
  """`⌈k_d · mean S / max S⌉` in [1, k_d], computed without dividing by zero."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")             # no 0/0 on empty or all-zero counts
    for counts, per_device, want in (([], 4, 1), ([0, 0], 4, 1), ([1, 1, 1, 1], 4, 4),
                                     ([0, 0, 0, 10], 4, 1),     # 4 · 2.5 / 10 = 1 exactly
                                     ([2, 2, 4, 4], 4, 3), ([3, 3, 6], 3, 2),
                                     ([1, 1, 1, 8], 4, 2), ([5, 5, 5, 5], 2, 2)):
      got = _execution.auto_lanes(np.asarray(counts, np.int32), per_device)
      assert type(got) is int and got == want, (counts, per_device, got)
  n = _execution.AUTO_SCAN_MIN_PARAMS
  assert _execution.is_large({"w": np.zeros((n - 7,)), "b": np.zeros((7,))})
  assert not _execution.is_large({"w": np.zeros((n - 8,)), "b": np.zeros((7,))})


def test_plan_by_hand(monkeypatch):
  small = {"w": np.zeros((3,))}
  big = {"w": np.zeros((_execution.AUTO_SCAN_MIN_PARAMS,))}
  two = fp.distributed.client_mesh(2)

  def plan(counts, cohort, params=small, **kw):
    size_classes = kw.pop("size_classes", None)
    more = {} if size_classes is None else {"size_classes": size_classes}
    return _execution.plan(fp.Execution(**kw), params,
                           None if counts is None else np.asarray(counts), cohort, **more)

  P = fp.core.Plan
  skewed, wide, even = [1, 1, 1, 8], [6, 6, 6, 8], [4, 4, 4, 4]
  # Lanes: the asked count or k_d (a device's clients) without counts, at most k_d.
  assert plan(None, 11, strategy="lanes", mesh=two) == P("lanes", None, 5, False)
  assert type(plan(None, 11, strategy="lanes", mesh=two).lanes) is int
  assert plan(None, 1, strategy="lanes") == P("lanes", None, 1, False)
  assert plan(skewed, 4, strategy="lanes") == P("lanes", None, 2, False)
  assert plan(skewed, 4, strategy="lanes", lanes=3) == P("lanes", None, 3, False)
  assert plan(skewed, 4, strategy="lanes", lanes=9) == P("lanes", None, 4, False)
  assert plan(skewed, 4, strategy="chunked", client_chunk=3) == P("chunked", 3, None, False)
  assert plan(skewed, 4, strategy="vmap", client_chunk=3) == P("vmap", None, None, False)
  # auto on CPU: a large model one client at a time; equal or unknown steps side by side;
  # skewed steps on lanes from AUTO_MIN_CPU_LANES = 4 on, else one client at a time.
  assert plan(even, 4, params=big) == P("scan", None, None, False)
  for counts in (even, None, []):
    assert plan(counts, 4) == P("vmap", None, None, False)
  assert plan(wide, 4) == P("lanes", None, 4, False)
  assert plan(skewed, 4) == P("scan", None, None, False)
  assert plan(skewed, 4, differentiable=True) == P("vmap", None, None, True)
  # Plans one client at a time on CPU over several width classes only.
  assert [plan(skewed, 4, size_classes=c).plans_one_by_one for c in (None, 1, 2, 3)] == [
      False, False, True, True]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert plan(wide, 4) == P("vmap", None, None, False)
  assert plan(even, 4, params=big) == P("vmap", None, None, False)
  assert not plan(skewed, 4, size_classes=2).plans_one_by_one


def test_auto_plan_on_an_accelerator_runs_skewed_clients_side_by_side(monkeypatch):
  # On an H200 lanes and scan lost to vmap on skewed clients (README, "On a GPU").
  data, mild = skewed_data(), skewed_data(sizes=[20] * 9 + [40])
  big = fp.models.mlp((5,), 3, hidden=(200, 200))
  plan = lambda model, d, k=6, **kw: fp.algorithms.fedavg(
      model, optax.sgd(0.1), optax.sgd(1.0), EPOCHS, clients_per_round=k,
      execution=fp.Execution(**kw)).plan(model.init(jax.random.key(0)), d)
  cpu = plan(LR, mild, k=10), plan(big, data)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cpu == (fp.core.Plan("lanes", None, 6, False), fp.core.Plan("scan", None, None, False))
  for model, d, k in ((LR, data, 6), (LR, mild, 10), (big, data, 6)):
    assert plan(model, d, k) == fp.core.Plan("vmap", None, None, False)
  assert plan(LR, mild, 10, strategy="lanes").strategy == "lanes"   # asked for: kept
  assert not plan(LR, mild, 10).plans_one_by_one


def test_gradient_through_rounds_needs_and_has_the_differentiable_path():
  data = skewed_data()
  work = fp.LocalWork(4, epochs=2)
  state = fp.algorithms.fedavg(LR, optax.sgd(0.1), optax.sgd(1.0), work,
                               clients_per_round=4).init(jax.random.key(0), data)

  def loss(lr, execution):
    alg = fp.algorithms.fedavg(LR, optax.sgd(lr), optax.sgd(1.0), work, clients_per_round=4,
                               execution=execution)
    s = state
    for _ in range(2):
      s, _ = alg.round(s, data)
    return jnp.mean(LR.loss(LR.apply(s.params, x), y))

  x, y = data.client(1)

  with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
    jax.jit(jax.grad(loss), static_argnums=1)(0.1, fp.Execution(strategy="lanes"))
  for strategy in ("vmap", "scan"):
    ex = fp.Execution(strategy=strategy, differentiable=True)
    g = jax.jit(jax.grad(loss), static_argnums=1)(jnp.float32(0.1), ex)
    f = jax.jit(loss, static_argnums=1)
    eps = 1e-2
    fd = (f(0.1 + eps, ex) - f(0.1 - eps, ex)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=2e-2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lanes=0), "Execution lanes must be an int >= 1; got 0."),
    (dict(lanes=2.5), "Execution lanes must be an int >= 1; got 2.5."),
    (dict(lanes=True), "Execution lanes must be an int >= 1; got True."),
    (dict(strategy="pmap"), "Execution strategy must be one of ('auto', 'vmap', 'chunked', "
                            "'scan', 'lanes'); got 'pmap'."),
    (dict(strategy="chunked"), "Execution strategy='chunked' needs client_chunk, a positive "
                               "int; got None."),
    (dict(client_chunk=0), "Execution client_chunk must be a positive int; got 0."),
    (dict(client_chunk=True), "Execution client_chunk must be a positive int; got True."),
    (dict(strategy="lanes", differentiable=True),
     "Execution strategy='lanes' runs a while loop, which reverse-mode jax.grad cannot go "
     "through; with differentiable=True use 'auto', 'vmap', 'chunked' or 'scan'."),
    (dict(differentiable=1), "Execution differentiable must be a bool; got 1."),
    (dict(mesh="clients"), "Execution mesh must be a jax.sharding.Mesh with an axis named "
                           "'clients'; got axes None."),
    (dict(sampling_probs=[1, -1]), "Execution sampling_probs must be a 1-D array of "
     "finite, non-negative weights, not all zero; got shape (2,), min -1.0."),
    (dict(sampling_probs=[3, -1]), "Execution sampling_probs must be a 1-D array of "
     "finite, non-negative weights, not all zero; got shape (2,), min -1.0."),
    (dict(sampling_probs=[[1.0]]), "Execution sampling_probs must be a 1-D array of finite, "
     "non-negative weights, not all zero; got shape (1, 1), min 1.0."),
    (dict(sampling_probs=[1.0, np.inf]), "Execution sampling_probs must be a 1-D array of "
     "finite, non-negative weights, not all zero; got shape (2,), min 1.0."),
    (dict(sampling_probs=[0.0, 0.0]), "Execution sampling_probs must be a 1-D array of "
     "finite, non-negative weights, not all zero; got shape (2,), min 0.0."),
    (dict(sampling_probs=[]), "Execution sampling_probs must be a 1-D array of finite, "
     "non-negative weights, not all zero; got shape (0,), min None."),
    (dict(poisson_rate=0), "Execution poisson_rate must be a number in (0, 1]; got 0."),
    (dict(poisson_rate=1.5), "Execution poisson_rate must be a number in (0, 1]; got 1.5."),
    (dict(poisson_rate=True), "Execution poisson_rate must be a number in (0, 1]; got True."),
    (dict(poisson_rate="0.5"), "Execution poisson_rate must be a number in (0, 1]; got '0.5'."),
    (dict(poisson_rate=0.5, sampling_probs=[1.0]), "Execution poisson_rate and sampling_probs "
     "are two ways to sample a cohort; give one."),
    (dict(system="stragglers"), "Execution system must be a fedjax_pers.core.System; got "
                                "'stragglers'."),
])
def test_bad_execution_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    fp.Execution(**kwargs)


def test_every_option_of_an_execution_is_taken_at_its_bounds():
  mesh = fp.distributed.client_mesh(2)
  ex = fp.Execution(strategy="chunked", client_chunk=2, lanes=3, mesh=mesh,
                    sampling_probs=[0.0, 0.5, 0.5], system=fp.System(dropout_rate=0.5))
  assert (ex.client_chunk, ex.lanes, ex.num_devices) == (2, 3, 2)
  for rate in (1, 1.0, 0.25):
    assert fp.Execution(poisson_rate=rate).poisson_rate == rate
  assert fp.Execution(strategy="lanes").lanes is None and fp.Execution().num_devices == 1


def test_the_rounds_sampler_checks_probabilities_against_its_population():
  """(`check_probs` itself: test_sampling.py.) The check runs before tracing."""
  alg = fp.algorithms.fedavg(LR, optax.sgd(0.1), optax.sgd(1.0), EPOCHS, clients_per_round=2,
                             execution=fp.Execution(sampling_probs=np.ones(10)))
  ids, _ = alg.sample(jax.random.key(0), 10)
  assert len(set(np.asarray(ids).tolist())) == 2
  with pytest.raises(ValueError, match=r"= \(7,\); got shape \(10,\)"):
    alg.sample(jax.random.key(0), 7)


def test_unknown_execution_option_and_bad_work_are_refused():
  with pytest.raises(TypeError, match="prefetch"):
    fp.Execution(prefetch=2)
  with pytest.raises(ValueError, match="execution must be a fedjax_pers.Execution; got dict"):
    fp.algorithms.fedavg(LR, optax.sgd(0.1), optax.sgd(1.0), EPOCHS, clients_per_round=2,
                         execution={"strategy": "lanes"})
  with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with an axis named "
                                       r"'clients'; got axes \('data',\)"):
    fp.Execution(mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  data = skewed_data()
  alg = fp.algorithms.fedavg(LR, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=(2, 3)),
                             clients_per_round=2)
  with pytest.raises(ValueError, match=r"one per client \(10\); got 2"):
    jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
  with pytest.raises(ValueError, match="tuple of positive ints; got 0 among 2"):
    fp.algorithms.fedavg(LR, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=(2, 0)),
                         clients_per_round=2)


@pytest.mark.parametrize("cap", [None, 9])
def test_evaluation_visits_each_real_example_once_and_matches_numpy(cap):
  data = skewed_data(cap=cap)
  params = LR.init(jax.random.key(4))
  ev = jax.jit(lambda p, d: fp.core.evaluate(LR, p, d))(params, data)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  for c in range(data.num_clients):
    x, y = data.client(c)
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
    assert abs(float(ev.accuracy[c]) - np.mean(np.argmax(z, 1) == y)) < 1e-6
    assert abs(float(ev.loss[c]) - loss) < 1e-5
  # The flat evaluation scores the Σ n_c real examples (logits [Σ n, 1, C]), never the
  # N · max n padded slots (logits [N, max n, C]).
  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (v.aval.shape for v in eqn.outvars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  seen = set(shapes(jax.make_jaxpr(lambda p: fp.core.evaluate(LR, p, data))(params).jaxpr))
  assert (sum(SIZES), 1, 3) in seen
  assert not any(len(s) == 3 and s[0] == data.num_clients and s[2] == 3 for s in seen)


def test_hand_built_data_without_host_sizes_still_runs_and_agrees():
  data = skewed_data()
  bare = fp.FederatedData(x=data.x, y=data.y, num_examples=data.num_examples,
                          num_classes=data.num_classes, min_examples=data.min_examples)
  assert bare.sizes is None
  params = LR.init(jax.random.key(0))
  a, b = fp.core.evaluate(LR, params, data), fp.core.evaluate(LR, params, bare)
  np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
  np.testing.assert_array_equal(a.accuracy, b.accuracy)
  alg = build("fedavg", EPOCHS, fp.Execution())
  assert alg.plan(params, bare).strategy == "vmap"     # sizes unknown: auto stays padded-free
  assert_same_rounds(rounds(alg, data), rounds(alg, bare))




def test_rounds_over_many_size_classes_equal_the_padded_path():
  sizes = [3, 70, 150, 300, 10, 520, 33, 90]
  data = skewed_data(sizes=sizes)
  ref = rounds(build("fedavg", EPOCHS, fp.Execution(strategy="vmap", differentiable=True)),
               data, n=2)
  alg = build("fedavg", EPOCHS, fp.Execution(strategy="lanes"))
  assert alg.plan(LR.init(jax.random.key(0)), data).plans_one_by_one
  assert_same_rounds(ref, rounds(alg, data, n=2))
  w, b, _, _ = fedavg_round(ref[0].params, data, ref[0].rng, EPOCHS, 0.1, 6)
  state3, _ = jax.jit(alg.round)(ref[0], data)
  np.testing.assert_allclose(state3.params["Dense_0"]["kernel"], w, atol=1e-5)
