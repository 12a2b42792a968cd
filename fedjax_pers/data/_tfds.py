"""Data sets prepared by TensorFlow Datasets, read without TensorFlow and never downloaded."""

from __future__ import annotations

import json
import os

import numpy as np

from fedjax_pers.data._partition import partition as make_partition
from fedjax_pers.data._partition import split_clients
from fedjax_pers.data._shakespeare import VOCAB_SIZE, shakespeare_from_text

# The image classification sets `from_tfds` is meant for; others with `image` and `label`
# features work too. Text sets are federated by speaking role.
IMAGE_SETS = ("mnist", "fashion_mnist", "emnist", "cifar10", "cifar100")
TEXT_SETS = ("tiny_shakespeare",)


def _prepare_hint(name: str, root: str) -> str:
  return (
      f"fedjax_pers never downloads. On a machine with network access, prepare it with\n"
      f"  tfds build {name} --data_dir={root} --file_format=array_record\n"
      f"or in Python\n"
      f"  import tensorflow_datasets as tfds\n"
      f"  tfds.builder({name!r}, data_dir={root!r}).download_and_prepare("
      f"file_format='array_record')\n"
      f"(preparing needs TensorFlow: pip install 'fedjax_pers[tf]'; reading array_record "
      f"files does not), then copy {root!r} here and pass it as data_dir.")


def prepared_builder(name: str, data_dir: str | None = None):
  """The TFDS builder that reads data set `name` as prepared in `data_dir`.

  Checks that `name` is prepared there without downloading anything. When the
  prepared `features.json` declares the features of the registered builder's
  code, that builder reads it; otherwise `tfds.builder_from_directory` reads the
  files with the features they were written with (e.g. `tfds.features.Tensor`).

  Args:
    name: TFDS name, optionally with config and version (`emnist/balanced`,
      `mnist:3.0.1`).
    data_dir: TFDS data folder; None: TFDS's default (`$TFDS_DATA_DIR`, else
      `~/tensorflow_datasets`).

  Returns:
    A read-only `tfds.core.DatasetBuilder`.

  Raises:
    ValueError: `name` is not a TFDS data set.
    FileNotFoundError: It is not prepared in `data_dir`; the message says where it
      looked and the command that prepares it.
  """
  import tensorflow_datasets as tfds

  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty TFDS data set name; got {name!r}.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"{name!r} is not a TFDS data set (tensorflow-datasets "
                     f"{tfds.__version__} does not know it).") from e
  root = os.fspath(builder.data_dir_root)
  if not builder.is_prepared():
    where = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
    raise FileNotFoundError(
        f"TFDS data set {name!r} is not prepared in data_dir {root!r}"
        f"{' (the TFDS default)' if data_dir is None else ''}: there is no {where!r}.\n"
        + _prepare_hint(name.split(":")[0], root))
  if _features_match(builder):
    return builder
  # Written with other features than this TFDS version's code declares (an older
  # version, or a builder of the same name of one's own): read them as written.
  return tfds.builder_from_directory(os.fspath(builder.data_dir))


def _features_match(builder) -> bool:
  """Whether the prepared `features.json` declares the builder's own features."""
  import tensorflow_datasets as tfds
  from etils import epath

  try:
    disk = json.loads((epath.Path(builder.data_dir) / "features.json").read_text())
    disk = tfds.features.FeatureConnector.from_json(disk)
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return disk.to_json() == builder.info.features.to_json()


def tfds_examples(name: str, *, split: str = "train", data_dir: str | None = None
                  ) -> dict[str, np.ndarray]:
  """Every example of a prepared TFDS split as NumPy arrays, one per feature.

  Reads array_record files through `tfds.data_source` machinery (no TensorFlow);
  data prepared in another file format needs TensorFlow (`fedjax_pers[tf]`).

  Args:
    name: TFDS name (see `prepared_builder`).
    split: Split, e.g. `train`, `test`, `train+test`, `train[:10%]`.
    data_dir: TFDS data folder (None: TFDS's default).

  Returns:
    `{feature: [n, ...] array}`; text features as Python `str` objects.
  """
  reader = prepared_builder(name, data_dir)
  fmt = str(getattr(reader.info.file_format, "value", reader.info.file_format))
  if fmt != "array_record":
    try:
      import tensorflow  # noqa: F401
    except ImportError as e:
      raise ValueError(
          f"TFDS data set {name!r} in {os.fspath(reader.data_dir)!r} is stored as {fmt!r}; "
          "reading it needs TensorFlow (pip install 'fedjax_pers[tf]'), or prepare it again "
          "with file_format='array_record'.") from e
    import tensorflow_datasets as tfds
    ds = tfds.as_numpy(reader.as_dataset(split=split, batch_size=-1))
    return {k: _text(v) for k, v in ds.items()}
  source = reader.as_data_source(split=split)
  # One example at a time (as fast as `__getitems__` here, and the form that
  # `tfds.testing.mock_data` also serves).
  rows = [source[i] for i in range(len(source))]
  if not rows:
    raise ValueError(f"split {split!r} of {name!r} is empty.")
  return {k: _text(np.stack([np.asarray(r[k]) for r in rows])) for k in rows[0]}


