"""Evaluation on every client's real examples, from a padded, a capped and a hand-built
store, against NumPy; and the per-client summaries by hand."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import cross_entropy

import fedjax_pers as fp
from fedjax_pers.core import _evaluate

SIZES = (3, 7, 1, 5)


def stores():
  """The same four clients as a padded store (two slots of padding past the largest
  client, filled with values a leak would show), and as a capped one."""
  rs = np.random.RandomState(0)
  xs = [rs.normal(size=(n, 4)).astype(np.float32) for n in SIZES]
  ys = [rs.randint(0, 3, n) for n in SIZES]
  padded = fp.FederatedData.from_clients(xs, ys, num_classes=3, max_examples=9)
  slot = np.arange(9)[None, :] >= np.asarray(SIZES)[:, None]
  padded = dataclasses.replace(padded, x=jnp.where(slot[..., None], 1e3, padded.x),
                               y=jnp.where(slot, 2, padded.y))
  return xs, ys, padded, padded.with_cap(2)


def by_numpy(model, params, xs, ys):
  loss, acc = [], []
  for x, y in zip(xs, ys):
    z = np.asarray(model.apply(params, jnp.asarray(x)), np.float64)
    loss.append(np.mean(cross_entropy(z, y)))
    acc.append(np.mean(z.argmax(-1) == y))
  return np.array(loss), np.array(acc)


@pytest.mark.parametrize("batch", [1024, 4, 5])
def test_evaluate_reads_every_real_example_once(batch, monkeypatch):
  monkeypatch.setattr(_evaluate, "EVAL_BATCH", batch)
  xs, ys, padded, capped = stores()
  model = fp.models.logistic_regression((4,), 3)
  params = jax.tree.map(lambda p: p + 0.3, model.init(jax.random.key(1)))
  loss, acc = by_numpy(model, params, xs, ys)
  bare = dataclasses.replace(padded, host_sizes=None)     # sizes unknown on the host
  evaluate = lambda d, c=None: jax.jit(   # jittable: sizes are static metadata
      lambda p, d: fp.core.evaluate(model, p, d, client_chunk=c))(params, d)
  runs = [evaluate(padded), evaluate(capped)] + [evaluate(bare, c) for c in (None, 1, 3)]
  for ev in runs:
    np.testing.assert_allclose(ev.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(ev.accuracy, acc, rtol=1e-6)
    np.testing.assert_array_equal(ev.num_examples, SIZES)
    assert ev.loss.dtype == ev.accuracy.dtype == jnp.float32


def test_evaluate_gives_a_hand_built_empty_client_zeros():
  _, _, padded, _ = stores()
  model = fp.models.logistic_regression((4,), 3)
  bare = dataclasses.replace(padded, host_sizes=None,
                             num_examples=padded.num_examples.at[2].set(0))
  ev = fp.core.evaluate(model, model.init(jax.random.key(1)), bare)
  assert float(ev.loss[2]) == float(ev.accuracy[2]) == 0.0


def test_evaluate_refuses_a_gathered_cohort():
  _, _, padded, _ = stores()
  model = fp.models.logistic_regression((4,), 3)
  with pytest.raises(ValueError, match="^" + re.escape(
      "evaluate: data is one round's gathered cohort (window set); evaluate a host store "
      "with fedjax_pers.data.evaluate_store.") + "$"):
    fp.core.evaluate(model, model.init(jax.random.key(0)),
                     dataclasses.replace(padded, window=jnp.arange(2)))


def test_summarize_and_worst_fraction_by_hand():
  ev = fp.core.ClientEval(loss=np.float32([2.0, 1.0, 0.5, 4.0]),
                          accuracy=np.float32([0.5, 1.0, 0.25, 0.75]),
                          num_examples=np.int32([2, 1, 4, 3]))
  s = fp.core.summarize(ev, prefix="val")
  assert s == {
      "val_accuracy": (2 * 0.5 + 1 + 4 * 0.25 + 3 * 0.75) / 10,
      "val_loss": (2 * 2 + 1 + 4 * 0.5 + 3 * 4) / 10,
      "mean_client_val_accuracy": 2.5 / 4,
      "worst10_client_val_accuracy": 0.25,            # ⌈0.1 · 4⌉ = 1 client
      "variance_client_val_accuracy": np.var([0.5, 1.0, 0.25, 0.75]),
      "per_client_val_accuracy": [0.5, 1.0, 0.25, 0.75]}
  assert set(fp.core.summarize(ev)) == {k.replace("val", "test") for k in s}
  worst = fp.core.worst_fraction_mean
  assert worst([5, 1, 3, 2], 0.5) == 1.5 and worst([5, 1, 3, 2], 0.75) == 2.0
  assert worst([5, 1, 3, 2], 0.0) == 1.0 and worst([5, 1, 3, 2], 1.0) == 2.75
  assert worst([3, 1]) == 1.0                          # the default 10%: at least one
  assert worst(np.float32([0.1, 0.7]), 1.0) == pytest.approx(0.4, abs=1e-7)


def test_summaries_are_computed_in_float64():
  """A float32 sum of 1 + 2⁻²⁴ rounds to 1: the summaries read float32 evaluations
  and sum in float64, and keep six digits per client."""
  tiny = 2.0**-24
  assert fp.core.worst_fraction_mean(np.float32([1.0, tiny]), 1.0) == 0.5 + tiny / 2
  ev = fp.core.ClientEval(loss=np.float32([1.0, tiny, 1 / 3]),
                          accuracy=np.float32([1.0, tiny, 1 / 3]),
                          num_examples=np.int32([1, 1, 0]))
  s = fp.core.summarize(ev)
  acc = np.float64(np.float32([1.0, tiny, 1 / 3]))
  assert s["test_accuracy"] == s["test_loss"] == 0.5 + tiny / 2
  assert s["mean_client_test_accuracy"] == acc.mean()
  assert s["variance_client_test_accuracy"] == acc.var()
  assert s["worst10_client_test_accuracy"] == tiny
  assert s["per_client_test_accuracy"] == [1.0, 0.0, 0.333333]
