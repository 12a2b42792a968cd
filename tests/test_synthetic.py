"""Synthetic(α, β) reproduces the FedProx / pFedMe generator draw for draw."""

import numpy as np
import pytest

import fedjax_pers as fp


def reference_generator(alpha, beta, iid, num_users, dim=60, num_class=10, scale=1):
  """The papers' script, line by line, on the legacy global RNG (seed set by caller)."""
  samples_per_user = (np.random.lognormal(4, 2, (num_users)).astype(int) + 50) * scale
  x_split = [[] for _ in range(num_users)]
  y_split = [[] for _ in range(num_users)]
  mean_w = np.random.normal(0, alpha, num_users)
  mean_b = mean_w
  b_prior = np.random.normal(0, beta, num_users)
  mean_x = np.zeros((num_users, dim))
  diagonal = np.zeros(dim)
  for j in range(dim):
    diagonal[j] = np.power((j + 1), -1.2)
  cov_x = np.diag(diagonal)
  for i in range(num_users):
    if iid == 1:
      mean_x[i] = np.ones(dim) * b_prior[i]
    else:
      mean_x[i] = np.random.normal(b_prior[i], 1, dim)
  if iid == 1:
    w_global = np.random.normal(0, 1, (dim, num_class))
    b_global = np.random.normal(0, 1, num_class)
  for i in range(num_users):
    w = np.random.normal(mean_w[i], 1, (dim, num_class))
    b = np.random.normal(mean_b[i], 1, num_class)
    if iid == 1:
      w = w_global
      b = b_global
    xx = np.random.multivariate_normal(mean_x[i], cov_x, samples_per_user[i])
    yy = np.zeros(samples_per_user[i])
    for j in range(samples_per_user[i]):
      tmp = np.dot(xx[j], w) + b
      yy[j] = np.argmax(np.exp(tmp) / np.sum(np.exp(tmp)))
    x_split[i] = xx
    y_split[i] = yy
  return x_split, y_split


@pytest.mark.parametrize("alpha,beta,iid,users,scale,seed", [
    (1.0, 1.0, False, 30, 1, 0), (0.5, 0.5, False, 12, 2, 3), (0.0, 0.0, True, 10, 1, 1)])
def test_matches_reference_draw_for_draw(alpha, beta, iid, users, scale, seed):
  np.random.seed(seed)
  ref_x, ref_y = reference_generator(alpha, beta, iid, users, scale=scale)
  xs, ys = fp.data.synthetic_arrays(alpha, beta, num_clients=users, iid=iid,
                                    sample_scale=scale, seed=seed)
  assert len(xs) == users
  for a, b, c, d in zip(xs, ref_x, ys, ref_y):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d.astype(int))


def test_known_sizes_for_seed_zero():
  # lognormal(4, 2) with seed 0: first normal draw 1.7640523 -> exp(7.528) = 1859.
  xs, _ = fp.data.synthetic_arrays(1, 1, num_clients=30, seed=0)
  assert len(xs[0]) == int(np.exp(4 + 2 * 1.764052345967664)) + 50 == 1909


def test_train_test_split_partitions_each_client():
  train, test = fp.data.synthetic(0.5, 0.5, num_clients=8, seed=2, test_fraction=0.1)
  xs, ys = fp.data.synthetic_arrays(0.5, 0.5, num_clients=8, seed=2)
  for c in range(8):
    n = len(ys[c])
    assert int(train.num_examples[c]) == int(0.9 * n)
    assert int(train.num_examples[c]) + int(test.num_examples[c]) == n
    tr, te = train.client(c)[0], test.client(c)[0]
    both = np.concatenate([tr, te]).astype(np.float64)
    # Same rows as generated (float32), in some order.
    ref = xs[c].astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(np.sort(both, axis=0), np.sort(ref, axis=0))
  assert train.num_classes == test.num_classes == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=-1.0), "alpha"), (dict(num_clients=0), "num_clients"),
    (dict(test_fraction=1.0), "test_fraction"), (dict(num_classes=1), "num_classes")])
def test_bad_arguments(kwargs, match):
  args = dict(alpha=1.0, beta=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fp.data.synthetic(args.pop("alpha"), args.pop("beta"), **args)
