"""IFCA: k = 1 is FedAvg bit for bit, the per-cluster mean against NumPy, exact recovery of
well-separated linear-regression populations, the config and its plot."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.aggregation import num_examples
from fedjax_pers.algorithms import fedavg, ifca
from fedjax_pers.algorithms._ifca import Clusters, cluster_mean
from fedjax_pers.core import ClientOutput
from fedjax_pers.experiment import train_and_evaluate

MLP = fp.models.mlp((5,), 3, hidden=(4,))


def test_one_cluster_is_fedavg():
  data = small_data(num_clients=6)
  work = fp.LocalWork(3, epochs=2)
  a = ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), work, num_clusters=1, clients_per_round=3)
  b = fedavg(MLP, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)
  sa = a.init(jax.random.key(0), data)
  sb = b.init(jax.random.key(0), data)._replace(params=jax.tree.map(lambda p: p[0], sa.params))
  step_a, step_b = jax.jit(a.round), jax.jit(b.round)
  for _ in range(3):
    sa, ma = step_a(sa, data)
    sb, mb = step_b(sb, data)
  for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
    np.testing.assert_allclose(x[0], y, rtol=1e-6, atol=1e-7)   # XLA's fusion: ~1e-8 apart
  np.testing.assert_array_equal(ma.weights, mb.weights)
  np.testing.assert_array_equal(ma.clients, mb.clients)
  assert step_a._cache_size() == 1


def test_cluster_mean_matches_numpy():
  """Five clients, three clusters: cluster 2 chosen by nobody, one client non-finite."""
  rs = np.random.RandomState(0)
  k, m = 3, 5
  own = rs.normal(size=(m, 2))
  chosen = np.array([0, 1, 0, 1, 0])
  delta = np.zeros((m, k, 2))
  delta[np.arange(m), chosen] = own
  n = np.array([4, 2, 6, 3, 1])
  finite = np.array([True, True, True, True, False])
  delta[4, 0] = np.nan
  outputs = ClientOutput(
      delta=jnp.asarray(delta, jnp.float32), num_examples=jnp.asarray(n, jnp.int32),
      train_loss=jnp.zeros(m), num_steps=jnp.ones(m, jnp.int32),
      label_hist=jnp.zeros((m, 3)), finite=jnp.asarray(finite),
      client_id=jnp.arange(m), client_state=Clusters(jnp.asarray(chosen, jnp.int32)))
  agg = cluster_mean(num_examples(), k)
  got, weights, _ = agg.apply(outputs, agg.init(m), None)
  want = np.zeros((k, 2))
  for j in range(k):
    members = (chosen == j) & finite
    if members.any():
      want[j] = (n[members, None] * own[members]).sum(0) / n[members].sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(weights, [4 / 10, 2 / 5, 6 / 10, 3 / 5, 0.0], rtol=1e-6)


def _regression_model(d):
  """Linear regression y = x·w + b; the target rides in the last feature column (the
  engine's labels are integers), the "logits" are the residuals."""
  init = lambda key: {"w": jax.random.normal(key, (d,)), "b": jnp.zeros(())}
  apply = lambda p, x, key=None, train=False: x[:, :d] @ p["w"] + p["b"] - x[:, d]
  return fp.Model(init=init, apply=apply, loss=lambda r, y: jnp.square(r),
                  metrics=lambda r, y: (jnp.abs(r) < 0.1).astype(jnp.float32))


def test_recovers_well_separated_linear_regression_populations_exactly():
  d, per_group, n = 5, 4, 40
  rs = np.random.RandomState(1)
  v = rs.normal(size=d)
  truth = [3 * v / np.linalg.norm(v), -3 * v / np.linalg.norm(v)]
  group = np.repeat([0, 1], per_group)
  rs.shuffle(group)
  xs = []
  for g in group:
    x = rs.normal(size=(n, d))
    xs.append(np.c_[x, x @ truth[g] + 0.01 * rs.normal(size=n)].astype(np.float32))
  data = fp.FederatedData.from_clients(xs, [np.zeros(n, np.int32)] * len(group),
                                       num_classes=1)
  alg = ifca(_regression_model(d), optax.sgd(0.05), optax.sgd(1.0), fp.LocalWork(10, epochs=2),
             num_clusters=2, clients_per_round=len(group))
  state, step = alg.init(jax.random.key(3), data), jax.jit(alg.round)
  assert state.client_states.cluster.dtype == np.int32
  np.testing.assert_array_equal(state.client_states.cluster, -1)   # none estimated yet
  for _ in range(20):
    state, _ = step(state, data)
  chosen = np.asarray(state.client_states.cluster)
  # One cluster per population, the same for all its clients, distinct between them.
  assert len(set(chosen[group == 0])) == 1 and len(set(chosen[group == 1])) == 1
  assert chosen[group == 0][0] != chosen[group == 1][0]
  for g in (0, 1):
    np.testing.assert_allclose(state.params["w"][chosen[group == g][0]], truth[g], atol=0.02)
  # A client's own adaptation picks the same cluster model.
  adapted = alg.adapt(state, data, jax.random.key(0))
  np.testing.assert_array_equal(adapted["w"], np.asarray(state.params["w"])[chosen])
  # The served model is the cluster most clients chose.
  most = np.argmax(np.bincount(chosen, minlength=2))
  np.testing.assert_array_equal(alg.serve(state)["w"], np.asarray(state.params["w"])[most])


@pytest.mark.run
def test_ifca_from_the_config_reports_and_plots_the_clusters(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "ifca", "mlp", (8,)
  c.ifca.num_clusters = 3
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert "personalized_test_accuracy" in s and s["rounds"] == 4
  rows = [json.loads(r) for r in open(tmp_path / "run" / "round_weights.jsonl")]
  assert all(len(r["clusters"]) == len(r["clients"]) and set(r["clusters"]) <= {0, 1, 2}
             for r in rows)
  assert (tmp_path / "run" / "clusters.png").stat().st_size > 0


def test_ifca_refusals(tmp_path):
  c = tiny_config()
  c.algorithm, c.model.name, c.model.hidden = "ifca", "mlp", (8,)
  c.aggregation.weighting = "median"
  with pytest.raises(ValueError, match="algorithm='ifca' averages within clusters"):
    train_and_evaluate(c, str(tmp_path / "median"))
  with pytest.raises(ValueError, match="num_clusters must be an int >= 1; got 0"):
    ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1), num_clusters=0,
         clients_per_round=1)


