"""A client's helpers, the pieces every local update shares, against NumPy: squared
norms, finiteness, the masked mean loss and its gradient, label histograms and
per-client state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _reference import cross_entropy

import fedjax_pers as fp
from fedjax_pers.core._client import (
  ClientData,
  all_finite,
  label_histogram,
  masked_mean_loss,
  stack_clients,
  tree_sq_norm,
)


class Drop(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(4)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(6)(x)))


def test_squared_norm_and_finiteness():
  tree = {"a": jnp.float32([[1, 2], [3, 4]]), "b": jnp.float32([0.5])}
  assert float(tree_sq_norm(tree)) == 30.25
  assert bool(all_finite(tree))
  for bad in (np.nan, np.inf, -np.inf):
    assert not bool(all_finite({**tree, "b": jnp.float32([bad])}))
    assert not bool(all_finite({**tree, "a": tree["a"].at[1, 0].set(bad)}))


def test_masked_mean_loss_is_the_real_rows_mean_in_training_mode():
  model = fp.core.from_flax(Drop(), jnp.zeros((1, 3)))
  params = model.init(jax.random.key(0))
  rs = np.random.RandomState(1)
  x, y = jnp.asarray(rs.normal(size=(5, 3)), jnp.float32), jnp.int32([0, 3, 1, 2, 2])
  mask = np.array([True, True, False, True, False])
  key = jax.random.key(4)
  mean, total = masked_mean_loss(model, params, x, y, jnp.asarray(mask), key)
  losses = cross_entropy(Drop().apply({"params": params}, x, train=True,
                                      rngs={"dropout": key}), y)
  np.testing.assert_allclose(total, losses[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(mean, losses[mask].mean(), rtol=1e-5)
  # Whatever the padded rows hold, they reach neither the value nor the gradient.
  grad = lambda xs, ys: jax.grad(lambda p: masked_mean_loss(
      model, p, xs, ys, jnp.asarray(mask), key)[0])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), grad(x, y),
               grad(x.at[2].set(1e3).at[4].set(-50.0), y.at[2].set(0)))
  none = masked_mean_loss(model, params, x, y, jnp.zeros(5, bool), key)
  assert float(none[0]) == float(none[1]) == 0.0     # an all-padding batch: zero, not NaN


def test_label_histogram_counts_the_real_labels():
  client = ClientData(x=jnp.zeros((6, 1)), y=jnp.int32([2, 0, 2, 1, 2, 3]),
                      num_examples=jnp.int32(5))
  hist = label_histogram(client, 4)
  assert hist.dtype == jnp.float32
  np.testing.assert_array_equal(hist, [1, 1, 3, 0])   # the padded 3 is not counted


def test_stack_clients_stacks_one_copy_per_client():
  tree = {"w": jnp.arange(3.0), "b": jnp.float32(2.0)}
  stacked = stack_clients(tree, 2)
  np.testing.assert_array_equal(stacked["w"], [[0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(stacked["b"], [2, 2])
  assert stacked["w"].dtype == stacked["b"].dtype == jnp.float32


def test_cohort_source_rows_and_reads_from_padded_and_capped_stores():
  """A round's source: the drawn clients' rows, sizes, states and ids (padded: as
  stored; capped: `FederatedData.cohort`'s subset), and the batch reads by handle,
  which give the same examples as those rows."""
  from fedjax_pers.core._source import cohort_source

  rs = np.random.RandomState(2)
  sizes = [3, 8, 5, 6]
  xs = [rs.normal(size=(n, 2)).astype(np.float32) for n in sizes]
  ys = [rs.randint(0, 3, n) for n in sizes]
  padded = fp.FederatedData.from_clients(xs, ys)
  states = {"s": jnp.arange(4.0) * 10}
  key, ids = jax.random.key(1), jnp.int32([2, 0])
  slots = jnp.int32([[4, 0, 1], [2, 2, 0]])
  for data in (padded, padded.with_cap(4)):
    src = cohort_source(data, states, key)
    rows = src.rows(ids)
    x, y, n = data.cohort(ids, key)
    for got, want in ((rows.x, x), (rows.y, y), (rows.num_examples, n), (rows.id, ids),
                      (rows.state["s"], [20.0, 0.0]), (src.sizes, sizes)):
      np.testing.assert_array_equal(got, want)
    handles = src.handles(ids)
    for k in range(2):
      bx, by = src.read(src.table, handles[k], slots[k])
      np.testing.assert_array_equal(bx, rows.x[k][slots[k]])
      np.testing.assert_array_equal(by, rows.y[k][slots[k]])
    assert cohort_source(data, None, key).rows(ids).state is None
  whole = cohort_source(padded, states, key, whole=True).rows(jnp.arange(4))
  assert whole.x is padded.x and whole.y is padded.y and whole.state is states
  np.testing.assert_array_equal(whole.id, np.arange(4))


def test_a_gathered_cohorts_source_reads_states_by_id_unless_windowed():
  """A round's cohort gathered from a host store (`window`): rows by position in the
  window; states over the whole population by id (the default), or over the window's
  slots by position (`windowed=True`)."""
  import dataclasses

  from fedjax_pers.core._source import cohort_source

  rs = np.random.RandomState(3)
  sizes = [3, 8, 5, 6]
  padded = fp.FederatedData.from_clients(
      [rs.normal(size=(n, 2)).astype(np.float32) for n in sizes],
      [rs.randint(0, 3, n) for n in sizes])
  window = jnp.int32([2, 0, 3])
  gathered = dataclasses.replace(padded, x=padded.x[window], y=padded.y[window], window=window)
  ids = jnp.int32([0, 2])
  everyone = {"s": jnp.arange(4.0) * 10}
  rows = cohort_source(gathered, everyone, jax.random.key(0)).rows(ids)
  np.testing.assert_array_equal(rows.x, padded.x[ids])
  np.testing.assert_array_equal(rows.num_examples, [3, 5])
  np.testing.assert_array_equal(rows.state["s"], [0.0, 20.0])
  slots = {"s": jnp.float32([7.0, 8.0, 9.0])}       # the window's clients 2, 0, 3
  rows = cohort_source(gathered, slots, jax.random.key(0), windowed=True).rows(ids)
  np.testing.assert_array_equal(rows.state["s"], [8.0, 7.0])


def test_the_mean_aggregator_keeps_its_weightings_score_and_losses():
  from fedjax_pers.core._aggregate import mean_aggregator

  for weighting in (fp.aggregation.num_examples(), fp.aggregation.loss_improvement(1.0)):
    agg = mean_aggregator(weighting)
    assert agg.score is weighting.score and agg.init is weighting.init
    assert agg.client_losses is weighting.client_losses
  assert mean_aggregator(fp.aggregation.loss_improvement(1.0)).client_losses is True
  assert mean_aggregator(fp.aggregation.num_examples()).score is not None
