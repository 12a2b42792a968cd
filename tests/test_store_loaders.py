"""Every loader writes a host store (`store=PATH`) chunk by chunk that reads back equal to
the `FederatedData` it returns in memory, with its arguments in the header."""

import json
import os

import jax
import numpy as np
import pytest
from test_shakespeare import PLAY, SHARED_TEXT, needs_text, write

import fedjax_pers as fp


def assert_same(stores, device, loader):
  for st, dev in zip(stores, device):
    assert isinstance(st, fp.data.HostStore) and st.source["loader"] == loader
    assert st.num_classes == dev.num_classes and st.x.dtype == dev.x.dtype
    for a, b in zip(jax.tree.leaves(st.to_federated_data()), jax.tree.leaves(dev)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("iid", [False, True])
def test_synthetic_store_is_the_same_numbers_client_by_client(tmp_path, monkeypatch, iid):
  """Generated a client at a time (three positioned copies of the legacy stream) and
  written in chunks of 4: the same arrays as the papers' one-stream script in memory."""
  xs, ys = fp.data.synthetic_arrays(0.5, 0.5, num_clients=13, iid=iid, seed=4)
  device = fp.data.synthetic(0.5, 0.5, num_clients=13, iid=iid, seed=4, test_fraction=0.3)
  for c in range(13):   # in-memory synthetic still splits the script's own draws
    both = np.concatenate([device[0].client(c)[0], device[1].client(c)[0]])
    np.testing.assert_array_equal(np.sort(both, 0), np.sort(xs[c].astype(np.float32), 0))
  chunks = []
  real = fp.data._sink._chunks
  monkeypatch.setattr(fp.data._sink, "_chunks",
                      lambda it, n: (chunks.append(len(p)) or p for p in real(it, 4)))
  stores = fp.data.synthetic(0.5, 0.5, num_clients=13, iid=iid, seed=4, test_fraction=0.3,
                             store=str(tmp_path / "s"))
  assert chunks == [4, 4, 4, 1]
  assert_same(stores, device, "synthetic")
  assert stores[0].source["iid"] is iid and stores[0].source["test_fraction"] == 0.3


def test_from_arrays_store(tmp_path):
  rs = np.random.RandomState(0)
  ids = rs.choice(["a", "b", "c", "d", "e"], 200)
  x, y = rs.normal(size=(200, 3, 2)).astype(np.float32), rs.randint(0, 4, 200)
  device = fp.data.from_arrays(x, y, ids, test_fraction=0.25, seed=2)
  stores = fp.data.from_arrays(x, y, ids, test_fraction=0.25, seed=2,
                               store=str(tmp_path / "s"))
  for st, dev in zip(stores, device):
    for a, b in zip(jax.tree.leaves(st.to_federated_data()), jax.tree.leaves(dev)):
      np.testing.assert_array_equal(a, b)
  assert stores[0].feature_shape == (3, 2)


def test_from_leaf_store(tmp_path):
  rs = np.random.RandomState(1)
  users = [f"u{i}" for i in range(7)]
  xs = [rs.normal(size=(rs.randint(2, 9), 4)).astype(np.float32) for _ in users]
  ys = [rs.randint(0, 5, len(x)) for x in xs]
  fp.data.write_leaf(str(tmp_path / "train.json"), users, xs, ys)
  fp.data.write_leaf(str(tmp_path / "test.json"), users[::-1], xs[::-1], ys[::-1])
  device = fp.data.from_leaf(str(tmp_path / "train.json"), str(tmp_path / "test.json"))
  stores = fp.data.from_leaf(str(tmp_path / "train.json"), str(tmp_path / "test.json"),
                             store=str(tmp_path / "s"))
  assert_same(stores, device, "leaf")


def test_shakespeare_store_and_header(tmp_path):
  path = write(tmp_path, PLAY)
  device = fp.data.shakespeare(path, min_chars=6, seq_len=4, test_fraction=0.25)
  stores = fp.data.shakespeare(path, min_chars=6, seq_len=4, test_fraction=0.25,
                               store=str(tmp_path / "s"))
  assert_same(stores, device, "shakespeare")
  with open(os.path.join(tmp_path, "s", "train", "header.json")) as f:
    head = json.load(f)
  assert head["x_dtype"] == "int32" and head["source"]["seq_len"] == 4
  with pytest.raises(ValueError, match="already holds train and test stores"):
    fp.data.shakespeare(path, min_chars=6, seq_len=4, store=str(tmp_path / "s"))


@needs_text
def test_shared_shakespeare_store(tmp_path):
  kw = dict(min_chars=2000, seq_len=20, stride=7, max_clients=12)
  device = fp.data.shakespeare(SHARED_TEXT, **kw)
  stores = fp.data.shakespeare(SHARED_TEXT, store=str(tmp_path / "s"), **kw)
  assert_same(stores, device, "shakespeare")


def test_a_failing_loader_leaves_no_sealed_store(tmp_path):
  """A client that fails its check mid-way: neither split is sealed, so it cannot be
  opened as if complete."""
  x = np.zeros((6, 2), np.float32)
  x[4] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    fp.data.from_arrays(x, np.zeros(6, int), [0, 0, 1, 1, 2, 2], test_fraction=0.5,
                        store=str(tmp_path / "s"))
  assert not fp.data.store_exists(str(tmp_path / "s"))
  with pytest.raises(ValueError, match="never sealed"):
    fp.data.open_store(str(tmp_path / "s" / "train"))
