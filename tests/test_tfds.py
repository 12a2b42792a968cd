"""`from_tfds`: fails fast when nothing is prepared, reads a TFDS folder prepared here
(from the shared MNIST files, through tensorflow-datasets' own writer), and runs under
`tfds.testing.mock_data`."""

import os
import time

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import fedjax_pers as fp

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
needs_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARED_MNIST, "t10k-images-idx3-ubyte.gz")),
    reason="../shared/data/mnist (the MNIST test images) is absent")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "tiny_shakespeare"])
def test_not_prepared_fails_fast_with_the_command(tmp_path, name):
  empty = str(tmp_path / "tfds")
  t0 = time.perf_counter()
  with pytest.raises(FileNotFoundError) as err:
    fp.data.from_tfds(name, data_dir=empty)
  elapsed = time.perf_counter() - t0
  assert elapsed < 10.0, elapsed
  msg = str(err.value)
  assert "not prepared" in msg and empty in msg
  assert f"tfds build {name} --data_dir={empty}" in msg
  assert "download_and_prepare(file_format='array_record')" in msg
  assert "fedjax_pers[tf]" in msg


def test_unknown_name_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="not a TFDS data set"):
    fp.data.from_tfds("no_such_data_set_xyz", data_dir=str(tmp_path))


def _mnist_builder(images, labels, image_feature):
  """A builder registered under no name but called `mnist` (same version as TFDS's own),
  writing the given images with tensorflow-datasets' own writer."""
  version = tfds.builder("mnist").version
  with tfds.core.registered.skip_registration():

    class Mnist(tfds.core.GeneratorBasedBuilder):
      VERSION = version

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": image_feature, "label": tfds.features.ClassLabel(num_classes=10)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        import PIL.Image
        for i in range(len(labels)):
          img = images[i]
          if isinstance(image_feature, tfds.features.Image):
            img = PIL.Image.fromarray(img[..., 0])   # PNG by PIL: no TensorFlow needed
          yield i, {"image": img, "label": int(labels[i])}

  return Mnist


def _sorted(x, y):
  order = np.lexsort(np.concatenate([x.reshape(len(x), -1).T, y[None]], 0))
  return x[order], y[order]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  """MNIST's test split prepared as `tfds build mnist` lays it out (Image features)."""
  if not os.path.exists(os.path.join(SHARED_MNIST, "t10k-images-idx3-ubyte.gz")):
    pytest.skip("../shared/data/mnist (the MNIST test images) is absent")
  x, y = fp.data.mnist_idx(SHARED_MNIST)
  raw = np.round(x * 255).astype(np.uint8)
  d = str(tmp_path_factory.mktemp("tfds"))
  builder = _mnist_builder(raw, y, tfds.features.Image(shape=(28, 28, 1)))(data_dir=d)
  builder.download_and_prepare(file_format="array_record")
  return d, x, y


@needs_mnist
def test_reads_prepared_mnist_equal_to_the_idx_files(mnist_dir):
  d, x, y = mnist_dir
  x2, y2, num_classes = fp.data.tfds_image_arrays("mnist", split="test", data_dir=d)
  assert num_classes == 10 and x2.dtype == np.float32 and x2.shape == x.shape
  # TFDS shuffles examples when writing: compare as sets of (image, label) rows.
  for a, b in zip(_sorted(x2, y2), _sorted(x, y)):
    np.testing.assert_array_equal(a, b)
  train, test = fp.data.from_tfds("mnist", split="test", data_dir=d, num_clients=100)
  assert train.num_clients == test.num_clients == 100
  assert int(train.num_examples.sum() + test.num_examples.sum()) == 10_000
  xs = np.concatenate([train.client(c)[0] for c in range(100)]
                      + [test.client(c)[0] for c in range(100)])
  ys = np.concatenate([train.client(c)[1] for c in range(100)]
                      + [test.client(c)[1] for c in range(100)])
  for a, b in zip(_sorted(xs, ys), _sorted(x, y)):
    np.testing.assert_array_equal(a, b)


@needs_mnist
def test_dirichlet_partition_through_from_tfds(mnist_dir):
  d, _, _ = mnist_dir
  train, _ = fp.data.from_tfds("mnist", split="test", data_dir=d, num_clients=20,
                               partition="dirichlet", alpha=0.1, min_client_examples=5)
  dominant = [np.bincount(train.client(c)[1], minlength=10).max() / train.num_examples[c]
              for c in range(20)]
  assert np.median(dominant) > 0.5     # strong label skew


@needs_mnist
def test_reads_tensor_features_written_by_another_builder(tmp_path):
  """Files written with other features than TFDS's `mnist` code (here raw uint8 tensors)
  are read with the features they were written with (`builder_from_directory`)."""
  x, y = fp.data.mnist_idx(SHARED_MNIST)
  raw = np.round(x[:500] * 255).astype(np.uint8)
  feature = tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8)
  _mnist_builder(raw, y[:500], feature)(data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record")
  x2, y2, _ = fp.data.tfds_image_arrays("mnist", split="test", data_dir=str(tmp_path))
  for a, b in zip(_sorted(x2, y2), _sorted(x[:500], y[:500])):
    np.testing.assert_array_equal(a, b)


@needs_mnist
def test_whole_loader_under_mock_data(mnist_dir):
  """`mock_data` with `MockPolicy.USE_FILES` and the prepared metadata (what runs without
  TensorFlow: the data_source mock serves random examples of the declared features)."""
  d, _, _ = mnist_dir
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=d):
    train, test = fp.data.from_tfds("mnist", split="test", data_dir=d, num_clients=6)
  assert train.num_clients == 6 and train.feature_shape == (28, 28, 1)
  assert int(train.num_examples.sum() + test.num_examples.sum()) == 60
  assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0
  assert int(train.y.max()) < 10


@needs_mnist
def test_from_tfds_writes_a_store_equal_to_its_device_data(mnist_dir, tmp_path):
  d, _, _ = mnist_dir
  kw = dict(split="test", data_dir=d, num_clients=30, partition="dirichlet", alpha=0.3,
            min_client_examples=5)
  device = fp.data.from_tfds("mnist", **kw)
  stores = fp.data.from_tfds("mnist", store=str(tmp_path / "s"), **kw)
  for dev, st in zip(device, stores):
    assert st.source["loader"] == "tfds" and st.source["partition"] == "dirichlet"
    for a, b in zip(jax.tree.leaves(st.to_federated_data()), jax.tree.leaves(dev)):
      np.testing.assert_array_equal(a, b)
