"""Sharding the cohort over a `clients` mesh agrees with the single-device round."""

import jax
import numpy as np
import optax
import pytest
from test_engine import make_alg, run, small_data

import fedjax_pers as fp


@pytest.fixture(autouse=True)
def four_devices():   # asked at run time: importing a test module starts no JAX backend
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (conftest sets 4 fake CPU devices)")


@pytest.mark.parametrize("strategy,chunk", [("vmap", None), ("chunked", 2), ("scan", None)])
@pytest.mark.parametrize("devices,k", [(2, 4), (4, 5), (3, 8)])
def test_sharded_round_matches_single_device(strategy, chunk, devices, k):
  data = small_data(num_clients=8)
  mesh = fp.distributed.client_mesh(devices)
  single = fp.algorithms.fedavg(
      fp.models.logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
      fp.LocalWork(4, epochs=2), clients_per_round=k,
      execution=fp.Execution(strategy=strategy, client_chunk=chunk))
  sharded = fp.algorithms.fedavg(
      fp.models.logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
      fp.LocalWork(4, epochs=2), clients_per_round=k,
      execution=fp.Execution(strategy=strategy, client_chunk=chunk, mesh=mesh))
  s1, m1 = run(single, data, 2)
  s2, m2 = run(sharded, data, 2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(m1[-1].clients, m2[-1].clients)
  np.testing.assert_allclose(m1[-1].weights, m2[-1].weights, atol=1e-7)
  assert m2[-1].weights.shape == (k,)


def test_sharded_all_clients_and_reference():
  data = small_data(num_clients=8)
  s1, _ = run(make_alg("scan", k=8), data, 1)
  alg = fp.algorithms.fedavg(
      fp.models.logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
      fp.LocalWork(4, epochs=2), clients_per_round=8,
      execution=fp.Execution(strategy="scan", mesh=fp.distributed.client_mesh(4)))
  s2, _ = run(alg, data, 1)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_mesh_arguments():
  with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, 4\]"):
    fp.distributed.client_mesh(9)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with pytest.raises(ValueError, match="axis named 'clients'"):
    fp.algorithms.fedavg(
        fp.models.logistic_regression((5,), 3), optax.sgd(0.1), optax.sgd(1.0),
        fp.LocalWork(4, epochs=1), clients_per_round=2, execution=fp.Execution(mesh=mesh))
