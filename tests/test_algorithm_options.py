"""What every algorithm factory promises about the options it shares with `fedavg`: the
server optimizer, the weighting, the execution (its sampler too), per-client local steps,
the dropout key of local steps and the clients' losses for loss-based weightings are all
used, per-client steps of the wrong length are refused, and the round counter is int32.
One place for these, so that an algorithm that drops one of them fails here whatever else
its own tests check."""

import jax
import numpy as np
import optax
import pytest
from _reference import dropout_logreg
from jax.sharding import NamedSharding, PartitionSpec
from test_engine import small_data

import fedjax_pers as fp
from fedjax_pers import aggregation as agg
from fedjax_pers import algorithms as alg

SIZES = [5, 9, 7, 4]
STEPS = fp.LocalWork(3, steps=2)


def _build(name, model, work, **kw):
  """`name`'s factory with small settings; `kw`: server_tx, weighting, execution (left
  out where None)."""
  kw = {k: v for k, v in kw.items() if v is not None}
  sgd = optax.sgd(0.3)
  server = kw.pop("server_tx", optax.sgd(1.0))
  common = dict(clients_per_round=2, **kw)
  return {
      "fedavg": lambda: alg.fedavg(model, sgd, server, work, **common),
      "fedprox": lambda: alg.fedprox(model, sgd, server, work, mu=0.5, **common),
      "scaffold": lambda: alg.scaffold(model, work, learning_rate=0.3, server_tx=server,
                                       **common),
      "feddyn": lambda: alg.feddyn(model, sgd, work, alpha=0.1, server_tx=server, **common),
      "moon": lambda: alg.moon(model, sgd, server, work, mu=0.5, **common),
      "fednova": lambda: alg.fednova(model, sgd, server, work, **common),
      "ditto": lambda: alg.ditto(model, sgd, server, work, lam=0.5, **common),
      "apfl": lambda: alg.apfl(model, sgd, server, work, alpha=0.5, **common),
      "fedper": lambda: alg.fedper(model, sgd, server, work, **common),
      "lg_fedavg": lambda: alg.lg_fedavg(model, sgd, server, work, **common),
      "fedrep": lambda: alg.fedrep(model, sgd, server, work, head_work=work, **common),
      "fedrod": lambda: alg.fedrod(model, sgd, server, work, **common),
      "fedbabu": lambda: alg.fedbabu(model, sgd, server, work, **common),
      "fedbn": lambda: alg.fedbn(model, sgd, server, work, **common),
      "fedala": lambda: alg.fedala(model, sgd, server, work, **common),
      "ifca": lambda: alg.ifca(model, sgd, server, work, num_clusters=2, **common),
      "per_fedavg": lambda: alg.per_fedavg(model, sgd, server, work, inner_lr=0.1, **common),
      "pfedhn": lambda: alg.pfedhn(model, sgd, work, hidden=4, num_hidden=1, **common),
      "pfedme": lambda: alg.pfedme(model, work, learning_rate=0.3, personal_learning_rate=0.3,
                                   lam=0.5, inner_steps=1, **common),
      "fedbuff": lambda: alg.fedbuff(model, sgd, server, work, concurrency=3, buffer_size=2,
                                     **kw),
  }[name]()


NAMES = ["fedavg", "fedprox", "scaffold", "feddyn", "moon", "fednova", "ditto", "apfl",
         "fedper", "lg_fedavg", "fedrep", "fedrod", "fedbabu", "fedbn", "fedala", "ifca",
         "per_fedavg"]
# Those whose clients report their losses before and after (the others refuse the weighting).
LOSSES = [n for n in NAMES + ["pfedhn"] if n not in ("apfl", "per_fedavg")]
# pFedHN's server is its own SGD with momentum (`outer_lr`, `outer_momentum`); pFedMe's
# server averages drawn clients (`average`) and FedBuff weights by staleness: no weighting;
# the two pick their own clients (every client, the earliest reports): no sampler to replace.
SERVER_TX = NAMES + ["fedbuff"]
WEIGHTED = NAMES + ["pfedhn"]
OWN_CLIENTS = ["pfedme", "fedbuff"]
EVERY = NAMES + ["pfedhn"] + OWN_CLIENTS
MLP = fp.models.mlp((5,), 3, hidden=(4,))


