"""The public surface imports and holds only what is meant."""

import doctest

import fedjax_pers as fp
from fedjax_pers import aggregation, algorithms, core, data, models, personalization, privacy


def test_surfaces():
  assert set(algorithms.__all__) == {
      "apfl", "ditto", "fedala", "fedavg", "fedbabu", "fedbn", "fedbuff", "feddyn", "fednova",
      "fedper", "fedprox", "fedrep", "fedrod", "ifca", "lg_fedavg", "moon", "per_fedavg",
      "pfedhn", "pfedme", "reptile", "scaffold"}
  assert {"personalize", "evaluate_personal", "meta_gradient", "hvp"} <= set(
      personalization.__all__)
  assert {"hypergradient", "unrolled_objective"} <= set(dir(fp.hypergrad))
  assert set(fp.sweep.__all__) == {"stack", "take", "rounds", "dispatched", "choose",
                                   "available_memory", "interval"}
  assert set(models.__all__) == {"char_rnn", "cnn", "cnn_bn", "logistic_regression", "mlp"}
  assert {"from_tfds", "from_arrays", "shakespeare", "partition", "mnist_idx"} <= set(
      data.__all__)
  assert {"num_examples", "uniform", "WeightFn"} <= set(aggregation.__all__)
  assert {"epsilon", "calibrate_noise", "dp_fedavg_aggregator", "local_epsilon", "compressed",
          "secure_aggregator"} <= set(privacy.__all__)
  for mod in (fp, aggregation, algorithms, core, data, models, personalization, privacy):
    for name in mod.__all__:
      assert hasattr(mod, name), (mod.__name__, name)
      assert not name.startswith("_")


def test_docstring_examples_run():
  from fedjax_pers.aggregation import _weights
  from fedjax_pers.core import _model
  for mod in (_weights, _model):
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, mod.__name__
