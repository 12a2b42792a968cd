"""FederatedData: stacking, padding, and clear errors for bad input."""

import jax
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


def test_is_a_pytree_with_static_metadata():
  d = fp.FederatedData.from_clients([np.ones((2, 2))], [np.array([0, 1])], num_classes=4)
  leaves, tree = jax.tree.flatten(d)
  assert len(leaves) == 3
  d2 = jax.tree.unflatten(tree, leaves)
  assert d2.num_classes == 4 and d2.min_examples == 2


@pytest.mark.parametrize(
    "xs,ys,kwargs,match",
    [
        ([np.ones((3, 2))], [np.zeros(2, int)], {}, r"Client 0: x and y .* x.shape\[0\]=3"),
        ([np.ones((2, 2)), np.ones((0, 2))], [np.zeros(2, int), np.zeros(0, int)], {},
         "Client 1 has zero examples"),
        ([np.ones((2, 2))], [np.array([0, 3])], dict(num_classes=3),
         r"labels must lie in \[0, num_classes\) = \[0, 3\)"),
        ([np.ones((2, 2))], [np.array([-1, 0])], {}, r"labels must lie in"),
        ([np.array([[0.0, np.nan], [1.0, 1.0]])], [np.array([0, 1])], {},
         "Client 0: x holds 1 non-finite"),
        ([np.ones((2, 2))], [np.array([0.5, 1.0])], {}, "labels y must be integers"),
        ([np.ones((2, 2)), np.ones((2, 3))], [np.zeros(2, int)] * 2, {},
         "feature shape"),
        ([np.ones((2, 2))], [np.zeros(2, int), np.zeros(2, int)], {}, "len\\(xs\\)=1"),
        ([np.ones((3, 2))], [np.zeros(3, int)], dict(max_examples=2), "max_examples=2"),
        ([np.ones((3, 2))], [np.array([0, 1, 2])], dict(num_classes=2.5),
         "num_classes must be an int >= 1; got 2.5"),
        ([np.ones((3, 2))], [np.zeros(3, int)], dict(example_cap=True),
         "example_cap must be an int >= 1; got True"),
    ])
def test_bad_input_raises_clear_value_error(xs, ys, kwargs, match):
  with pytest.raises(ValueError, match=match):
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
