"""`from_arrays`: pooled arrays with a client-id column, grouped and split per client."""

import numpy as np
import pytest

import fedjax_pers as fp


def test_from_arrays_hand_checked():
  x = np.arange(10, dtype=np.float32)[:, None]          # x value = example index
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  ids = np.array([7, 3, 7, 3, 7, 3, 7, 9, 9, 9])
  train, test = fp.data.from_arrays(x, y, ids, test_fraction=0.34, seed=0, num_classes=4)
  assert train.num_clients == 3 and train.num_classes == 4
  # Clients in order of first appearance: 7 -> {0,2,4,6}, 3 -> {1,3,5}, 9 -> {7,8,9}.
  for c, members in enumerate([{0, 2, 4, 6}, {1, 3, 5}, {7, 8, 9}]):
    xa, ya = train.client(c)
    xb, yb = test.client(c)
    got = [int(v) for v in np.concatenate([xa[:, 0], xb[:, 0]])]
    assert sorted(got) == sorted(members) and len(set(got)) == len(got)
    assert len(xb) == int(np.ceil(0.34 * len(members)))
    np.testing.assert_array_equal(np.concatenate([ya, yb]), y[got])


def test_from_arrays_errors():
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match="share n"):
    fp.data.from_arrays(x, np.zeros(3, int), np.zeros(4, int))
  with pytest.raises(ValueError, match="at least 2"):
    fp.data.from_arrays(x, np.zeros(4, int), np.array([0, 0, 0, 1]))
  with pytest.raises(ValueError, match="integer"):
    fp.data.from_arrays(x, np.zeros(4), np.zeros(4, int))
  with pytest.raises(ValueError, match="empty"):
    fp.data.from_arrays(np.zeros((0, 1)), np.zeros(0, int), np.zeros(0, int))
  with pytest.raises(ValueError, match=">= 0"):
    fp.data.from_arrays(x, -np.ones(4, int), np.zeros(4, int))


def test_partition_by_name_matches_the_partitioners():
  y = np.repeat(np.arange(5), 20)
  for scheme, ref in [("iid", fp.data.iid(100, 4, seed=1)),
                      ("shards", fp.data.shards(y, 4, 2, seed=1)),
                      ("quantity_skew", fp.data.quantity_skew(100, 4, 1.0, seed=1)),
                      ("dirichlet", fp.data.dirichlet(y, 4, 0.5, seed=1))]:
    got = fp.data.partition(y, 4, scheme, seed=1)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="Unknown partition"):
    fp.data.partition(y, 4, "natural")
