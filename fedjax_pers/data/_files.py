"""Data in the files users already have: MNIST's IDX format and LEAF's JSON."""

from __future__ import annotations

import glob
import gzip
import json
import os

import numpy as np

from fedjax_pers.data._sink import federate

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (`*-idx3-ubyte`, optionally `.gz`), the format MNIST ships in.

  The header is two zero bytes, a type code, the number of dimensions d, then d
  big-endian uint32 sizes; the data follow in C order.

  Args:
    path: The file.

  Returns:
    The array, in the file's dtype (native byte order).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"IDX file not found: {path!r}.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
    raise ValueError(f"{path!r} is not an IDX file (bad magic number {raw[:4]!r}).")
  ndim = raw[3]
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_TYPES[raw[2]])
  offset = 4 + 4 * ndim
  expected = offset + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f"{path!r}: header says shape {shape} ({expected} bytes), file has "
                     f"{len(raw)} bytes.")
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_idx(data_dir: str, images: str = "t10k-images-idx3-ubyte.gz",
              labels: str = "t10k-labels-idx1-ubyte.gz") -> tuple[np.ndarray, np.ndarray]:
  """MNIST from its IDX files: `x [n, 28, 28, 1]` float32 in [0, 1], `y [n]` int32.

  Args:
    data_dir: Folder holding the files.
    images: Image file name (the test split by default; `train-images-idx3-ubyte.gz`
      for the training split).
    labels: Label file name.
  """
  x = read_idx(os.path.join(data_dir, images))
  y = read_idx(os.path.join(data_dir, labels))
  if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"MNIST images {x.shape} and labels {y.shape} do not match in "
                     f"{data_dir!r}.")
  return (x[..., None].astype(np.float32) / 255.0), y.astype(np.int32)


def write_leaf(path: str, users: list[str], xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
  """Writes clients in LEAF's JSON format (`users`, `num_samples`, `user_data`).

  The format LEAF, FedProx and pFedMe store their generated data sets in:
  `user_data[u] = {"x": [[features], ...], "y": [labels]}`.
  """
  if not len(users) == len(xs) == len(ys):
    raise ValueError(f"users, xs and ys must have one entry per client; got {len(users)}, "
                     f"{len(xs)} and {len(ys)}.")
  doc = {"users": list(users), "num_samples": [int(len(y)) for y in ys],
         "user_data": {u: {"x": np.asarray(x).tolist(), "y": np.asarray(y).tolist()}
                       for u, x, y in zip(users, xs, ys)}}
  with open(path, "w") as f:
    json.dump(doc, f)


def read_leaf(path: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
  """Reads LEAF JSON: one file, or every `*.json` in a folder (users concatenated).

  Returns:
    `(users, xs, ys)` with `xs[i]` float32 `[n_i, ...]` and `ys[i]` int32 `[n_i]`.
  """
  files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
  if not files or not all(os.path.exists(f) for f in files):
    raise FileNotFoundError(f"No LEAF JSON file at {path!r}.")
  users, xs, ys = [], [], []
  for name in files:
    with open(name) as f:
      doc = json.load(f)
    missing = {"users", "user_data"} - set(doc)
    if missing:
      raise ValueError(f"{name!r} is not LEAF JSON: missing {sorted(missing)}.")
    for i, u in enumerate(doc["users"]):
      d = doc["user_data"][u]
      x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32)
      if "num_samples" in doc and doc["num_samples"][i] != len(y):
        raise ValueError(f"{name!r}: user {u!r} has {len(y)} samples, num_samples says "
                         f"{doc['num_samples'][i]}.")
      users.append(u)
      xs.append(x)
      ys.append(y)
  return users, xs, ys


def from_leaf(train_path: str, test_path: str, num_classes: int | None = None, *,
              store: str | None = None):
  """Train and test `FederatedData` from LEAF JSON, clients matched by user name.

  With `store`, they are written to `store/train` and `store/test` a chunk of
  users at a time and returned as `HostStore`s (`federate`).
  """
  tr_users, tr_x, tr_y = read_leaf(train_path)
  te_users, te_x, te_y = read_leaf(test_path)
  if set(tr_users) != set(te_users):
    odd = sorted(set(tr_users) ^ set(te_users))
    raise ValueError(f"train and test hold different users, e.g. {odd[:5]}.")
  where = {u: i for i, u in enumerate(te_users)}
  order = [where[u] for u in tr_users]
  if num_classes is None:
    num_classes = int(max(max(y.max(initial=0) for y in tr_y),
                          max(y.max(initial=0) for y in te_y))) + 1
  clients = ((tr_x[c], tr_y[c], te_x[i], te_y[i]) for c, i in enumerate(order))
  source = dict(loader="leaf", train_path=os.path.abspath(train_path),
                test_path=os.path.abspath(test_path), num_classes=num_classes)
  return federate(clients, num_classes=num_classes, store=store, source=source)