def test_cluster_recovery_by_hand():
  from fedjax_pers.data import cluster_recovery
  group = np.array([0, 0, 1, 1, 2, 2])
  assert cluster_recovery(np.array([2, 2, 0, 0, 1, 1]), group) == 1.0   # renamed, exact
  assert cluster_recovery(np.array([1, 1, 1, 1, 0, 0]), group) == pytest.approx(4 / 6)
  assert cluster_recovery(np.array([-1, 0, 1, 1, 2, 2]), group) == pytest.approx(5 / 6)


def test_clustered_synthetic_labels_come_from_the_groups_generators():
  from fedjax_pers.data import cluster_groups, clustered_synthetic
  train, test, group = clustered_synthetic(3, num_clients=9, dim=4, num_classes=3, seed=2)
  np.testing.assert_array_equal(group, cluster_groups(9, 3, 2))
  assert np.bincount(group).tolist() == [3, 3, 3] and train.num_clients == test.num_clients == 9
  # Within a group one linear map explains every label; across groups it does not.
  def fits(clients):
    x = np.concatenate([np.asarray(train.client(c)[0], np.float64) for c in clients])
    y = np.concatenate([train.client(c)[1] for c in clients])
    # Least squares on one-hot targets separates a linear argmax rule's classes here.
    onehot = np.eye(3)[y]
    w = np.linalg.lstsq(np.c_[x, np.ones(len(x))], onehot, rcond=None)[0]
    return np.mean(np.argmax(np.c_[x, np.ones(len(x))] @ w, axis=1) == y)
  same = fits(np.flatnonzero(group == 0))
  mixed = fits(np.arange(9))
  assert same > mixed + 0.1


@pytest.mark.run
def test_ifca_reports_cluster_recovery_on_clustered_data(tmp_path):
  c = tiny_config()
  c.algorithm, c.data.name, c.data.clusters, c.ifca.num_clusters = (
      "ifca", "clustered_synthetic", 2, 2)
  c.data.holdout_clients = 0.25
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.5 <= s["cluster_recovery"] <= 1.0
  assert len(s["unseen_clients"]) == 2 and "unseen_personalized_test_accuracy" in s


def test_the_served_model_is_the_cluster_most_clients_chose():
  data = small_data(num_clients=6)
  alg = ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, steps=1), num_clusters=3,
             clients_per_round=3)
  state = alg.init(jax.random.key(0), data)
  for chosen, want in (([2, 0, 2, 1, -1, 2], 2), ([1, 1, 0, 0, 1, -1], 1),
                       ([0, 2, 2, 0, -1, -1], 0)):   # a tie: the first of them
    s = state._replace(client_states=Clusters(jnp.asarray(chosen, jnp.int32)))
    for got, models in zip(jax.tree.leaves(alg.serve(s)), jax.tree.leaves(s.params)):
      np.testing.assert_array_equal(got, models[want])


def test_ifca_factory_and_assignments_refusals():
  work = fp.LocalWork(3, steps=1)
  with pytest.raises(ValueError, match="^ifca averages within clusters with a weight function "
                     r"\(num_examples, uniform, ...\); got Aggregator"):
    ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), work, num_clusters=2, clients_per_round=1,
         weighting=fp.aggregation.median())
  for bad in (True, 2.0):
    with pytest.raises(ValueError, match=f"^ifca: num_clusters must be an int >= 1; got {bad}"):
      ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), work, num_clusters=bad, clients_per_round=1)
  alg = ifca(MLP, optax.sgd(0.1), optax.sgd(1.0), work, num_clusters=2, clients_per_round=1)
  data = small_data(num_clients=4)
  state = alg.init(jax.random.key(0), data)
  with pytest.raises(ValueError, match="^ifca reads padded client rows to choose clusters; got "
                     "a capped store"):
    alg.adapt(state, data.with_cap(2), jax.random.key(1))
