r"""Where Muon orthogonalises each matrix on a mesh: a plan from shapes alone.

The mental model is Keller Jordan's distributed Muon: each device takes whole
matrices round robin, orthogonalises them locally, and the results are
gathered back. Here the same idea is planned statically, so that it runs as
one SPMD program with collectives XLA can schedule (:mod:`._sharding` runs the
plan; this module only decides it):

1. **Group** (:func:`_group_operands`). Matrices that share a shape (tall ones
   transposed), a dtype and a sharding of their ``(batch, rows, cols)`` view
   form one operand. Inputs whose batch axis is sharded on the mesh (stacked
   layers or experts) stay on their devices; those of one shape and sharding
   are joined into one operand on every device, without moving.
2. **Place** (:func:`_place`). Every device gets ``count // n`` matrices of each
   pooled operand; the leftovers of all operands are placed together by
   longest processing time first (Graham 1969), heaviest first onto the least
   loaded device (:func:`_place_leftovers`). A lone matrix is computed on
   every device instead when that does not load the busiest device more.
3. **Lay out** (:func:`_layout`). Each device's matrices are padded with zero
   matrices to a whole number of slots; each device computes only its real
   matrices (one :func:`jax.lax.switch` branch per pattern of counts).

The plan needs only shapes, dtypes, view shardings and the mesh's axis sizes:
:func:`plan_muon_sharding` takes ``jax.ShapeDtypeStruct`` leaves on a
:class:`jax.sharding.AbstractMesh` (or a dict of axis sizes), so a pod-scale
run can be planned on a laptop. Its figures are those of the compiled program:
the busiest device's Newton–Schulz FLOPs, and per device the collectives and
their bytes (:func:`operand_collectives`), checked against the compiled HLO on
8 host devices in ``tests/test_sharding.py``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonclip_jax._coefficients import CoeffsLike, resolve_coefficients
from muonclip_jax._dimensions import dimension_numbers_fn, normalize_axes, path_str
from muonclip_jax._newton_schulz import (
  NSOptions,
  check_method,
  choose_method,
  default_restarts,
  newton_schulz_flops,
)
from muonclip_jax._routing import MUON, resolve_labels

__all__ = [
  "ArrayPlan",
  "Collective",
  "LeafPlacement",
  "MeshPlan",
  "MuonShardingPlan",
  "mesh_axis_sizes",
  "operand_collectives",
  "plan_mesh",
  "plan_muon_sharding",
  "view_spec",
]

Axes = tuple[str, ...]
# The sharding of a matrix view (batch, rows, cols): the mesh axes of each view axis.
ViewSpec = tuple[Axes, Axes, Axes]
REPLICATED: ViewSpec = ((), (), ())
MAX_BRANCHES = 32


class ArrayPlan(NamedTuple):
  """One operand of the device-local Newton–Schulz: a stack of same-shape matrices.

  Its matrices enter sharded as ``spec`` (batch, rows, cols). On each device
  the replicated mesh axes ``rep`` take a slice of the batch, then one
  all-to-all per sharded matrix axis trades batch for rows/columns, leaving
  ``slots`` whole matrices per device; the way back is the reverse, then an
  all-gather over ``rep``. Devices are numbered in ``order = b + rep + r + c``.

  Attributes:
    rows: rows of the wide (``rows <= cols``) matrix.
    cols: its columns.
    dtype: the matrices' dtype.
    spec: the view sharding ``(b, r, c)``.
    order: mesh axes, major first, that number the devices.
    members: inputs in this operand.
    transposed: per member, whether it is tall and enters transposed.
    cells: for an unsharded batch (``b == ()``), the layout: per position,
      ``(member, index)`` of a matrix or ``None`` for a zero pad; device
      ``t`` (in ``order``) gets positions ``[t * slots, (t + 1) * slots)``.
      ``None`` for batch-sharded members: their local blocks are joined on
      each device in member order and padded there.
    slots: matrices per device.
    counts: matrices each device computes (pads excluded), by number in ``order``.
    flops: Newton–Schulz FLOPs of one matrix.
    replicated: a single matrix, gathered whole on every device (all-gather
      over ``r`` and ``c``) and computed there; each keeps its own shard of the
      result, so nothing is sent back.
  """

  rows: int
  cols: int
  dtype: jnp.dtype
  spec: ViewSpec
  order: Axes
  members: tuple[int, ...]
  transposed: tuple[bool, ...]
  cells: tuple[tuple[int, int] | None, ...] | None
  slots: int
  counts: tuple[int, ...]
  flops: int
  replicated: bool = False

  @property
  def count(self) -> int:
    """Real matrices in the operand."""
    if self.cells is None:
      return sum(self.counts)
    return sum(c is not None for c in self.cells)

  @property
  def padding(self) -> int:
    """Zero matrices added to fill the layout."""
    return 0 if self.replicated else self.slots * len(self.counts) - self.count


class MeshPlan(NamedTuple):
  """Static placement of a list of matrices on a mesh.

  Attributes:
    arrays: the operands (one per shape and sharding).
    patterns: distinct per-device tuples of real-matrix counts, one per
      :func:`jax.lax.switch` branch (one pattern: no switch).
    branch_of: per device (numbered in mesh-axis order), its pattern.
    per_device_flops: Newton–Schulz FLOPs of the busiest device.
    total_flops: Newton–Schulz FLOPs of all real matrices.
  """

  arrays: tuple[ArrayPlan, ...]
  patterns: tuple[tuple[int, ...], ...]
  branch_of: tuple[int, ...]
  per_device_flops: int
  total_flops: int


class _Pool(NamedTuple):
  """Matrices of one shape and sharding spread over every device (before layout)."""

  rows: int
  cols: int
  dtype: jnp.dtype
  spec: ViewSpec
  order: Axes
  members: tuple[int, ...]
  flops: int
  mats: tuple[tuple[int, int], ...]  # (member position, batch index)
  quota: int  # matrices every device gets before the leftovers


def ns_flops(rows: int, cols: int, ns: NSOptions) -> int:
  """FLOPs of one orthogonalisation as :func:`_orthogonalize` will run it."""
  steps = len(ns.config.triples)
  restarts = default_restarts(steps) if ns.restarts is None else ns.restarts
  method = ns.method
  if method == "auto":
    method = choose_method(rows, cols, steps, restarts)
  return newton_schulz_flops(rows, cols, steps, method, restarts)


def axes_size(axes: Axes, sizes: Mapping[str, int]) -> int:
  """Devices along the mesh axes ``axes``."""
  return math.prod(sizes[a] for a in axes)


def _order(spec: ViewSpec, axes: Axes) -> Axes:
  """Mesh axes numbering the devices of an operand: batch, replicated, rows, cols."""
  b, r, c = spec
  return b + tuple(a for a in axes if a not in b + r + c) + r + c


def _numbering(order: Axes, sizes: Mapping[str, int]) -> list[int]:
  """Per device (numbered in mesh-axis order): its number in ``order``."""
  names = list(sizes)
  stride = {}
  step = 1
  for a in reversed(order):
    stride[a] = step
    step *= sizes[a]
  out = []
  for coords in itertools.product(*(range(sizes[a]) for a in names)):
    out.append(sum(stride[a] * x for a, x in zip(names, coords, strict=True)))
  return out


def _batch_counts(local: int, slots: int, m: int, n: int) -> tuple[int, ...]:
  """Real matrices per device of a batch-sharded operand.

  Each group of ``m`` devices (one batch shard) holds ``local`` matrices,
  padded to ``slots * m``; device ``t`` of the group gets slots
  ``[t * slots, (t + 1) * slots)``, so the count is ``local - t * slots``
  clipped to ``[0, slots]``.
  """
  return tuple(min(max(local - (t % m) * slots, 0), slots) for t in range(n))


def _group_operands(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
                    specs: Sequence[ViewSpec | None], sizes: Mapping[str, int],
                    ns: NSOptions) -> tuple[list[ArrayPlan], dict[tuple[Any, ...], list[int]],
                                            dict[int, bool]]:
  """Step 1: batch-sharded operands (final) and pools of the rest, by shape and sharding."""
  axes = tuple(sizes)
  n = axes_size(axes, sizes)
  stay: dict[tuple[Any, ...], list[int]] = {}
  pooled: dict[tuple[Any, ...], list[int]] = {}
  transpose: dict[int, bool] = {}
  for i, ((batch, fi, fo), dt, sp) in enumerate(zip(shapes, dtypes, specs, strict=True)):
    sp = REPLICATED if sp is None else sp
    # Tall matrices enter transposed; so do square ones sharded by rows only, so
    # that they share an operand with column-sharded ones (NS(X^T) = NS(X)^T).
    tall = fi > fo or (fi == fo and bool(sp[1]) and not sp[2])
    transpose[i] = tall
    wide = (sp[0], sp[2], sp[1]) if tall else sp
    key = (min(fi, fo), max(fi, fo), jnp.dtype(dt).name)
    if wide[0] and batch % axes_size(wide[0], sizes) == 0:
      stay.setdefault(key + (wide,), []).append(i)
    else:  # Unsharded, or an uneven batch sharding (gathered).
      pooled.setdefault(key + (((),) + wide[1:],), []).append(i)
  arrays = []
  for (rows, cols, dt, spec), members in stay.items():
    b_size = axes_size(spec[0], sizes)
    m = n // b_size  # devices per batch shard
    local = sum(shapes[i][0] for i in members) // b_size
    slots = -(-local // m)
    arrays.append(ArrayPlan(rows, cols, jnp.dtype(dt), spec, _order(spec, axes), tuple(members),
                            tuple(transpose[i] for i in members), None, slots,
                            _batch_counts(local, slots, m, n), ns_flops(rows, cols, ns)))
  return arrays, pooled, transpose


def _place_leftovers(base: Sequence[int], pools: Sequence[_Pool],
                     leftovers: Sequence[tuple[int, int, int, int]],
                     replicated: set[int]) -> tuple[list[tuple[int, int, int, int]], int]:
  """Longest processing time first over the leftovers, on top of the uniform load.

  Args:
    base: per device (mesh order), the FLOPs it already has.
    pools: the pooled operands.
    leftovers: ``(flops, pool, member position, batch index)``.
    replicated: pools computed on every device (their leftover is skipped).

  Returns:
    ``(pool, member position, batch index, device)`` per placed matrix, and
    the busiest device's FLOPs.
  """
  extra = sum(pools[d].flops for d in replicated)
  heap = [(x + extra, p) for p, x in enumerate(base)]
  heapq.heapify(heap)
  placed = []
  for flops, d, j, k in sorted(leftovers, key=lambda x: (-x[0], x[1])):
    if d in replicated:
      continue
    load, p = heapq.heappop(heap)
    placed.append((d, j, k, p))
    heapq.heappush(heap, (load + flops, p))
  return placed, max(load for load, _ in heap)


def _place(stay: Sequence[ArrayPlan], pooled: Mapping[tuple[Any, ...], list[int]],
           shapes: Sequence[tuple[int, int, int]], sizes: Mapping[str, int],
           ns: NSOptions) -> tuple[list[_Pool], list[tuple[int, int, int, int]], set[int]]:
  """Step 2: an equal share of each pool per device, then the leftovers by LPT."""
  axes = tuple(sizes)
  n = axes_size(axes, sizes)
  base = [0] * n  # per device, in mesh order
  for a in stay:
    for p, t in enumerate(_numbering(a.order, sizes)):
      base[p] += a.counts[t] * a.flops
  pools, leftovers = [], []
  for (rows, cols, dt, spec), members in pooled.items():
    mats = tuple((j, k) for j, i in enumerate(members) for k in range(shapes[i][0]))
    flops = ns_flops(rows, cols, ns)
    quota = len(mats) // n
    base = [x + quota * flops for x in base]
    leftovers += [(flops, len(pools), j, k) for j, k in mats[n * quota:]]
    pools.append(_Pool(rows, cols, jnp.dtype(dt), spec, _order(spec, axes), tuple(members),
                       flops, mats, quota))
  replicated: set[int] = set()
  placed, busiest = _place_leftovers(base, pools, leftovers, replicated)
  lone = sorted((d for d, x in enumerate(pools) if len(x.mats) == 1), key=lambda d: -pools[d].flops)
  for d in lone:
    trial, cost = _place_leftovers(base, pools, leftovers, replicated | {d})
    if cost <= busiest:
      replicated.add(d)
      placed, busiest = trial, cost
  return pools, placed, replicated


def _layout(pools: Sequence[_Pool], placed: Sequence[tuple[int, int, int, int]],
            replicated: set[int], transpose: Mapping[int, bool],
            sizes: Mapping[str, int]) -> list[ArrayPlan]:
  """Step 3: each pool's matrices in device order, padded to whole slots."""
  n = axes_size(tuple(sizes), sizes)
  by_pool: dict[int, list[tuple[int, int, int]]] = {}
  for d, j, k, p in placed:
    by_pool.setdefault(d, []).append((j, k, p))
  arrays = []
  for d, pool in enumerate(pools):
    transposed = tuple(transpose[i] for i in pool.members)
    if d in replicated:
      arrays.append(ArrayPlan(pool.rows, pool.cols, pool.dtype, pool.spec, pool.order,
                              pool.members, transposed, (pool.mats[0],), 1, (1,) * n,
                              pool.flops, True))
      continue
    q = pool.quota
    per_device = [list(pool.mats[t * q:(t + 1) * q]) for t in range(n)]
    numbering = _numbering(pool.order, sizes)
    for j, k, p in by_pool.get(d, ()):
      per_device[numbering[p]].append((j, k))
    slots = max(len(x) for x in per_device)
    cells: list[tuple[int, int] | None] = []
    for x in per_device:
      cells += x + [None] * (slots - len(x))
    arrays.append(ArrayPlan(pool.rows, pool.cols, pool.dtype, pool.spec, pool.order,
                            pool.members, transposed, tuple(cells), slots,
                            tuple(len(x) for x in per_device), pool.flops))
  return arrays


