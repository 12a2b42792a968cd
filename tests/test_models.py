"""Models: shapes, parameter counts, and errors."""

import jax
import jax.numpy as jnp
import pytest
from _reference import cross_entropy

import fedjax_pers as fp


def count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_shapes_and_sizes():
  lr = fp.models.logistic_regression((60,), 10)
  assert count(lr.init(jax.random.key(0))) == 610
  mlp = fp.models.mlp((784,), 10, hidden=(200, 200))
  p = mlp.init(jax.random.key(0))
  assert count(p) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
  assert mlp.apply(p, jnp.ones((3, 784))).shape == (3, 10)
  cnn = fp.models.cnn((28, 28), 10, features=(4, 8), dense=16)
  p = cnn.init(jax.random.key(0))
  assert cnn.apply(p, jnp.ones((2, 28, 28))).shape == (2, 10)


def test_loss_and_metrics_are_per_example():
  m = fp.models.logistic_regression((2,), 3)
  logits = jnp.array([[10.0, 0, 0], [0, 0, 10.0]])
  y = jnp.array([0, 1])
  assert m.loss(logits, y).shape == (2,)
  assert list(m.metrics(logits, y)) == [1.0, 0.0]


@pytest.mark.parametrize("fn,args,match", [
    (fp.models.mlp, ((784,), 10, (0,)), "hidden widths"),
    (fp.models.cnn, ((784,), 10), r"\[H, W\]"),
    (fp.models.logistic_regression, ((60,), 1), "num_classes"),
])
def test_bad_arguments(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)


def test_train_reaches_only_modules_that_take_it():
  import flax.linen as nn
  import numpy as np

  from fedjax_pers.core._model import _takes_train

  class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x) * (2.0 if train else 1.0)

  x = jnp.arange(6.0).reshape(2, 3)
  for module, factor in [(Scaled(), 2.0), (nn.Dense(2), 1.0)]:
    m = fp.core.from_flax(module, jnp.zeros((1, 3)))
    p = m.init(jax.random.key(0))
    np.testing.assert_allclose(m.apply(p, x, train=True), factor * m.apply(p, x), rtol=1e-6)

  class Opaque:   # a signature inspect cannot read: no `train`
    def __call__(self, x, train=False):
      return x

  Opaque.__call__.__signature__ = "unreadable"
  assert _takes_train(Scaled()) and not _takes_train(nn.Dense(2)) and not _takes_train(Opaque())


def test_accuracy_and_loss_over_the_last_axis_in_the_logits_dtype():
  import numpy as np

  logits = jnp.asarray(np.random.RandomState(0).normal(size=(2, 3, 4)), jnp.float16)
  y = jnp.int32([[0, 1, 2], [3, 0, 1]])
  acc = fp.core.accuracy(logits, y)
  assert acc.dtype == jnp.float16 and acc.shape == (2, 3)
  np.testing.assert_array_equal(acc, np.argmax(np.asarray(logits), -1) == np.asarray(y))
  np.testing.assert_allclose(fp.core.softmax_cross_entropy(logits, y),
                             cross_entropy(logits, y), rtol=2e-3)


def test_from_flax_against_flax_with_batch_statistics_dropout_and_a_representation():
  """A module's running statistics join its params beside their layer's scale and bias;
  `apply` normalises by them, a training pass by the batch's real rows, and `put`
  writes new statistics back, leaving every other leaf alone; a key is the dropout
  rng; `represent` is the sown layer: each as flax computes it."""
  import flax.linen as nn
  import numpy as np
  from flax.traverse_util import flatten_dict

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, mask=None):
      h = nn.Dense(6)(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(
          h, mask=None if mask is None else mask[:, None])
      h = nn.Dropout(0.5, deterministic=not train)(h)
      self.sow("intermediates", fp.core.REPRESENTATION, h)
      return nn.Dense(2)(h)

  net, key, drop = Net(), jax.random.key(0), jax.random.key(7)
  m = fp.core.from_flax(net, jnp.zeros((1, 4)))
  v = net.init(key, jnp.zeros((1, 4)))
  flat = flatten_dict(m.init(key))
  assert flat.keys() == flatten_dict(v["params"]).keys() | flatten_dict(v["batch_stats"]).keys()
  for k, leaf in {**flatten_dict(v["params"]), **flatten_dict(v["batch_stats"])}.items():
    np.testing.assert_array_equal(flat[k], leaf)
  x = jax.random.normal(jax.random.key(1), (5, 4))
  v = {"params": v["params"], "batch_stats": jax.tree.map(lambda s: s + 0.5, v["batch_stats"])}
  p = m.batch_stats.put(m.init(key), v["batch_stats"])
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  close(m.apply(p, x), net.apply(v, x))
  rngs = {"dropout": drop}
  want, _ = net.apply(v, x, train=True, rngs=rngs, mutable=["batch_stats"])
  close(m.apply(p, x, drop, train=True), want)
  assert not np.allclose(want, net.apply(v, x, train=True, rngs={"dropout": key},
                                         mutable=["batch_stats"])[0])   # the key matters
  mask = jnp.array([True, True, True, False, False])
  logits, new = m.batch_stats.train(p, x, mask, drop)
  want, upd = net.apply(v, x, train=True, mask=mask, rngs=rngs, mutable=["batch_stats"])
  close(logits, want)
  jax.tree.map(np.testing.assert_array_equal, new, upd["batch_stats"])
  put = flatten_dict(m.batch_stats.put(p, new))
  for k, leaf in {**flatten_dict(v["params"]), **flatten_dict(upd["batch_stats"])}.items():
    np.testing.assert_array_equal(put[k], leaf)
  sown = lambda **kw: net.apply(v, x, mutable=["intermediates", "batch_stats"], **kw)[1][
      "intermediates"][fp.core.REPRESENTATION][0]
  close(m.represent(p, x), sown())
  close(m.represent(p, x, drop, train=True), sown(train=True, rngs=rngs))
  assert fp.core.from_flax(nn.Dense(2), jnp.zeros((1, 4))).batch_stats is None
  assert fp.core.from_flax(nn.Dense(2), jnp.zeros((1, 4))).represent is None

  class Drop(nn.Module):   # no statistics: a training `apply` takes the key as well
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dropout(0.5, deterministic=not train)(nn.Dense(6)(x))

  m = fp.core.from_flax(Drop(), jnp.zeros((1, 4)))
  p = m.init(key)
  close(m.apply(p, x, drop, train=True), Drop().apply({"params": p}, x, train=True, rngs=rngs))


def test_from_flax_initialises_with_the_sample_dtype():
  import flax.linen as nn

  m = fp.core.from_flax(nn.Embed(10, 3), jax.ShapeDtypeStruct((1, 6), jnp.int32))
  p = m.init(jax.random.key(0))
  assert m.apply(p, jnp.zeros((2, 6), jnp.int32)).shape == (2, 6, 3)
