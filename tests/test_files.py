"""IDX files (written here, and the shared MNIST files when present) and partitioning."""

import gzip
import os
import struct

import numpy as np
import pytest

import fedjax_pers as fp

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def write_idx(path, arr, code):
  header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
  data = header + arr.astype(dtype).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("name,code,dtype", [("a-idx3-ubyte.gz", 0x08, np.uint8),
                                             ("b-idx2-int", 0x0C, np.int32),
                                             ("c-idx1-float.gz", 0x0D, np.float32)])
def test_read_idx_round_trip(tmp_path, name, code, dtype):
  rng = np.random.default_rng(0)
  arr = (rng.integers(0, 250, (4, 3, 2)) if code != 0x0D else rng.normal(size=(4, 3, 2)))
  arr = arr.astype(dtype)
  path = str(tmp_path / name)
  write_idx(path, arr, code)
  got = fp.data.read_idx(path)
  assert got.dtype == dtype and got.shape == arr.shape
  np.testing.assert_array_equal(got, arr)


def test_read_idx_errors(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(ValueError, match="not an IDX file"):
    fp.data.read_idx(str(bad))
  short = tmp_path / "short"
  short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
  with pytest.raises(ValueError, match="header says shape"):
    fp.data.read_idx(str(short))
  with pytest.raises(FileNotFoundError, match="IDX file not found"):
    fp.data.read_idx(str(tmp_path / "missing"))


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist is absent")
def test_reads_the_shared_mnist_idx_files():
  x, y = fp.data.mnist_idx(SHARED_MNIST)
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert 0.0 == x.min() and x.max() == 1.0
  assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
  assert np.bincount(y).tolist()[:3] == [980, 1135, 1032]   # the published test-set counts


def test_iid_partition_and_split():
  parts = fp.data.iid(103, 10, seed=1)
  assert sorted(np.concatenate(parts).tolist()) == list(range(103))
  assert {len(p) for p in parts} == {10, 11}
  assert all(np.array_equal(a, b) for a, b in zip(parts, fp.data.iid(103, 10, seed=1)))
  x = np.arange(103, dtype=np.float32)[:, None]
  y = np.arange(103) % 3
  train, test = fp.data.split_clients(x, y, parts, test_fraction=0.2, num_classes=3)
  seen = np.concatenate([np.concatenate([train.client(c)[0], test.client(c)[0]])
                         for c in range(10)])
  assert sorted(seen[:, 0].astype(int).tolist()) == list(range(103))
  assert np.asarray(test.num_examples).tolist() == [3 if len(p) == 11 else 2 for p in parts]
  with pytest.raises(ValueError, match="num_clients must be an int"):
    fp.data.iid(5, 6)


def test_dirichlet_partition_covers_is_seeded_and_skews():
  labels = np.repeat(np.arange(10), 100)
  parts = fp.data.dirichlet(labels, 20, 0.1, min_size=5, seed=3)
  assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
  assert min(len(p) for p in parts) >= 5
  again = fp.data.dirichlet(labels, 20, 0.1, min_size=5, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  classes = [len(np.unique(labels[p])) for p in parts]
  wide = fp.data.dirichlet(labels, 20, 100.0, seed=3)
  assert np.mean(classes) < np.mean([len(np.unique(labels[p])) for p in wide])
  with pytest.raises(ValueError, match="alpha must be"):
    fp.data.dirichlet(labels, 20, 0.0)


def test_leaf_json_round_trip(tmp_path):
  xs, ys = fp.data.synthetic_arrays(0.5, 0.5, num_clients=4, dim=6, num_classes=3)
  users = [f"f_{i:05d}" for i in range(4)]
  fp.data.write_leaf(str(tmp_path / "all.json"), users, xs, ys)
  got_users, got_x, got_y = fp.data.read_leaf(str(tmp_path / "all.json"))
  assert got_users == users
  for a, b in zip(got_x, xs):
    np.testing.assert_array_equal(a, b.astype(np.float32))
  for a, b in zip(got_y, ys):
    np.testing.assert_array_equal(a, b)
  # A folder of files (as pFedMe and LEAF write them), test users in another order.
  (tmp_path / "train").mkdir()
  (tmp_path / "test").mkdir()
  fp.data.write_leaf(str(tmp_path / "train" / "a.json"), users[:2], xs[:2], ys[:2])
  fp.data.write_leaf(str(tmp_path / "train" / "b.json"), users[2:], xs[2:], ys[2:])
  fp.data.write_leaf(str(tmp_path / "test" / "t.json"), users[::-1], xs[::-1], ys[::-1])
  train, test = fp.data.from_leaf(str(tmp_path / "train"), str(tmp_path / "test"))
  assert train.num_clients == test.num_clients == 4 and train.num_classes == 3
  for c in range(4):
    np.testing.assert_array_equal(train.client(c)[1], test.client(c)[1])   # matched by user
  bad = tmp_path / "bad.json"
  bad.write_text('{"users": ["u"], "num_samples": [3], "user_data": {"u": {"x": [[1]], "y": [0]}}}')
  with pytest.raises(ValueError, match="num_samples says 3"):
    fp.data.read_leaf(str(bad))
  with pytest.raises(FileNotFoundError, match="No LEAF JSON"):
    fp.data.read_leaf(str(tmp_path / "nothing.json"))


def test_shards_quantity_and_natural_partitions():
  labels = np.repeat(np.arange(10), 60)
  parts = fp.data.shards(labels, 20, 2, seed=1)
  assert sorted(np.concatenate(parts).tolist()) == list(range(600))
  assert all(len(p) == 30 for p in parts)
  assert max(len(np.unique(labels[p])) for p in parts) <= 3     # two shards, maybe a border
  assert all(np.array_equal(a, b) for a, b in zip(parts, fp.data.shards(labels, 20, 2, seed=1)))
  sizes = [len(p) for p in fp.data.quantity_skew(1000, 20, 1.5, min_size=5, seed=2)]
  assert sum(sizes) == 1000 and min(sizes) >= 5 and max(sizes) > 4 * np.median(sizes)
  flat = [len(p) for p in fp.data.quantity_skew(1000, 20, 0.0, seed=2)]
  assert max(flat) - min(flat) <= 1
  keys, groups = fp.data.natural(["bob", "amy", "bob", "cy", "amy"])
  assert keys == ["bob", "amy", "cy"]
  assert [g.tolist() for g in groups] == [[0, 2], [1, 4], [3]]
  with pytest.raises(ValueError, match="shards_per_client"):
    fp.data.shards(labels, 400, 2)
