"""Names of pytree leaves: one home for turning key paths into ``'a/b/kernel'``.

Every module that names parameters (routing, dimension numbers, QK-Clip's
layer matching, the mesh plan, error messages) goes through these, so a
parameter has one name everywhere. They build on :mod:`jax.tree_util`'s key
types. The ``.value`` attribute key of a wrapped variable (``nnx.Param``
leaves, as ``nnx.Optimizer`` passes them) is dropped, so a parameter has the
same path wrapped or not, and the optimizer side needs no import of an NN
library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["leaves_with_paths", "lower_components", "path_components", "path_str",
           "show_path"]

_VARIABLE_KEYS = ("value", "raw_value")
KeyPath = Sequence[Any]


def _is_variable_key(k: Any) -> bool:
  return isinstance(k, jax.tree_util.GetAttrKey) and k.name in _VARIABLE_KEYS


def path_components(keypath: KeyPath) -> tuple[str, ...]:
  """``('a', 'b', 'kernel')`` for a pytree key path (variable ``.value`` keys dropped)."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in keypath
               if not _is_variable_key(k))


def path_str(keypath: KeyPath) -> str:
  """``'a/b/kernel'`` for a pytree key path (variable ``.value`` keys dropped)."""
  return jax.tree_util.keystr(tuple(k for k in keypath if not _is_variable_key(k)),
                              simple=True, separator="/")


def show_path(components: Sequence[str]) -> str:
  """``'a/b'`` for path components, ``'<root>'`` for none (for messages)."""
  return "/".join(components) if components else "<root>"


def lower_components(path: str) -> list[str]:
  """The lower-cased non-empty components of a ``'/'``-joined path (for name rules)."""
  return [c.lower() for c in path.split("/") if c]


def leaves_with_paths(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
  """``[(components, leaf)]`` of ``tree`` and its treedef.

  Flattens through wrapped variables (``nnx.Variable``), so the leaves are
  arrays; unflattening with the treedef rebuilds the variables.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_components(p), x) for p, x in leaves], treedef