def _text(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind in "SO" and a.size and isinstance(a.flat[0], bytes):
    return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(a)
  return a


def from_tfds(
    name: str,
    *,
    split: str = "train",
    partition: str | None = None,
    num_clients: int = 100,
    data_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    min_client_examples: int = 2,
    min_chars: int = 1000,
    seq_len: int = 80,
    stride: int = 1,
    store: str | None = None,
):
  """A prepared TFDS data set as train and test `FederatedData` (no download, no TF).

  Image sets (`mnist`, `fashion_mnist`, `emnist[/config]`, `cifar10`, `cifar100`, or
  any with `image` and `label` features): pixels become float32 in [0, 1] (shape
  `[H, W, C]` as stored), labels int32 (`cifar100`: the 100 fine labels). The
  examples of `split` are dealt to `num_clients` clients by `partition` (None or
  `iid`: IID; `dirichlet` with `alpha`; `shards` with `shards_per_client`;
  `quantity_skew` with `sigma`; `min_client_examples` for the last two and
  dirichlet), then each client's examples are split into train and test as
  `split_clients` does with `test_fraction`.

  `tiny_shakespeare`: the train, validation and test texts, concatenated (the
  whole play text), are cut into roles as `shakespeare` does (`min_chars`,
  `seq_len`, `stride`, `test_fraction`); `split`, `partition` and `num_clients`
  do not apply.

  Args:
    name: TFDS name.
    split: Which examples to federate (image sets).
    partition: Partition scheme (None: IID).
    num_clients: Clients (image sets).
    data_dir: TFDS data folder (None: TFDS's default).
    seed: Seed of the partition and of the train/test split.
    test_fraction: Share of each client's examples in its test split.
    alpha: Dirichlet concentration.
    shards_per_client: Shards per client.
    sigma: Lognormal σ of quantity skew.
    min_client_examples: Smallest client of `dirichlet` / `quantity_skew`.
    min_chars: Smallest role (tiny_shakespeare).
    seq_len: Input characters (tiny_shakespeare).
    stride: Keep every stride-th example (tiny_shakespeare).
    store: None, or a directory to write the splits to as host stores, a chunk
      of clients at a time (`federate`; the examples of `split` are read into
      memory once, the padded population is never built).

  Returns:
    `(train, test)` (`HostStore`s with `store`).

  Raises:
    FileNotFoundError: The data set is not prepared in `data_dir` (raised in well
      under a second, with the command that prepares it).
  """
  base = name.split(":")[0].split("/")[0]
  source = dict(loader="tfds", name=name, split=split, partition=partition,
                num_clients=num_clients, seed=seed, test_fraction=test_fraction, alpha=alpha,
                shards_per_client=shards_per_client, sigma=sigma,
                min_client_examples=min_client_examples, min_chars=min_chars,
                seq_len=seq_len, stride=stride)
  if base in TEXT_SETS:
    if partition not in (None, "natural"):
      raise ValueError(f"{name!r} is federated by speaking role; partition must be None; "
                       f"got {partition!r}.")
    if split != "train" or num_clients != 100:
      raise ValueError(f"{name!r} is federated by speaking role over the whole text: split "
                       f"and num_clients do not apply (use min_chars); got split={split!r}, "
                       f"num_clients={num_clients!r}.")
    text = "".join(
        "".join(tfds_examples(name, split=s, data_dir=data_dir)["text"].tolist())
        for s in ("train", "validation", "test"))
    train, test, _ = shakespeare_from_text(text, min_chars=min_chars, seq_len=seq_len,
                                           test_fraction=test_fraction, stride=stride,
                                           store=store, source=source)
    assert train.num_classes == VOCAB_SIZE
    return train, test
  x, y, num_classes = tfds_image_arrays(name, split=split, data_dir=data_dir)
  parts = make_partition(y, num_clients, partition or "iid", seed=seed, alpha=alpha,
                         shards_per_client=shards_per_client, sigma=sigma,
                         min_size=min_client_examples)
  return split_clients(x, y, parts, test_fraction=test_fraction, num_classes=num_classes,
                       seed=seed, store=store, source=source)


def tfds_image_arrays(name: str, *, split: str = "train", data_dir: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
  """`(x, y, num_classes)` of a prepared TFDS image classification split.

  `x` is float32 `[n, H, W, C]` (integer pixels divided by their dtype's maximum,
  so uint8 images land in [0, 1]); `y` int32 `[n]`.
  """
  reader = prepared_builder(name, data_dir)
  features = reader.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"{name!r} has features {sorted(features)}; from_tfds reads image "
                     "classification sets with 'image' and 'label' features.")
  ex = tfds_examples(name, split=split, data_dir=data_dir)
  x, y = ex["image"], ex["label"]
  if np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
  x = x.astype(np.float32)
  label = features["label"]
  num_classes = int(label.num_classes) if hasattr(label, "num_classes") else int(y.max()) + 1
  return x, y.astype(np.int32), num_classes