def plan_mesh(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
              specs: Sequence[ViewSpec | None] | None, axis_sizes: Mapping[str, int],
              ns: NSOptions, *, switch: bool = True) -> MeshPlan:
  """Groups ``(batch, fan_in, fan_out)`` matrices and places them on the devices.

  Args:
    shapes: the matrix views, in the orthogonaliser's input order.
    dtypes: their dtypes.
    specs: their view shardings (mesh axes of batch, fan-in, fan-out), or
      ``None`` where unknown (treated as replicated: gathered on entry).
    axis_sizes: mesh axis name -> size, in mesh order.
    ns: the Newton–Schulz options (for the per-matrix cost).
    switch: let each device skip its pads with a :func:`jax.lax.switch` branch
      per pattern of counts. With ``False``, or more than ``MAX_BRANCHES``
      patterns, every device computes every slot, pads included.

  Returns:
    A :class:`MeshPlan` (see the module docstring for the three steps).
  """
  sizes = dict(axis_sizes)
  n = axes_size(tuple(sizes), sizes)
  specs = [None] * len(shapes) if specs is None else list(specs)
  stay, pooled, transpose = _group_operands(shapes, dtypes, specs, sizes, ns)
  pools, placed, replicated = _place(stay, pooled, shapes, sizes, ns)
  arrays = stay + _layout(pools, placed, replicated, transpose, sizes)

  numberings = {a.order: _numbering(a.order, sizes) for a in arrays}
  per_device = [tuple(a.counts[numberings[a.order][p]] for a in arrays) for p in range(n)]
  patterns = sorted(set(per_device))
  if not switch or len(patterns) > MAX_BRANCHES:
    patterns = [tuple(a.slots for a in arrays)]
    per_device = patterns * n
  busiest = max(sum(c * a.flops for c, a in zip(pat, arrays, strict=True)) for pat in patterns)
  total = sum(a.count * a.flops for a in arrays)
  index = {pat: t for t, pat in enumerate(patterns)}
  return MeshPlan(tuple(arrays), tuple(patterns), tuple(index[pat] for pat in per_device),
                  busiest, total)


