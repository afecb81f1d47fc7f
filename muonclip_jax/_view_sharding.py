"""The sharding of a parameter's ``(batch, fan_in, fan_out)`` matrix view.

Muon orthogonalises the matrix view of each parameter; on a mesh, which mesh
axes shard each of the view's three axes decides how the view moves
(:mod:`muonclip_jax._mesh_placement`). This module only answers that
geometric question from a ``PartitionSpec`` and the view's axis groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.sharding import PartitionSpec as P

__all__ = ["Axes", "ViewSpec", "entry_axes", "view_spec"]

Axes = tuple[str, ...]
# The sharding of a matrix view (batch, rows, cols): the mesh axes of each view axis.
ViewSpec = tuple[Axes, Axes, Axes]


def entry_axes(entry: Any) -> Axes:
  """Mesh axes of one PartitionSpec entry."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def view_spec(spec: P, shape: Sequence[int], batch: Sequence[int], red: Sequence[int],
              out: Sequence[int]) -> ViewSpec | None:
  """The sharding of the ``(batch, fan_in, fan_out)`` view of a parameter.

  A group of merged axes (row-major) keeps a sharding when at most one of them
  is sharded and every axis before that one has size 1; otherwise the view's
  sharding is not a tiling (``None``, and the leaf is gathered on entry).
  """
  spec = tuple(spec)
  entries = [entry_axes(e) for e in spec] + [()] * (len(shape) - len(spec))

  def merge(dims: Sequence[int]) -> Axes | None:
    sharded = [t for t, d in enumerate(dims) if entries[d]]
    if not sharded:
      return ()
    t = sharded[0]
    if len(sharded) > 1 or any(shape[d] != 1 for d in dims[:t]):
      return None
    return entries[dims[t]]

  merged = (merge(batch), merge(red), merge(out))
  return None if any(m is None for m in merged) else merged  # type: ignore[return-value]