def _round(a, data, seed=0, rounds=1):
  state = a.init(jax.random.key(seed), data)
  step = jax.jit(a.round)
  for _ in range(rounds):
    state, m = step(state, data)
  return state, m


def _far(a, b):
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", EVERY)
def test_server_optimizer_weighting_and_dropout_key_are_used(name):
  """The server's learning rate moves the params (traced: one program for both rates);
  data-size and uniform weights are each client's; local steps use the dropout key (input
  dropout at rate 0.5 changes the round against rate 0). Three compiled rounds in all."""
  data = small_data(num_clients=4, sizes=SIZES)
  kw = dict(weighting=agg.num_examples()) if name in WEIGHTED else {}
  drop = dropout_logreg(rate=0.5, hidden=4)
  state = _build(name, drop, STEPS, **kw).init(jax.random.key(0), data)
  step = jax.jit(lambda lr, s: _build(name, drop, STEPS, server_tx=optax.sgd(lr), **kw)
                 .round(s, data))
  plain, mn = step(1.0, state)
  if name in SERVER_TX:
    half, _ = step(0.5, state)
    assert _far(plain.params, half.params) > 1e-5
  still, _ = _round(_build(name, dropout_logreg(rate=0.0, hidden=4), STEPS, **kw), data)
  assert _far(plain.params, still.params) > 1e-5
  if name in WEIGHTED:
    w = np.asarray(mn.weights)
    n = np.asarray(SIZES, np.float64)[np.asarray(mn.clients)]
    np.testing.assert_allclose(w, n / n.sum(), rtol=1e-6)
    _, mu = _round(_build(name, drop, STEPS, weighting=agg.uniform()), data)
    np.testing.assert_allclose(mu.weights, [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES + ["pfedhn"])
def test_execution_and_its_sampler_are_used(name):
  """Clients 2 and 3 only: the round's cohort, and the sampler a feed asks ahead; the
  plan a feed asks for is the execution's."""
  data = small_data(num_clients=4, sizes=SIZES)
  a = _build(name, MLP, STEPS, execution=fp.Execution(
      strategy="chunked", client_chunk=2, sampling_probs=np.array([0, 0, 1, 1.0])))
  state = a.init(jax.random.key(0), data)
  plan = a.plan(state.params, data)
  assert (plan.strategy, plan.client_chunk) == ("chunked", 2)
  ids, _ = a.sample(state.rng, data.num_clients)
  _, m = jax.jit(a.round)(state, data)
  assert sorted(np.asarray(m.clients).tolist()) == [2, 3] == sorted(np.asarray(ids).tolist())
  # On a mesh the first state is already where the sharded round leaves it: replicated.
  mesh = fp.distributed.client_mesh(2)
  state = _build(name, MLP, STEPS, execution=fp.Execution(mesh=mesh)).init(
      jax.random.key(0), data)
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), leaf.ndim)


@pytest.mark.parametrize("name", OWN_CLIENTS)
def test_execution_of_those_that_pick_their_own_clients(name):
  """The round runs the cohort as the execution says (one client per chunk computes only
  each client's own steps; `vmap` pads every client to the longest); the plan is the
  execution's; the sampler is the round's (pFedMe: everyone) or absent (FedBuff's next
  cohort is the state's earliest reports); on a mesh the first state is replicated."""
  data = small_data(num_clients=4, sizes=SIZES)
  work = fp.LocalWork(3, steps=(1, 3, 2, 4))
  chunked = _build(name, MLP, work, execution=fp.Execution(strategy="chunked", client_chunk=1))
  state = chunked.init(jax.random.key(0), data)
  plan = chunked.plan(state.params, data)
  assert (plan.strategy, plan.client_chunk) == ("chunked", 1)
  _, m = jax.jit(chunked.round)(state, data)
  per = np.asarray(work.steps)[np.asarray(m.clients)]
  assert int(m.executed_steps) == per.sum()
  padded = _build(name, MLP, work, execution=fp.Execution(strategy="vmap"))
  _, m = _round(padded, data)
  assert int(m.executed_steps) == per.size * per.max()
  if name == "pfedme":
    ids, _ = chunked.sample(state.rng, data.num_clients)
    everyone = [0, 1, 2, 3]
    assert sorted(np.asarray(ids).tolist()) == everyone == sorted(np.asarray(m.clients).tolist())
  else:
    assert chunked.sample is None
  mesh = fp.distributed.client_mesh(2)
  state = _build(name, MLP, STEPS, execution=fp.Execution(mesh=mesh)).init(
      jax.random.key(0), data)
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), leaf.ndim)
  for leaf in jax.tree.leaves(state):   # the algorithm's own state too
    assert leaf.sharding.device_set == set(mesh.devices.flat)


