"""FedALA: adaptive local aggregation against NumPy, η = 0 is FedAvg bit for bit, the client
state's phases and the personalized model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import logreg_grad, logreg_loss
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import fedala, fedavg
from fedjax_pers.algorithms._fedala import NO_LOCAL, START, TRAINED, ALAState, ala
from fedjax_pers.core import ClientData
from fedjax_pers.experiment import train_and_evaluate


@functools.cache
def data():   # built at first use: a test module's import starts no JAX backend
  return small_data(num_clients=6)

MLP = fp.models.mlp((5,), 3, hidden=(4,))


def _ref_epoch(glob, local, w, x, y, eta):
  """One ALA epoch of one batch (all examples) on logistic regression, in float64."""
  theta = {k: glob[k] - (glob[k] - local[k]) * (1 - w[k]) for k in glob}
  gk, gb = logreg_grad(theta["kernel"], theta["bias"], x, y)
  loss = logreg_loss(theta["kernel"], theta["bias"], x, y)
  g = {"kernel": gk, "bias": gb}
  return loss, {k: np.clip(w[k] - eta * g[k] * (glob[k] - local[k]), 0.0, 1.0) for k in w}


@pytest.mark.parametrize("phase", [NO_LOCAL, START, TRAINED])
def test_ala_weights_match_numpy(phase):
  """Logistic regression (the head is the whole model), one batch per epoch: TRAINED runs
  one epoch, START repeats them until the last 3 losses' std < threshold (or 40 epochs),
  NO_LOCAL none."""
  rs = np.random.RandomState(3)
  n, d, c = 7, 4, 3
  x, y = rs.normal(size=(n, d)), rs.randint(0, c, n)
  glob = {"kernel": rs.normal(size=(d, c)), "bias": rs.normal(size=c)}
  local = {k: v + rs.normal(size=v.shape) for k, v in glob.items()}
  w0 = {k: rs.uniform(0.2, 1.0, size=v.shape) for k, v in glob.items()}
  eta, threshold, pre, cap = 0.5, 1e-3, 3, 40
  with jax.enable_x64(True):
    model = logreg(d, c)
    params = {"Dense_0": {k: jnp.asarray(v) for k, v in glob.items()}}
    tup = lambda t: (jnp.asarray(t["bias"]), jnp.asarray(t["kernel"]))   # leaves' order
    state = ALAState(tup(local), tup(w0), jnp.asarray(phase, jnp.int32))
    client = ClientData(jnp.asarray(np.vstack([x, np.zeros((2, d))])),
                        jnp.asarray(np.r_[y, [0, 0]], jnp.int32), jnp.asarray(n, jnp.int32))
    epochs, w = ala(model, params, state, client, jax.random.key(0), [True, True], eta=eta,
                    sample_fraction=1.0, batch_size=16, threshold=threshold, num_pre_loss=pre,
                    max_start_epochs=cap, max_examples=n + 2)
  ref, losses = dict(w0), []
  while phase != NO_LOCAL:
    loss, ref = _ref_epoch(glob, local, ref, x, y, eta)
    losses.append(loss)
    if phase == TRAINED or len(losses) == cap or (
        len(losses) > pre and np.std(losses[-pre:]) < threshold):
      break
  assert int(epochs) == len(losses)
  if phase == START:
    assert 3 < len(losses) < cap   # the criterion, not the cap, stopped it
  np.testing.assert_allclose(w[0], ref["bias"], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(w[1], ref["kernel"], rtol=1e-10, atol=1e-12)
  # The sampled share reads floor(s n) examples: s = 0.5 reads 3 of the 7 (another loss).
  with jax.enable_x64(True):
    _, half = ala(model, params, state._replace(phase=jnp.asarray(TRAINED)), client,
                  jax.random.key(0), [True, True], eta=eta, sample_fraction=0.5,
                  batch_size=16, threshold=threshold, num_pre_loss=pre, max_start_epochs=cap,
                  max_examples=n + 2)
  assert not np.allclose(half[1], _ref_epoch(glob, local, w0, x, y, eta)[1]["kernel"])
  # Any loss settles under an infinite threshold: the start phase still needs more than
  # num_pre_loss epochs (as the paper's code: len(losses) > num_pre_loss).
  with jax.enable_x64(True):
    e, _ = ala(model, params, state._replace(phase=jnp.asarray(START)), client,
               jax.random.key(0), [True, True], eta=eta, sample_fraction=1.0, batch_size=16,
               threshold=np.inf, num_pre_loss=pre, max_start_epochs=cap, max_examples=n + 2)
  assert int(e) == pre + 1


def _ala_case(n, max_examples, seed=3):
  """A logistic-regression client of `n` examples padded to `max_examples`, in float64."""
  rs = np.random.RandomState(seed)
  d, c = 4, 3
  x, y = rs.normal(size=(n, d)), rs.randint(0, c, n)
  glob = {"kernel": rs.normal(size=(d, c)), "bias": rs.normal(size=c)}
  local = {k: v + rs.normal(size=v.shape) for k, v in glob.items()}
  w0 = {k: rs.uniform(0.2, 1.0, size=v.shape) for k, v in glob.items()}
  pad = max_examples - n
  client = lambda: ClientData(jnp.asarray(np.vstack([x, np.zeros((pad, d))])),
                              jnp.asarray(np.r_[y, [0] * pad], jnp.int32),
                              jnp.asarray(n, jnp.int32))
  state = lambda phase: ALAState((jnp.asarray(local["bias"]), jnp.asarray(local["kernel"])),
                                 (jnp.asarray(w0["bias"]), jnp.asarray(w0["kernel"])),
                                 jnp.asarray(phase, jnp.int32))
  params = lambda: {"Dense_0": {k: jnp.asarray(v) for k, v in glob.items()}}
  return x, y, glob, local, w0, client, state, params


def test_ala_batches_a_random_order_of_the_sampled_share():
  """Batches of one: an epoch steps W on each of the n examples once, in a random order (a
  permutation found by NumPy, not the same for every key); with floor(s n) = 0 ALA still
  reads one example."""
  import itertools

  x, y, glob, local, w0, client, state, params = _ala_case(3, 3)
  orders = set()
  for seed in range(4):
    with jax.enable_x64(True):
      _, w = ala(logreg(4, 3), params(), state(TRAINED), client(), jax.random.key(seed),
                 [True, True], eta=0.5, sample_fraction=1.0, batch_size=1, threshold=1e-3,
                 num_pre_loss=3, max_start_epochs=40, max_examples=3)
    for order in itertools.permutations(range(3)):
      ref = dict(w0)
      for i in order:
        ref = _ref_epoch(glob, local, ref, x[i:i + 1], y[i:i + 1], 0.5)[1]
      if np.allclose(w[1], ref["kernel"], rtol=1e-10) and np.allclose(w[0], ref["bias"]):
        orders.add(order)
        break
    else:
      raise AssertionError(f"key {seed}: W is no order of single-example steps")
  assert len(orders) > 1
  x, y, glob, local, w0, client, state, params = _ala_case(7, 9)
  with jax.enable_x64(True):
    _, w = ala(logreg(4, 3), params(), state(TRAINED), client(), jax.random.key(0),
               [True, True], eta=0.5, sample_fraction=0.1, batch_size=16, threshold=1e-3,
               num_pre_loss=3, max_start_epochs=40, max_examples=9)
  assert any(np.allclose(w[1], _ref_epoch(glob, local, w0, x[i:i + 1], y[i:i + 1], 0.5)[1][
      "kernel"], rtol=1e-10) for i in range(7))


def test_the_start_phase_stops_on_its_window_or_its_cap():
  """START: epochs until the std of the last `num_pre_loss` epoch losses < threshold (after
  more than `num_pre_loss` epochs), at most `max_start_epochs`: NumPy's epoch count for
  thresholds that stop it at four different epochs, and the cap when nothing settles."""
  x, y, glob, local, w0, client, state, params = _ala_case(7, 9)
  pre, losses, ref = 4, [], dict(w0)   # even: a window rolled by 2 would keep only 2
  for _ in range(30):
    loss, ref = _ref_epoch(glob, local, ref, x, y, 0.5)
    losses.append(loss)
  stds = [np.std(losses[k - pre:k]) for k in range(pre + 1, 31)]
  ranked = np.sort(stds)
  stops = set()
  for i in (5, 10, 15, 20):   # midway between two stds: no tie with either
    threshold = (ranked[i] + ranked[i + 1]) / 2
    want = next(k for k in range(pre + 1, 31) if np.std(losses[k - pre:k]) < threshold)
    with jax.enable_x64(True):
      e, _ = ala(logreg(4, 3), params(), state(START), client(), jax.random.key(0),
                 [True, True], eta=0.5, sample_fraction=1.0, batch_size=16,
                 threshold=float(threshold), num_pre_loss=pre, max_start_epochs=40,
                 max_examples=9)
    assert int(e) == want
    stops.add(want)
  assert len(stops) == 4
  with jax.enable_x64(True):
    e, _ = ala(logreg(4, 3), params(), state(START), client(), jax.random.key(0),
               [True, True], eta=0.5, sample_fraction=1.0, batch_size=16, threshold=0.0,
               num_pre_loss=pre, max_start_epochs=5, max_examples=9)
  assert int(e) == 5
  # η = 0: W never moves, every epoch's loss is the same and the window's std exactly 0,
  # which is not below a threshold of 0 (the rule is strict): the cap again
  with jax.enable_x64(True):
    e, _ = ala(logreg(4, 3), params(), state(START), client(), jax.random.key(0),
               [True, True], eta=0.0, sample_fraction=1.0, batch_size=16, threshold=0.0,
               num_pre_loss=pre, max_start_epochs=9, max_examples=9)
  assert int(e) == 9


def test_eta_zero_starts_every_client_from_the_global_model_and_is_fedavg():
  work = fp.LocalWork(3, epochs=2)
  a = fedala(MLP, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3, eta=0.0)
  b = fedavg(MLP, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)
  sa, sb = a.init(jax.random.key(0), data()), b.init(jax.random.key(0), data())
  step_a, step_b = jax.jit(a.round), jax.jit(b.round)
  for _ in range(4):   # past every sampled client's start phase
    sa, _ = step_a(sa, data())
    sb, _ = step_b(sb, data())
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_array_equal(x, y)
  assert int(np.max(sa.client_states.phase)) == TRAINED
  for leaf, g in zip(jax.tree.leaves(a.personal(sa)), jax.tree.leaves(sa.params)):
    np.testing.assert_array_equal(leaf, np.broadcast_to(g, leaf.shape))
  assert step_a._cache_size() == 1


def test_a_round_moves_the_phases_keeps_the_local_head_and_personalizes_by_it():
  alg = fedala(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
               clients_per_round=3, threshold=1e9)   # the start phase: 11 epochs
  s0 = alg.init(jax.random.key(2), data())
  step = jax.jit(alg.round)
  s1, m1 = step(s0, data())
  s2, m2 = step(s1, data())
  phases = np.zeros(6, int)
  for ids in (np.asarray(m1.clients), np.asarray(m2.clients)):
    phases[ids] += 1
  np.testing.assert_array_equal(s2.client_states.phase, phases)
  # The personal model: lower layer Θ, head Θ − (Θ − θ_i) ⊙ (1 − W_i) (Θ where never trained).
  pers = alg.personal(s2)
  cs = s2.client_states
  for i in range(6):
    np.testing.assert_array_equal(pers["Dense_0"]["kernel"][i], s2.params["Dense_0"]["kernel"])
    for j, k in enumerate(("bias", "kernel")):
      g, t, w = (np.asarray(a) for a in (s2.params["Dense_1"][k], cs.local[j][i],
                                         cs.weights[j][i]))
      want = g if phases[i] == NO_LOCAL else g - (g - t) * (1 - w)
      np.testing.assert_allclose(pers["Dense_1"][k][i], want, rtol=1e-6, atol=1e-7)
  twice = np.flatnonzero(phases == TRAINED)
  assert twice.size and not np.allclose(np.asarray(cs.weights[1])[twice], 1.0)
  once = np.flatnonzero(phases == START)
  np.testing.assert_array_equal(np.asarray(cs.weights[1])[once], 1.0)


@pytest.mark.run
def test_fedala_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "fedala", "mlp", (8,)
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert "personalized_test_accuracy" in s and s["rounds"] == 4


@pytest.mark.parametrize("kw,match", [
    (dict(eta=-0.1), "eta out of range; got -0.1"),
    (dict(threshold=-1.0), "threshold out of range; got -1.0"),
    (dict(sample_fraction=0.0), "sample_fraction out of range; got 0.0"),
    (dict(sample_fraction=1.5), "sample_fraction out of range; got 1.5"),
    (dict(num_pre_loss=0), "num_pre_loss must be an int >= 1; got 0"),
    (dict(max_start_epochs=0), "max_start_epochs must be an int >= 1; got 0"),
    (dict(max_start_epochs=2.0), "max_start_epochs must be an int >= 1; got 2.0")])
def test_fedala_refusals(kw, match):
  rest = r" \(eta >= 0, threshold >= 0, 0 < sample_fraction <= 1\).$" if "range" in match else ""
  with pytest.raises(ValueError, match="^fedala: " + match + rest):
    fedala(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1),
           clients_per_round=1, **kw)


def test_fedala_bounds_defaults_and_head():
  """The bounds themselves are allowed; the defaults are the paper's code's (η = 1, s = 0.8,
  a threshold of 0.1 over 10 losses; 100 start epochs is ours): they run as those values
  given, and differently from others; `head=` names the layers ALA mixes (per-client
  weights of their shapes); every client starts with no local model."""
  fedala(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1), clients_per_round=1,
         eta=0, threshold=0, sample_fraction=1, num_pre_loss=1, max_start_epochs=1)
  given = dict(eta=1.0, sample_fraction=0.8, threshold=0.1, num_pre_loss=10,
               max_start_epochs=100)

  def outcome(lr=0.1, **kw):   # two rounds of every client: the second runs ALA's start phase
    alg = fedala(MLP, optax.sgd(lr), optax.sgd(1.0), fp.LocalWork(3, steps=1),
                 clients_per_round=6, **kw)
    state, step = alg.init(jax.random.key(0), data()), jax.jit(alg.round)
    for _ in range(2):
      state, _ = step(state, data())
    return jax.tree.leaves(state.client_states.weights)

  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  default = outcome()
  assert same(default, outcome(**given))
  for change in (dict(eta=2.0), dict(threshold=1e-4), dict(num_pre_loss=11),
                 dict(max_start_epochs=5)):
    assert not same(default, outcome(**{**given, **change})), change
  # The threshold and the cap alone, where a near value would change the weights (the run
  # above settles the same at a threshold of 1.1 and never reaches a cap of 100): the cap
  # where no window settles (threshold 0), the threshold where windows of 2 losses have a
  # std between 0.1 and 1.1 (local models far from the global one: client rate 3).
  for name, other, fixed in (("max_start_epochs", 101, dict(threshold=0.0)),
                             ("threshold", 1.1, dict(lr=3.0, num_pre_loss=2,
                                                     max_start_epochs=20))):
    base = outcome(**fixed)
    assert same(base, outcome(**fixed, **{name: given[name]})), name
    assert not same(base, outcome(**fixed, **{name: other})), name
  alg = fedala(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1),
               clients_per_round=2, head=lambda path: "Dense_0" in path)
  state = alg.init(jax.random.key(0), data())
  shapes = [a.shape[1:] for a in state.client_states.weights]
  assert shapes == [a.shape for a in jax.tree.leaves(state.params["Dense_0"])]
  assert state.client_states.phase.dtype == np.int32
  np.testing.assert_array_equal(state.client_states.phase, NO_LOCAL)

