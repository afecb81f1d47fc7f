"""Collectives and FLOPs of a compiled, SPMD-partitioned computation.

After ``jax.jit(f).lower(*args).compile()``, the HLO text is the per-device
program. :func:`collective_stats` counts its collective ops and the bytes of
their results (per device: an all-gather's result is the gathered array, an
all-to-all's is the device's new shard), and :func:`compiled_flops` reads XLA's
cost analysis (per device; a conditional counts its most expensive branch).
Asynchronous pairs (``*-start``/``*-done``) are counted once, at ``-done``.

Measurement code, so it lives with the benchmarks and is not installed with
the package; the tests import it from here (tests -> benchmarks, as for the
other benchmark modules they check), never the reverse.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

__all__ = ["COLLECTIVES", "CollectiveStats", "collective_stats", "compiled_flops"]

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")

_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


class CollectiveStats(NamedTuple):
  """Collectives of one per-device program.

  Attributes:
    counts: op name -> number of ops.
    bytes: op name -> total result bytes.
  """

  counts: dict[str, int]
  bytes: dict[str, int]

  @property
  def total_bytes(self) -> int:
    return sum(self.bytes.values())

  @property
  def total_count(self) -> int:
    return sum(self.counts.values())


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BYTES[dtype]
  return total


def collective_stats(hlo_text: str) -> CollectiveStats:
  """Counts collective ops and their result bytes in (per-device) HLO text."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  nbytes = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m or m.group("suffix") == "-start":
      continue
    op = m.group("op")
    counts[op] += 1
    nbytes[op] += _shape_bytes(m.group("shape"))
  return CollectiveStats(counts, nbytes)


def compiled_flops(compiled: Any) -> float:
  """Per-device FLOPs from ``compiled.cost_analysis()``."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))
