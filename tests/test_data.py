"""FederatedData: stacking, padding, and clear errors for bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_pers as fp


def test_from_clients_pads_and_records_sizes():
  xs = [np.ones((3, 2)), 2 * np.ones((1, 2))]
  ys = [np.array([0, 1, 2]), np.array([1])]
  d = fp.FederatedData.from_clients(xs, ys)
  assert d.x.shape == (2, 3, 2) and d.y.shape == (2, 3)
  np.testing.assert_array_equal(d.num_examples, [3, 1])
  assert d.num_classes == 3 and d.min_examples == 1
  np.testing.assert_array_equal(d.x[1, 1:], 0.0)
  x1, y1 = d.client(1)
  np.testing.assert_array_equal(x1, [[2.0, 2.0]])
  np.testing.assert_array_equal(y1, [1])
  assert abs(d.padding_fraction - 2 / 6) < 1e-12


def test_from_clients_by_hand_padded_and_capped():
  """Every stored array by hand: padded rows (features in the dtype asked for, padding
  zero, labels int32, sizes int32 on device and int64 on the host), and a capped flat
  store (each client shuffled once by `default_rng(seed).permutation`, in turn)."""
  rs = np.random.RandomState(0)
  xs = [rs.randint(0, 9, (n, 2)) for n in (4, 1, 3)]
  ys = [np.array([0, 1, 4, 2]), np.array([3]), np.array([1, 1, 0])]
  d = fp.FederatedData.from_clients(xs, ys, max_examples=5, dtype=jnp.int32)
  want_x = np.zeros((3, 5, 2), np.int32)
  want_y = np.zeros((3, 5), np.int32)
  for c, (x, y) in enumerate(zip(xs, ys)):
    want_x[c, :len(x)], want_y[c, :len(y)] = x, y
  for got, want in ((d.x, want_x), (d.y, want_y), (d.num_examples, np.int32([4, 1, 3]))):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert (d.num_classes, d.min_examples, d.cap, d.offsets) == (5, 1, None, None)
  assert d.sizes.dtype == np.int64 and d.sizes.tolist() == [4, 1, 3]
  for seed in (0, 3):
    kw = {} if seed == 0 else {"seed": seed}   # 0 by default
    capped = fp.FederatedData.from_clients(xs, ys, num_classes=6, example_cap=2, **kw)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(y)) for y in ys]
    np.testing.assert_array_equal(capped.x, np.concatenate([x[o] for x, o in zip(xs, orders)]))
    np.testing.assert_array_equal(capped.y, np.concatenate([y[o] for y, o in zip(ys, orders)]))
    assert capped.x.dtype == jnp.float32 and capped.y.dtype == jnp.int32
    np.testing.assert_array_equal(capped.offsets, [0, 4, 5])
    assert capped.offsets.dtype == jnp.int32
    assert (capped.cap, capped.num_classes, capped.min_examples) == (2, 6, 1)
    assert capped.sizes.tolist() == [4, 1, 3]
  big = fp.FederatedData.from_clients(xs[:1] + xs[2:], ys[:1] + ys[2:], example_cap=2)
  assert big.min_examples == 2                            # min(smallest client, cap)
  same = fp.FederatedData.from_clients(xs, ys, example_cap=4)   # nothing to cap
  assert same.cap is None and same.x.shape == (3, 4, 2)


def test_scalar_features_are_a_feature_shape_of_none():
  d = fp.FederatedData.from_clients([np.arange(3.0), np.ones(1)], [np.zeros(3, int), Z2[:1]])
  assert d.feature_shape == () and d.x.shape == (2, 3)
  np.testing.assert_array_equal(d.x, [[0, 1, 2], [1, 0, 0]])


def test_is_a_pytree_with_static_metadata():
  d = fp.FederatedData.from_clients([np.ones((2, 2))], [np.array([0, 1])], num_classes=4)
  leaves, tree = jax.tree.flatten(d)
  assert len(leaves) == 3
  d2 = jax.tree.unflatten(tree, leaves)
  assert d2.num_classes == 4 and d2.min_examples == 2


Z2, O22 = np.zeros(2, int), np.ones((2, 2))


@pytest.mark.parametrize("xs,ys,kwargs,message", [
    ([np.ones((3, 2))], [Z2], {}, "Client 0: x and y must have the same number of "
                                  "examples; got x.shape[0]=3 and y.shape[0]=2."),
    ([O22, np.ones((0, 2))], [Z2, np.zeros(0, int)], {}, "Client 1 has zero examples; every "
     "client needs at least one (drop empty clients before building FederatedData)."),
    ([O22], [np.array([0, 3])], dict(num_classes=3),
     "Client 0: labels must lie in [0, num_classes) = [0, 3); got values in [0, 3]."),
    ([O22], [np.array([-1, 0])], {},
     "Client 0: labels must lie in [0, num_classes) = [0, 1); got values in [-1, 0]."),
    ([O22] * 3, [Z2, np.array([1, 2]), np.array([0, 3])], dict(num_classes=3),
     "Client 2: labels must lie in [0, num_classes) = [0, 3); got values in [0, 3]."),
    ([np.array([[0.0, np.nan], [1.0, 1.0]])], [np.array([0, 1])], {},
     "Client 0: x holds 1 non-finite values (NaN or Inf); features must be finite."),
    ([O22, np.float32([[np.inf, 1.0], [-np.inf, np.nan]])], [Z2, Z2], {},
     "Client 1: x holds 3 non-finite values (NaN or Inf); features must be finite."),
    ([O22], [np.array([0.5, 1.0])], {}, "Client 0: labels y must be integers; got dtype "
                                        "float64."),
    ([O22, np.ones((2, 3))], [Z2] * 2, {}, "Client 1: feature shape (3,) differs from "
     "client 0's (2,); all clients must share one feature shape."),
    ([np.array(1.0)], [np.zeros(1, int)], {}, "Client 0: expected x of shape [n, ...] and y "
                                              "of shape [n]; got x.shape=(), y.shape=(1,)."),
    ([O22], [np.zeros((2, 1), int)], {}, "Client 0: expected x of shape [n, ...] and y of "
                                         "shape [n]; got x.shape=(2, 2), y.shape=(2, 1)."),
    ([O22], [Z2, Z2], {}, "xs and ys must have one entry per client; got len(xs)=1 and "
                          "len(ys)=2."),
    ([], [], {}, "xs must hold at least one client; got an empty sequence."),
    ([np.ones((3, 2))], [np.zeros(3, int)], dict(max_examples=2), "max_examples=2 is "
     "smaller than the largest client (3 examples); it must be at least that."),
    ([np.ones((3, 2))], [np.array([0, 1, 2])], dict(num_classes=2.5),
     "num_classes must be an int >= 1; got 2.5."),
    ([np.ones((3, 2))], [np.array([0, 0, 0])], dict(num_classes=True),
     "num_classes must be an int >= 1; got True."),
    ([np.ones((3, 2))], [np.zeros(3, int)], dict(example_cap=True),
     "example_cap must be an int >= 1; got True."),
    ([np.ones((3, 2))], [np.zeros(3, int)], dict(example_cap=0),
     "example_cap must be an int >= 1; got 0."),
    ([np.ones((3, 2))], [np.zeros(3, int)], dict(example_cap=2, max_examples=5),
     "max_examples=5 and example_cap=2 exclude each other; pass one."),
])
def test_bad_input_raises_clear_value_error(xs, ys, kwargs, message):
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    fp.FederatedData.from_clients(xs, ys, **kwargs)


def test_host_sizes_are_a_read_only_int64_copy():
  from fedjax_pers.core._data import HostSizes

  given = np.array([3, 2**31 - 1, 5], np.int32)
  sizes = HostSizes(given)
  assert sizes.array.dtype == np.int64 and int(sizes.array.sum()) == 2**31 + 7   # no wrap
  with pytest.raises(ValueError, match="read-only"):
    sizes.array[0] = 1
  given[0] = 9
  assert sizes.array[0] == 3
  assert repr(sizes) == "HostSizes(num_clients=3, total=2147483655)"
