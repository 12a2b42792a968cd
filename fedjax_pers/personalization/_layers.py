"""Splitting parameters into shared and personal parts by a predicate over their paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

Params = Any
Predicate = Callable[[str], bool]


def path_mask(params: Params, personal: Predicate) -> list[bool]:
  """Flat list (in `jax.tree.leaves` order): True for the leaves `personal(path)` selects.

  Paths are `jax.tree_util.keystr` strings such as `"['Dense_1']['kernel']"`.
  """
  return [bool(personal(jax.tree_util.keystr(path)))
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def last_layer(params: Params) -> Predicate:
  """The predicate selecting the last top-level module: the head of a flax model.

  Flax keeps a model's modules in the order they were created (`Conv_0, ...,
  Dense_1`), so the head is the last key of the params dict.
  """
  last = list(params)[-1]
  return lambda path: path.startswith(f"['{last}']")


def personal_part(params: Params, mask: list[bool]) -> tuple:
  """The personal leaves of `params`, as a tuple (empty when nothing is personal)."""
  return tuple(leaf for leaf, m in zip(jax.tree.leaves(params), mask) if m)


def merge(params: Params, personal: tuple, mask: list[bool]) -> Params:
  """`params` with its personal leaves replaced by `personal` (in order)."""
  leaves, treedef = jax.tree.flatten(params)
  it = iter(personal)
  return jax.tree.unflatten(treedef, [next(it) if m else leaf for leaf, m in zip(leaves, mask)])


def zero_personal(tree: Params, mask: list[bool]) -> Params:
  """`tree` with its personal leaves set to zero (the part the server must not average)."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [leaf * 0 if m else leaf for leaf, m in zip(leaves, mask)])
