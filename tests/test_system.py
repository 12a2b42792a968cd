"""Stragglers and dropouts (`Execution(system=System(...))`): the draw, stragglers' partial
work against NumPy, FedAvg dropping them, dropouts, the option off bit for bit, the config."""

import functools

import jax
import numpy as np
import optax
import pytest
from _reference import engine_plan, logreg_sgd
from test_engine import logreg, small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers.algorithms import fedavg, fedprox
from fedjax_pers.core import _system
from fedjax_pers.experiment import train_and_evaluate


@functools.cache
def data():   # built at first use: a test module's import starts no JAX backend
  return small_data(num_clients=8, sizes=[3, 11, 6, 9, 4, 12, 7, 5])

WORK = fp.LocalWork(2, epochs=3)


def run(system, alg=fedavg, seed=2, **kw):
  a = alg(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=6,
          weighting=agg.uniform(), execution=fp.Execution(system=system), **kw)
  s0 = a.init(jax.random.key(seed), data())
  s1, m = jax.jit(a.round)(s0, data())
  return s0, s1, m


def test_an_inactive_system_is_the_plain_round_bit_for_bit():
  _, s1, m1 = run(None)
  _, s2, m2 = run(fp.System(straggler_fraction=0.0, levels=3, dropout_rate=0.0))
  raw = lambda t: jax.tree.leaves(jax.tree.map(
      lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
      else a, t))
  for a, b in zip(raw((s1, m1)), raw((s2, m2))):
    np.testing.assert_array_equal(a, b)


def test_the_draw():
  d = _system.draw(jax.random.key(0), 10, fp.System(straggler_fraction=0.3, levels=4))
  assert int(d.straggler.sum()) == 3
  assert np.all((np.asarray(d.share) >= 1) & (np.asarray(d.share) <= 4))
  np.testing.assert_array_equal(np.asarray(d.share)[~np.asarray(d.straggler)], 4)
  drops = jax.vmap(lambda k: _system.draw(k, 10, fp.System(dropout_rate=0.2)).dropped)(
      jax.random.split(jax.random.key(1), 4000))
  assert abs(float(drops.mean()) - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 40_000)


def test_stragglers_send_their_first_epochs_against_numpy():
  """FedProx keeps stragglers' partial work: client i runs ⌈j_i S_i / E⌉ steps, i.e. j_i of
  its E = 3 epochs, the first steps of its plan."""
  system = fp.System(straggler_fraction=0.5, levels=3)
  s0, s1, m = run(system, fedprox, seed=11, mu=0.5)   # stragglers with j = 3, 2 and 1
  _, k_sample, _ = jax.random.split(s0.rng, 3)
  d = _system.draw(jax.random.fold_in(k_sample, 2), 6, system)
  share = np.asarray(d.share)
  assert sorted(share[np.asarray(m.stragglers)]) == [1, 2, 3]
  w = np.asarray(s0.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(s0.params["Dense_0"]["bias"], np.float64)
  dws, total = [], 0
  for slot, c in enumerate(np.asarray(m.clients)):
    plan = engine_plan(s0.rng, data(), WORK, c)
    full = 3 * -(-int(data().num_examples[c]) // 2)
    t = -(-share[slot] * full // 3)
    x, y = np.asarray(data().x[c], np.float64), np.asarray(data().y[c])
    wi, _, _, steps = logreg_sgd(w, b, x, y, np.asarray(plan.idx)[:t],
                                 np.asarray(plan.mask)[:t], 0.1, 0.5)
    assert steps == t
    dws.append(wi - w)
    total += t
  assert int(m.real_steps) == total
  np.testing.assert_allclose(s1.params["Dense_0"]["kernel"], w + np.mean(dws, 0), atol=1e-5)
  assert np.all(np.asarray(m.present))


def test_a_straggler_does_the_ceiling_of_its_share():
  """⌈j S / levels⌉ steps, also where levels does not divide S (j = 1, S = 9, levels = 2)."""
  data = small_data(num_clients=2, sizes=[6, 6])
  program = fp.core.LocalProgram(None, None, None, lambda client: 9)
  p = _system.straggling(program, jax.numpy.asarray([1]), jax.numpy.asarray([1]), 2, 2)
  ids = jax.numpy.asarray([0, 1])
  client = fp.core.ClientData(None, None, data.num_examples, id=ids)
  np.testing.assert_array_equal(jax.vmap(lambda c: p.num_steps(c))(client), [9, 5])


def test_no_recompilation_across_rounds():
  a = fedprox(logreg(), optax.sgd(0.1), optax.sgd(1.0), WORK, clients_per_round=6, mu=0.1,
              execution=fp.Execution(system=fp.System(straggler_fraction=0.5, levels=3,
                                                      dropout_rate=0.2)))
  state, step = a.init(jax.random.key(0), data()), jax.jit(a.round)
  for _ in range(3):
    state, _ = step(state, data())
  assert step._cache_size() == 1


def test_fedavg_drops_stragglers_and_dropouts_weigh_nothing():
  system = fp.System(straggler_fraction=0.5, levels=3, drop_stragglers=True, dropout_rate=0.3)
  s0, s1, m = run(system, seed=5)   # two of the three non-stragglers drop out
  present = np.asarray(m.present)
  strag = np.asarray(m.stragglers)
  assert strag.sum() == 3 and not present[strag].any() and present.sum() == 1
  w = np.asarray(m.weights)
  np.testing.assert_allclose(w[~present], 0.0)
  np.testing.assert_allclose(w[present], 1 / present.sum(), rtol=1e-6)
  assert int(m.num_nonfinite) == 0
  full = {int(c): 3 * -(-int(data().num_examples[c]) // 2) for c in np.asarray(m.clients)}
  assert int(m.real_steps) == sum(full[int(c)] for c in np.asarray(m.clients)[present])


@pytest.mark.run
def test_system_from_the_config(tmp_path):
  c = tiny_config()
  c.system.straggler_fraction = 0.5
  for alg in ("fedavg", "fedprox"):
    c.algorithm = alg
    train_and_evaluate(c, str(tmp_path / alg))
    rows = [__import__("json").loads(line)
            for line in (tmp_path / alg / "round_weights.jsonl").open()]
    assert all(len(r["stragglers"]) == 2 for r in rows)     # round(0.5 · 3)
    dropped = [len(r["not_reported"]) for r in rows]
    assert dropped == ([2] * 4 if alg == "fedavg" else [0] * 4)


def test_system_refusals(tmp_path):
  with pytest.raises(ValueError, match=r"system.dropout_rate must be a number in \[0, 1\)"):
    fp.System(dropout_rate=1.0)
  c = tiny_config()
  c.system.straggler_fraction = 1.5
  with pytest.raises(ValueError, match=r"system.straggler_fraction must be a number in"):
    train_and_evaluate(c, str(tmp_path / "bad"))