@pytest.mark.parametrize("name", [n for n in EVERY if n != "per_fedavg"])   # τ for everyone
def test_per_client_steps_are_each_clients_own(name):
  """Each client runs its own number of steps; those that report their losses give them to
  FedAvg's loss-improvement weights, w_i ∝ exp((ℓ_before − ℓ_after)/τ) over the cohort:
  each client's full-data loss before and after (finite, and the weights not uniform)."""
  data = small_data(num_clients=4, sizes=SIZES)
  work = fp.LocalWork(3, steps=(1, 3, 2, 4))
  kw = dict(weighting=agg.loss_improvement(0.05)) if name in LOSSES else {}
  a = _build(name, MLP, work, **kw)
  state, m = _round(a, data)
  per = np.asarray(work.steps)[np.asarray(m.clients)]
  phases = 2 if name == "fedrep" else 1   # the head's steps, then the body's
  assert int(m.real_steps) == phases * per.sum()
  assert state.round.dtype == np.int32 and int(state.round) == 1
  if name in LOSSES:   # (FedNova reports τ_eff p_i / τ_i: a sum of 1 only for equal τ_i)
    w = np.asarray(m.weights)
    assert np.all(np.isfinite(w)) and abs(w[0] - w[1]) > 1e-4
    assert abs(w.sum() - 1) < 1e-5 or name == "fednova"
  with pytest.raises(ValueError, match=r"^per-client local steps must number one per client "
                     r"\(5\); got 4"):
    a.round(state, small_data(num_clients=5))


@pytest.mark.parametrize("name,make", [
    ("scaffold", lambda h: alg.scaffold(MLP, STEPS, learning_rate=h, clients_per_round=2)),
    ("feddyn", lambda h: alg.feddyn(MLP, optax.sgd(0.3), STEPS, alpha=h, clients_per_round=2)),
    ("fedprox", lambda h: alg.fedprox(MLP, optax.sgd(0.3), optax.sgd(1.0), STEPS, mu=h,
                                      clients_per_round=2)),
    ("moon", lambda h: alg.moon(MLP, optax.sgd(0.3), optax.sgd(1.0), STEPS, mu=h,
                                temperature=h, clients_per_round=2)),
    ("ditto", lambda h: alg.ditto(MLP, optax.sgd(0.3), optax.sgd(1.0), STEPS, lam=h,
                                  clients_per_round=2)),
    ("apfl", lambda h: alg.apfl(MLP, optax.sgd(0.3), optax.sgd(1.0), STEPS, alpha=h,
                                alpha_lr=h, clients_per_round=2)),
    ("pfedme", lambda h: alg.pfedme(MLP, STEPS, learning_rate=h, personal_learning_rate=h,
                                    lam=h, inner_steps=1, beta=h, clients_per_round=2)),
    ("fedbuff", lambda h: alg.fedbuff(MLP, optax.sgd(0.3), optax.sgd(1.0), STEPS,
                                      concurrency=3, buffer_size=2, staleness_exponent=h,
                                      latency_spread=h)),
])
def test_numeric_hyperparameters_may_be_traced(name, make):
  """A sweep over a hyperparameter, or a hypergradient, traces it: the round is the same."""
  data = small_data(num_clients=4, sizes=SIZES)
  state = make(0.5).init(jax.random.key(0), data)
  plain_round, traced_round = jax.jit(make(0.5).round), jax.jit(
      lambda h, s: make(h).round(s, data))
  for _ in range(2):   # FedBuff's second round sees stale reports
    plain, _ = plain_round(state, data)
    traced, _ = traced_round(0.5, state)
    assert _far(plain.params, traced.params) < 1e-6
    state = plain
