"""Models: shapes, parameter counts, and errors."""

import jax
import jax.numpy as jnp
import pytest

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
