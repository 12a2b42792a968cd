"""The docstring examples run as written."""

import doctest
import importlib

import pytest

MODULES = [
    "fedjax_pers.aggregation._weights",
    "fedjax_pers.aggregation._quality",
    "fedjax_pers.core._execution",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
