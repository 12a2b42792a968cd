"""Data in the files users already have: MNIST's IDX format."""

from __future__ import annotations

import gzip
import os

import numpy as np

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