def _entry_axes(entry: Any) -> Axes:
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
  entries = [_entry_axes(e) for e in spec] + [()] * (len(shape) - len(spec))

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


# -- collectives ---------------------------------------------------------------------


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
  rep = tuple(x for x in sizes if x not in b + r + c)
  per_shard = a.slots * (n // axes_size(b, sizes))
  block = (per_shard // axes_size(rep, sizes)) * a.rows * a.cols * item
  block //= axes_size(r + c, sizes)
  trades = [Collective("all-to-all", axes_size(x, sizes), block) for x in (r, c) if x]
  out = trades + trades  # in, and back
  if rep:
    out.append(Collective("all-gather", axes_size(rep, sizes), block * axes_size(rep, sizes)))
  return out


# -- the plan of a parameter tree ------------------------------------------------------


class LeafPlacement(NamedTuple):
  """How one parameter is orthogonalised.

  Attributes:
    path: the ``'/'``-joined parameter path.
    shape: the parameter's shape.
    spec: its ``PartitionSpec`` (``None`` where unknown).
    matrices: ``(batch, fan_in, fan_out)``, its matrix view; ``None`` for an
      AdamW leaf.
    operand: index into ``MuonShardingPlan.mesh_plan.arrays`` (``None``: AdamW).
    transposed: tall, so it enters the operand transposed.
    known: its view sharding is a tiling (else it is gathered on entry).
  """

  path: str
  shape: tuple[int, ...]
  spec: P | None
  matrices: tuple[int, int, int] | None
  operand: int | None
  transposed: bool
  known: bool


class MuonShardingPlan(NamedTuple):
  """Where and at what cost ``muon(..., mesh=mesh)`` orthogonalises a tree.

  All figures are per device and per optimizer step, from shapes alone.

  Attributes:
    axis_sizes: mesh axis name -> size.
    leaves: one :class:`LeafPlacement` per parameter (flattening order).
    mesh_plan: the operands and their placement (:class:`MeshPlan`).
    collectives: per operand, its collectives (:func:`operand_collectives`).
  """

  axis_sizes: dict[str, int]
  leaves: tuple[LeafPlacement, ...]
  mesh_plan: MeshPlan
  collectives: tuple[tuple[Collective, ...], ...]

  @property
  def num_devices(self) -> int:
    return math.prod(self.axis_sizes.values())

  @property
  def busiest_flops(self) -> int:
    """Newton–Schulz FLOPs of the busiest device."""
    return self.mesh_plan.per_device_flops

  @property
  def ideal_flops(self) -> float:
    """Newton–Schulz FLOPs per device if the work split perfectly."""
    return self.mesh_plan.total_flops / self.num_devices

  @property
  def flops_ratio(self) -> float:
    """Busiest device over ideal (1.0 is a perfect split)."""
    return self.busiest_flops / self.ideal_flops if self.ideal_flops else float("nan")

  @property
  def collective_counts(self) -> dict[str, int]:
    """HLO op name -> number of collectives in the per-device program."""
    out: dict[str, int] = {}
    for c in itertools.chain.from_iterable(self.collectives):
      out[c.op] = out.get(c.op, 0) + 1
    return out

  @property
  def collective_bytes(self) -> dict[str, int]:
    """HLO op name -> total result bytes per device (what the HLO shows)."""
    out: dict[str, int] = {}
    for c in itertools.chain.from_iterable(self.collectives):
      out[c.op] = out.get(c.op, 0) + c.result_bytes
    return out

  @property
  def moved_bytes(self) -> int:
    """Bytes each device sends (and receives) per step."""
    return sum(c.moved_bytes for c in itertools.chain.from_iterable(self.collectives))

  def __str__(self) -> str:
    return _format(self)


def _describe(a: ArrayPlan, axes: Axes, known: bool) -> str:
  """How an operand is moved: the collectives in and out."""
  b, r, c = a.spec
  if a.replicated:
    gather = f"all-gather over {','.join(r + c)}; " if r + c else ""
    return (("gathered (sharding unknown); " if not known else "") + gather
            + "computed on every device, nothing sent back")
  rep = tuple(x for x in axes if x not in b + r + c)
  steps = []
  if not known:
    steps.append("gathered (sharding unknown)")
  if rep:
    steps.append(f"slice over {','.join(rep)}")
  if r:
    steps.append(f"all-to-all rows<->batch over {','.join(r)}")
  if c:
    steps.append(f"all-to-all cols<->batch over {','.join(c)}")
  back = " + all-gather back" if rep else ""
  return ("; ".join(steps) + back) if steps else "local (stacked axis on the mesh)"


def _leaf_row(leaf: LeafPlacement, plan: MuonShardingPlan) -> list[str]:
  shape = "x".join(map(str, leaf.shape))
  spec = str(leaf.spec) if leaf.spec is not None else "?"
  if leaf.operand is None:
    return [leaf.path, shape, spec, "-", "-", "AdamW (elementwise, in place)", "-", "-"]
  a = plan.mesh_plan.arrays[leaf.operand]
  b, fi, fo = leaf.matrices  # type: ignore[misc]
  mark = " (T)" if leaf.transposed else ""
  busy = sum(1 for k in a.counts if k)
  return [leaf.path, shape, spec, f"{b} x {fi}x{fo}{mark}", str(leaf.operand),
          _describe(a, tuple(plan.axis_sizes), leaf.known),
          f"{busy}/{plan.num_devices}", str(a.padding)]


def _format(plan: MuonShardingPlan) -> str:
  """The plan as a table: a header line, one row per leaf, the operands."""
  header = ["leaf", "shape", "sharding", "matrices", "operand", "moved by", "devices", "pads"]
  rows = [_leaf_row(leaf, plan) for leaf in plan.leaves]
  widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
  mp = plan.mesh_plan
  counts = ", ".join(f"{k} {v}" for k, v in sorted(plan.collective_counts.items())) or "none"
  out = [f"Muon on mesh {plan.axis_sizes} ({plan.num_devices} devices): {len(mp.arrays)} "
         f"operand(s), {len(mp.patterns)} device pattern(s); busiest device "
         f"{plan.busiest_flops:.3g} Newton–Schulz FLOPs = {plan.flops_ratio:.3f} x ideal "
         f"({mp.total_flops:.3g} / {plan.num_devices}); per device: {counts}, "
         f"{plan.moved_bytes / 2**20:.4g} MiB sent and received",
         fmt(header), fmt(["-" * w for w in widths])]
  out += [fmt(r) for r in rows]
  out.append("operands: " + "; ".join(
      f"{t}: {a.count} x {a.rows}x{a.cols} {a.dtype.name}, {a.slots} slot(s)/device"
      for t, a in enumerate(mp.arrays)))
  return "\n".join(out)


def mesh_axis_sizes(mesh: Any) -> dict[str, int]:
  """Axis name -> size of a ``Mesh``, an ``AbstractMesh`` or a mapping."""
  if isinstance(mesh, Mapping):
    sizes = {str(k): int(v) for k, v in mesh.items()}
  elif hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
    sizes = {str(k): int(v) for k, v in dict(mesh.shape).items()}
  else:
    raise TypeError("mesh: expected a jax.sharding.Mesh, an AbstractMesh or a mapping of "
                    f"axis name to size, got {type(mesh).__name__}")
  if not sizes or any(v < 1 for v in sizes.values()):
    raise ValueError(f"mesh: axis sizes must be positive, got {sizes}")
  return sizes


def _leaf_spec(x: Any, sizes: Mapping[str, int]) -> P | None:
  """The PartitionSpec of a leaf on this mesh, or ``None`` if it has none."""
  s = getattr(x, "sharding", None)
  if not isinstance(s, NamedSharding):
    return None
  if dict(s.mesh.shape) != dict(sizes):
    raise ValueError(f"a leaf is sharded on mesh {dict(s.mesh.shape)}, not on the planned "
                     f"mesh {dict(sizes)}")
  return s.spec


def plan_muon_sharding(params: Any, mesh: Any, dimension_numbers: Any = None, *,
                       param_labels: Any = None, coeffs: CoeffsLike = "keller",
                       steps: int | None = None, method: str = "auto",
                       switch: bool = True) -> MuonShardingPlan:
  """Plans ``muon(..., mesh=mesh)`` for a parameter tree, without devices.

  Args:
    params: the parameters: arrays, or ``jax.ShapeDtypeStruct`` leaves (for
      instance ``jax.eval_shape`` of a model's initialiser) whose ``sharding``
      is a :class:`~jax.sharding.NamedSharding` on ``mesh``; a leaf without
      one counts as unknown (gathered on entry).
    mesh: a :class:`jax.sharding.Mesh`, a :class:`jax.sharding.AbstractMesh`,
      or a mapping of axis name to size, in mesh order.
    dimension_numbers: as for :func:`muonclip_jax.scale_by_muon`.
    param_labels: as for :func:`muonclip_jax.muon` (default routing); AdamW
      leaves are listed and cost nothing here.
    coeffs: Newton–Schulz preset or coefficients (for the FLOP counts).
    steps: Newton–Schulz steps (default: the preset's).
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    switch: as for :func:`muonclip_jax.mesh_orthogonalizer`.

  Returns:
    A :class:`MuonShardingPlan`; ``str(plan)`` is a table. With several JAX
    processes every process gets the same plan for a mesh over all devices.

  Raises:
    TypeError: ``mesh`` is not a mesh or a mapping.
    ValueError: a leaf is sharded on another mesh, a Muon leaf has rank < 2,
      or the errors of the routing (naming the parameter path).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    >>> from muonclip_jax import plan_muon_sharding
    >>> mesh = AbstractMesh((256,), ("fsdp",))
    >>> w = jax.ShapeDtypeStruct((1024, 4096), jnp.float32,
    ...                          sharding=NamedSharding(mesh, P("fsdp")))
    >>> plan = plan_muon_sharding({"mlp": {"w": [w] * 512}}, mesh)
    >>> round(plan.flops_ratio, 3), plan.collective_counts
    (1.0, {'all-to-all': 2})
  """
  sizes = mesh_axis_sizes(mesh)
  dims_fn = dimension_numbers_fn(dimension_numbers)
  ns = NSOptions(resolve_coefficients(coeffs, steps), None, check_method(method), None, 1e-7)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  labels = jax.tree.leaves(resolve_labels(params, param_labels))
  views, dtypes, vspecs, rows = [], [], [], []
  for (p, x), label in zip(flat, labels, strict=True):
    path, shape, spec = path_str(p), tuple(x.shape), _leaf_spec(x, sizes)
    if label != MUON:
      rows.append((path, shape, spec, None, None))
      continue
    if len(shape) < 2:
      raise ValueError(f"{path}: Muon needs a parameter of rank >= 2, got shape {shape}")
    batch, red, out = normalize_axes(path, shape, dims_fn(path, shape))
    view = tuple(math.prod(shape[d] for d in ax) for ax in (batch, red, out))
    vs = None if spec is None else view_spec(spec, shape, batch, red, out)
    rows.append((path, shape, spec, view, vs is not None))
    views.append(view)
    dtypes.append(x.dtype)
    vspecs.append(vs)
  mp = plan_mesh(views, dtypes, vspecs, sizes, ns, switch=switch)
  operand_of, transposed = {}, {}
  for t, a in enumerate(mp.arrays):
    for j, i in enumerate(a.members):
      operand_of[i], transposed[i] = t, a.transposed[j]
  leaves, i = [], 0
  for path, shape, spec, view, known in rows:
    if view is None:
      leaves.append(LeafPlacement(path, shape, spec, None, None, False, spec is not None))
      continue
    leaves.append(LeafPlacement(path, shape, spec, view, operand_of[i], transposed[i], known))
    i += 1
  colls = tuple(tuple(operand_collectives(a, sizes)) for a in mp.arrays)
  return MuonShardingPlan(sizes, tuple(leaves), mp, colls)

