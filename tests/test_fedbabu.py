"""FedBABU: the head is bitwise unchanged by federated training, the body learns as FedAvg's
would with that head, personalization by fine-tuning from the config."""

import functools

import jax
import numpy as np
import optax
import pytest
from test_engine import small_data
from test_experiment import tiny_config

import fedjax_pers as fp
from fedjax_pers.algorithms import fedavg, fedbabu
from fedjax_pers.experiment import train_and_evaluate


@functools.cache
def data():   # built at first use: a test module's import starts no JAX backend
  return small_data(num_clients=6)

MODEL = fp.models.mlp((5,), 3, hidden=(4,))


def test_the_head_is_bitwise_unchanged_by_federated_training():
  """Three rounds with an adaptive server optimizer (whose state would move a zero update)."""
  alg = fedbabu(MODEL, optax.sgd(0.1), optax.adam(0.05), fp.LocalWork(3, epochs=2),
                clients_per_round=3)
  s0 = alg.init(jax.random.key(0), data())
  state, step = s0, jax.jit(alg.round)
  for _ in range(3):
    state, _ = step(state, data())
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(state.params["Dense_1"][k], s0.params["Dense_1"][k])
    assert not np.array_equal(state.params["Dense_0"][k], s0.params["Dense_0"][k])
  assert step._cache_size() == 1


def test_one_step_of_the_body_is_fedavg_s():
  """One local step from the same start: the body's gradient does not depend on whether the
  head will move, so FedBABU's body equals FedAvg's after one step; the head differs."""
  work = fp.LocalWork(3, steps=1)
  a = fedbabu(MODEL, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)
  b = fedavg(MODEL, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)
  sa, _ = jax.jit(a.round)(a.init(jax.random.key(1), data()), data())
  sb, _ = jax.jit(b.round)(b.init(jax.random.key(1), data()), data())
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(sa.params["Dense_0"][k], sb.params["Dense_0"][k], rtol=1e-6,
                               atol=1e-7)
  assert not np.allclose(sa.params["Dense_1"]["kernel"], sb.params["Dense_1"]["kernel"])


@pytest.mark.run
def test_fedbabu_from_the_config(tmp_path):
  c = tiny_config()
  c.algorithm = "fedbabu"
  c.model.name = "mlp"
  c.model.hidden = (8,)
  c.personalization.finetune_steps = 2
  s = train_and_evaluate(c, str(tmp_path / "run"))
  assert "personalized_test_accuracy" in s and s["rounds"] == 4


def test_fedbabu_refuses_a_head_that_covers_every_parameter():
  with pytest.raises(ValueError, match=r"^fedbabu: the head covers every parameter, so nothing "
                     r"would be trained; use a model with a body \(mlp, cnn\) or a narrower "
                     r"head predicate.$"):
    fedbabu(fp.models.logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
            fp.LocalWork(3, steps=1), clients_per_round=1)


def test_a_head_predicate_is_the_head():
  """`head=` names the frozen layers (here the first one; by default the last)."""
  alg = fedbabu(MODEL, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=1),
                clients_per_round=3, head=lambda path: "Dense_0" in path)
  s0 = alg.init(jax.random.key(0), data())
  s1, _ = jax.jit(alg.round)(s0, data())
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(s1.params["Dense_0"][k], s0.params["Dense_0"][k])
    assert not np.array_equal(s1.params["Dense_1"][k], s0.params["Dense_1"][k])


def test_both_sides_freeze_the_head():
  """Clients send a zero head update (a plain server leaves the head alone), and the server
  ignores whatever reaches it (DP noise on the aggregate cannot move the head)."""
  from fedjax_pers import privacy
  from fedjax_pers.algorithms._fedbabu import frozen
  from fedjax_pers.personalization._layers import last_layer

  template = jax.eval_shape(MODEL.init, jax.random.key(0))
  tx = frozen(optax.sgd(0.1), template, last_layer(template))
  plain_server = fedavg(MODEL, tx, optax.sgd(1.0), fp.LocalWork(3, epochs=2),
                        clients_per_round=3)
  noisy = fedbabu(MODEL, optax.sgd(0.1), optax.sgd(1.0), fp.LocalWork(3, epochs=2),
                  clients_per_round=3,
                  weighting=privacy.dp_fedavg_aggregator(1.0, 1.0, 3.0, jax.random.key(5)))
  for alg in (plain_server, noisy):
    s0 = alg.init(jax.random.key(2), data())
    s1, _ = jax.jit(alg.round)(s0, data())
    np.testing.assert_array_equal(s1.params["Dense_1"]["kernel"], s0.params["Dense_1"]["kernel"])
    assert not np.array_equal(s1.params["Dense_0"]["kernel"], s0.params["Dense_0"]["kernel"])


def test_the_body_trains_against_the_fixed_head():
  """Several local steps: FedBABU is FedAvg with head-frozen clients (not FedAvg's body)."""
  from fedjax_pers.algorithms._fedbabu import frozen
  from fedjax_pers.personalization._layers import last_layer

  template = jax.eval_shape(MODEL.init, jax.random.key(0))
  work = fp.LocalWork(3, epochs=3)
  runs = []
  for alg in (fedbabu(MODEL, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3),
              fedavg(MODEL, frozen(optax.sgd(0.1), template, last_layer(template)),
                     optax.sgd(1.0), work, clients_per_round=3),
              fedavg(MODEL, optax.sgd(0.1), optax.sgd(1.0), work, clients_per_round=3)):
    s = alg.init(jax.random.key(3), data())
    for _ in range(2):
      s, _ = jax.jit(alg.round)(s, data())
    runs.append(np.asarray(s.params["Dense_0"]["kernel"]))
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=1e-7)
  assert np.abs(runs[0] - runs[2]).max() > 1e-4
