"""The collective cost model: what moving each operand of a mesh plan costs.

Per device and per step, the collectives (HLO op names, group sizes, result
bytes) that bring an operand of a :class:`~muonclip_jax._mesh_placement.MeshPlan`
onto the devices that orthogonalise it and back. Every device runs the same
collectives (one SPMD program), and the figures are those the compiled HLO
shows (checked in ``tests/test_sharding.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from muonclip_jax._mesh_placement import ArrayPlan, axes_size

__all__ = ["Collective", "operand_collectives"]


class Collective(NamedTuple):
  """One collective of the compiled per-device program.

  Attributes:
    op: ``"all-to-all"`` or ``"all-gather"`` (HLO op names).
    group: devices taking part (the product of its mesh axes' sizes).
    result_bytes: bytes of its result on each device, as the HLO shows it.
  """

  op: str
  group: int
  result_bytes: int

  @property
  def moved_bytes(self) -> int:
    """Bytes each device sends (and receives): all but its own ``1 / group``."""
    return self.result_bytes * (self.group - 1) // self.group


def operand_collectives(a: ArrayPlan, sizes: Mapping[str, int]) -> list[Collective]:
  """The collectives that move operand ``a`` in and out, per device.

  Every device runs the same collectives with the same shapes (one SPMD
  program), so these figures hold for each device.
  """
  n = axes_size(tuple(sizes), sizes)
  b, r, c = a.spec
  item = a.dtype.itemsize
  if a.replicated:  # all-gather rows, then columns; the result is kept sharded.
    out, cols = [], a.cols // axes_size(c, sizes)
    if r:
      out.append(Collective("all-gather", axes_size(r, sizes), a.rows * cols * item))
    if c:
      out.append(Collective("all-gather", axes_size(c, sizes), a.rows * a.cols * item))
    return out
  rep = tuple(x for x in sizes if x not in b + r + c + a.redundant)
  per_shard = a.slots * (n // axes_size(b + a.redundant, sizes))
  block = (per_shard // axes_size(rep, sizes)) * a.rows * a.cols * item
  block //= axes_size(r + c, sizes)
  trades = [Collective("all-to-all", axes_size(x, sizes), block) for x in (r, c) if x]
  out = trades + trades  # in, and back
  if rep:
    out.append(Collective("all-gather", axes_size(rep, sizes), block * axes_size(rep, sizes)))
  return out
