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
   A pooled operand with fewer matrices than devices, whose gather back
   would move more than twice its own bytes, is instead spread over some of
   its replicated mesh axes and repeated over the others, or over none
   (every device computes it; unsharded, nothing moves), whichever costs the
   least FLOPs and bytes (:func:`_spread_axes`).
3. **Level** (:func:`_level`). Each batch shard of a batch-sharded operand
   gives fewer of its matrices to the devices that got large pooled ones.
4. **Lay out** (:func:`_layout`). Each device's matrices are padded with zero
   matrices to a whole number of slots; each device computes only its real
   matrices (per operand, one :func:`jax.lax.switch` branch per count).

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
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonclip_jax._coefficients import CoeffsLike, resolve_coefficients
from muonclip_jax._dimensions import dimension_numbers_fn, normalize_axes
from muonclip_jax._newton_schulz import (
  NSOptions,
  check_method,
  choose_method,
  default_restarts,
  newton_schulz_flops,
)
from muonclip_jax._paths import path_str
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
# Newton–Schulz FLOPs a device does in the time its collectives move one byte:
# bf16 peak over interconnect bandwidth per chip, about 1e3 on TPU v5e/v5p
# (197-459 TFLOP/s, 200-600 GB/s ICI) and 2e3 on H100 (989 TFLOP/s, 450 GB/s
# NVLink). Only weighs spreading few matrices over many devices (_spread_axes).
FLOPS_PER_BYTE = 1000


class ArrayPlan(NamedTuple):
  """One operand of the device-local Newton–Schulz: a stack of same-shape matrices.

  Its matrices enter sharded as ``spec`` (batch, rows, cols). On each device
  the replicated mesh axes ``rep`` take a slice of the batch, then one
  all-to-all per sharded matrix axis trades batch for rows/columns, leaving
  ``slots`` whole matrices per device; the way back is the reverse, then an
  all-gather over ``rep``. Devices are numbered in ``order = b + rep + r + c``.
  Replicated axes listed in ``redundant`` take no slice: the devices along
  them compute the same matrices (no gather over them); ``order`` then starts
  with them, and device ``t`` computes what position ``t mod P`` does, ``P``
  the devices of the other axes.

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
      ``t`` (in ``order``) gets positions ``[u * slots, (u + 1) * slots)``,
      ``u = t mod (len(cells) // slots)``.
      ``None`` for batch-sharded members: their local blocks are joined on
      each device in member order; device ``t`` of each batch shard (``m``
      devices) gets the next ``counts[t]`` of them, padded to ``slots``.
    slots: matrices per device.
    counts: matrices each device computes (pads excluded), by number in ``order``.
    flops: Newton–Schulz FLOPs of one matrix.
    replicated: a single matrix, gathered whole on every device (all-gather
      over ``r`` and ``c``) and computed there; each keeps its own shard of the
      result, so nothing is sent back.
    redundant: replicated mesh axes over which the work is repeated instead
      of spread (:func:`_spread_axes`): fewer bytes gathered when the
      operand has fewer matrices than devices.
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
  redundant: Axes = ()

  @property
  def count(self) -> int:
    """Real matrices in the operand."""
    if self.cells is None:
      return sum(self.counts)
    return sum(c is not None for c in self.cells)

  @property
  def padding(self) -> int:
    """Zero matrices added to fill the layout."""
    if self.replicated:
      return 0
    if self.cells is not None:
      return len(self.cells) - self.count
    return self.slots * len(self.counts) - self.count


class MeshPlan(NamedTuple):
  """Static placement of a list of matrices on a mesh.

  Attributes:
    arrays: the operands (one per shape and sharding).
    branches: per operand, the distinct numbers of real matrices its devices
      compute, one :func:`jax.lax.switch` branch each (``(slots,)`` when every
      device computes every slot, pads included).
    branch_of: per operand, per device (numbered in mesh-axis order), its
      branch.
    per_device_flops: Newton–Schulz FLOPs of the busiest device.
    total_flops: Newton–Schulz FLOPs of all real matrices.
  """

  arrays: tuple[ArrayPlan, ...]
  branches: tuple[tuple[int, ...], ...]
  branch_of: tuple[tuple[int, ...], ...]
  per_device_flops: int
  total_flops: int


class _Stay(NamedTuple):
  """Batch-sharded inputs of one shape and sharding: each batch shard stays put."""

  rows: int
  cols: int
  dtype: jnp.dtype
  spec: ViewSpec
  order: Axes
  members: tuple[int, ...]
  local: int  # matrices per batch shard (the members' local blocks, joined)
  flops: int


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
  redundant: Axes = ()  # replicated axes the work is repeated over (not spread)


def ns_flops(rows: int, cols: int, ns: NSOptions) -> int:
  """FLOPs of one orthogonalisation as :func:`orthogonalize_traced` will run it."""
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


def _spread_cost(count: int, bytes_: int, flops: int, spec: ViewSpec, dist: Axes,
                 sizes: Mapping[str, int]) -> tuple[float, int]:
  """``(cost, moved bytes)`` per device of spreading ``count`` matrices over the
  devices of ``dist + r + c`` (each matrix ``bytes_``), repeated over the rest.

  The collectives of :func:`operand_collectives` with ``slots = ceil(count /
  positions)``; the cost is ``slots * flops / FLOPS_PER_BYTE + moved``.
  """
  _, r, c = spec
  slots = -(-count // axes_size(dist + r + c, sizes))
  block = slots * bytes_
  moved = 2 * sum(block * (axes_size(x, sizes) - 1) // axes_size(x, sizes) for x in (r, c) if x)
  moved += block * (axes_size(dist, sizes) - 1)
  return slots * flops / FLOPS_PER_BYTE + moved, moved


def _spread_axes(count: int, rows: int, cols: int, dtype: Any, spec: ViewSpec, flops: int,
                 sizes: Mapping[str, int]) -> Axes | None:
  """Replicated axes over which to repeat a pooled operand instead of spreading it.

  Spread over every device, an operand of fewer matrices than devices is
  padded to one per device, and the gather back moves ``devices x matrix``
  bytes (64 GiB per device for 4 MiB of matrices on 65,536 devices). When
  that is more than twice the operand's own bytes, the cheapest of: spread
  over a subset of the replicated axes and repeat over the others (none:
  every device computes every matrix, and an unsharded operand moves
  nothing), or, for one matrix, gather it whole on every device
  (``replicated``); cost ``FLOPs / FLOPS_PER_BYTE + bytes moved`` per device.

  Returns:
    ``()`` to spread over every device (the default placement), the axes to
    repeat over, or ``None`` for the gathered-whole mode.
  """
  b, r, c = spec
  rep = tuple(a for a in sizes if a not in b + r + c)
  bytes_ = rows * cols * jnp.dtype(dtype).itemsize
  _, moved = _spread_cost(count, bytes_, flops, spec, rep, sizes)
  if b or not rep or moved <= 2 * count * bytes_:
    return ()
  options: list[tuple[float, int, Axes | None]] = []
  if count == 1:
    whole = [bytes_ // axes_size(c, sizes) * (axes_size(r, sizes) - 1) // axes_size(r, sizes),
             bytes_ * (axes_size(c, sizes) - 1) // axes_size(c, sizes)]
    gathered = sum(x for x, on in zip(whole, (r, c), strict=True) if on)
    options.append((flops / FLOPS_PER_BYTE + gathered, gathered, None))
  subsets = itertools.chain.from_iterable(
      itertools.combinations(rep, k) for k in range(len(rep), -1, -1))
  for dist in subsets:
    cost, moved = _spread_cost(count, bytes_, flops, spec, dist, sizes)
    options.append((cost, moved, tuple(a for a in rep if a not in dist)))
  best = min(range(len(options)), key=lambda i: (options[i][0], options[i][1], i))
  return options[best][2]


def _group_operands(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
                    specs: Sequence[ViewSpec | None], sizes: Mapping[str, int],
                    ns: NSOptions) -> tuple[list[_Stay], dict[tuple[Any, ...], list[int]],
                                            dict[int, bool]]:
  """Step 1: batch-sharded operands, and pools of the rest, by shape and sharding."""
  axes = tuple(sizes)
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
  stays = [_Stay(rows, cols, jnp.dtype(dt), spec, _order(spec, axes), tuple(members),
                 sum(shapes[i][0] for i in members) // axes_size(spec[0], sizes),
                 ns_flops(rows, cols, ns))
           for (rows, cols, dt, spec), members in stay.items()]
  return stays, pooled, transpose


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


def _fill(profile: Sequence[float], local: int, flops: int, slots: int) -> list[int]:
  """Matrices per position: each next one onto the least-loaded position with room."""
  heap = [(x, t) for t, x in enumerate(profile)]
  heapq.heapify(heap)
  counts = [0] * len(profile)
  for _ in range(local):
    load, t = heapq.heappop(heap)
    counts[t] += 1
    if counts[t] < slots:
      heapq.heappush(heap, (load + flops, t))
  return counts


def _level(stay: _Stay, load: Sequence[float], sizes: Mapping[str, int]) -> tuple[int, list[int]]:
  """Slots and per-position counts of a batch-sharded operand, around ``load``.

  Every batch shard (a group of ``m`` devices) splits its ``local`` matrices
  the same way over its ``m`` positions: fewer to a position whose busiest
  device (over the groups) already carries large matrices of the pools. More
  slots than ``ceil(local / m)`` (pads: more bytes moved) are taken only
  while they lower the busiest device.
  """
  n = len(load)
  m = n // axes_size(stay.spec[0], sizes)
  numbering = _numbering(stay.order, sizes)
  profile = [0.0] * m
  for p, t in enumerate(numbering):
    profile[t % m] = max(profile[t % m], load[p])
  slots = -(-stay.local // m)
  counts = _fill(profile, stay.local, stay.flops, slots)
  peak = max(x + c * stay.flops for x, c in zip(profile, counts, strict=True))
  for more in range(slots + 1, 2 * slots + 1):
    trial = _fill(profile, stay.local, stay.flops, more)
    cost = max(x + c * stay.flops for x, c in zip(profile, trial, strict=True))
    if cost >= peak:
      break
    slots, counts, peak = more, trial, cost
  return slots, counts


def _positions(pool: _Pool, sizes: Mapping[str, int]) -> int:
  """Devices a pooled operand is spread over (all but its ``redundant`` axes)."""
  return axes_size(tuple(sizes), sizes) // axes_size(pool.redundant, sizes)


def _repeated_counts(pool: _Pool, sizes: Mapping[str, int]) -> list[int]:
  """Per position of an operand repeated over axes: its matrices, round robin."""
  m = _positions(pool, sizes)
  q, rem = divmod(len(pool.mats), m)
  return [q + (t < rem) for t in range(m)]


def _place(stays: Sequence[_Stay], pooled: Mapping[tuple[Any, ...], list[int]],
           shapes: Sequence[tuple[int, int, int]], sizes: Mapping[str, int],
           ns: NSOptions) -> tuple[list[_Pool], list[tuple[int, int, int, int]], set[int],
                                   list[tuple[int, list[int]]]]:
  """Step 2: pooled matrices by LPT, then batch-sharded ones levelled around them.

  A pool with fewer matrices than devices may instead be repeated over some
  replicated axes, or gathered whole on every device (:func:`_spread_axes`);
  the rest are placed on top of the batch-sharded operands' average load and
  of the repeated ones; then each batch-sharded operand (heaviest first) gives
  fewer matrices to the positions that got large pooled ones (:func:`_level`).
  """
  axes = tuple(sizes)
  n = axes_size(axes, sizes)
  average = sum(x.local * axes_size(x.spec[0], sizes) * x.flops for x in stays) / n
  fixed_load = [0.0] * n  # per device (mesh order): the repeated pools
  pools, leftovers = [], []
  replicated: set[int] = set()
  decided: set[int] = set()
  uniform = 0.0
  for (rows, cols, dt, spec), members in pooled.items():
    mats = tuple((j, k) for j, i in enumerate(members) for k in range(shapes[i][0]))
    flops = ns_flops(rows, cols, ns)
    redundant = _spread_axes(len(mats), rows, cols, dt, spec, flops, sizes)
    if redundant is None:  # one matrix, gathered whole on every device
      replicated.add(len(pools))
      decided.add(len(pools))
      pools.append(_Pool(rows, cols, jnp.dtype(dt), spec, _order(spec, axes),
                         tuple(members), flops, mats, 0))
      continue
    if redundant:  # repeated over these axes, spread round robin over the others
      order = redundant + _order(spec, tuple(a for a in axes if a not in redundant))
      pool = _Pool(rows, cols, jnp.dtype(dt), spec, order, tuple(members), flops, mats, 0,
                   redundant)
      counts = _repeated_counts(pool, sizes)
      for p, t in enumerate(_numbering(order, sizes)):
        fixed_load[p] += counts[t % len(counts)] * flops
      decided.add(len(pools))
      pools.append(pool)
      continue
    quota = len(mats) // n
    uniform += quota * flops
    leftovers += [(flops, len(pools), j, k) for j, k in mats[n * quota:]]
    pools.append(_Pool(rows, cols, jnp.dtype(dt), spec, _order(spec, axes), tuple(members),
                       flops, mats, quota))
  base = [average + uniform + x for x in fixed_load]
  placed, busiest = _place_leftovers(base, pools, leftovers, replicated)
  lone = sorted((d for d, x in enumerate(pools) if len(x.mats) == 1 and d not in decided),
                key=lambda d: -pools[d].flops)
  for d in lone:
    trial, cost = _place_leftovers(base, pools, leftovers, replicated | {d})
    if cost <= busiest:
      replicated.add(d)
      placed, busiest = trial, cost
  load = [uniform + sum(pools[d].flops for d in replicated) + x for x in fixed_load]
  for d, _, _, p in placed:
    load[p] += pools[d].flops
  levels = []
  for stay in sorted(stays, key=lambda x: -x.local * x.flops):
    slots, counts = _level(stay, load, sizes)
    m = len(counts)
    for p, t in enumerate(_numbering(stay.order, sizes)):
      load[p] += counts[t % m] * stay.flops
    levels.append((slots, counts))
  order = sorted(range(len(stays)), key=lambda i: -stays[i].local * stays[i].flops)
  by_stay = [levels[order.index(i)] for i in range(len(stays))]
  return pools, placed, replicated, by_stay


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
    if pool.redundant:  # position t: the next counts[t] matrices
      counts = _repeated_counts(pool, sizes)
      slots = max(counts)
      starts = list(itertools.accumulate([0] + counts))
      cells = []
      for t, k in enumerate(counts):
        cells += list(pool.mats[starts[t]:starts[t] + k]) + [None] * (slots - k)
      arrays.append(ArrayPlan(pool.rows, pool.cols, pool.dtype, pool.spec, pool.order,
                              pool.members, transposed, tuple(cells), slots,
                              tuple(counts[t % len(counts)] for t in range(n)), pool.flops,
                              redundant=pool.redundant))
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
      per distinct count of an operand. With ``False`` (or, for an operand,
      more than ``MAX_BRANCHES`` distinct counts), every device computes every
      slot of it, pads included.

  Returns:
    A :class:`MeshPlan` (see the module docstring for the three steps).
  """
  sizes = dict(axis_sizes)
  n = axes_size(tuple(sizes), sizes)
  specs = [None] * len(shapes) if specs is None else list(specs)
  stays, pooled, transpose = _group_operands(shapes, dtypes, specs, sizes, ns)
  pools, placed, replicated, levels = _place(stays, pooled, shapes, sizes, ns)
  arrays = [ArrayPlan(x.rows, x.cols, x.dtype, x.spec, x.order, x.members,
                      tuple(transpose[i] for i in x.members), None, slots,
                      tuple(counts[t % len(counts)] for t in range(n)), x.flops)
            for x, (slots, counts) in zip(stays, levels, strict=True)]
  arrays += _layout(pools, placed, replicated, transpose, sizes)

  branches, branch_of = [], []
  load = [0] * n
  for a in arrays:
    per_device = [a.counts[t] for t in _numbering(a.order, sizes)]  # mesh order
    distinct = sorted(set(per_device))
    if not switch or len(distinct) > MAX_BRANCHES:
      distinct, per_device = [a.slots], [a.slots] * n
    index = {k: b for b, k in enumerate(distinct)}
    branches.append(tuple(distinct))
    branch_of.append(tuple(index[k] for k in per_device))
    load = [x + k * a.flops for x, k in zip(load, per_device, strict=True)]
  total = sum(a.count * a.flops for a in arrays)
  return MeshPlan(tuple(arrays), tuple(branches), tuple(branch_of), max(load), total)


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
  rep = tuple(x for x in sizes if x not in b + r + c + a.redundant)
  per_shard = a.slots * (n // axes_size(b + a.redundant, sizes))
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
  rep = tuple(x for x in axes if x not in b + r + c + a.redundant)
  steps = []
  if not known:
    steps.append("gathered (sharding unknown)")
  if a.redundant:
    steps.append(f"repeated over {','.join(a.redundant)}")
  if rep:
    steps.append(f"slice over {','.join(rep)}")
  if r:
    steps.append(f"all-to-all rows<->batch over {','.join(r)}")
  if c:
    steps.append(f"all-to-all cols<->batch over {','.join(c)}")
  back = " + all-gather back" if rep else ""
  if a.redundant and not (rep or r or c):
    return "; ".join(steps) + ": computed on every device, nothing moved"
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
         f"operand(s), {sum(map(len, mp.branches))} branch(es); busiest device "
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
  """Axis name -> size of a ``Mesh``, an ``AbstractMesh`` or a mapping.

  Raises:
    TypeError: ``mesh`` is none of these.
    ValueError: an axis size is not a positive integer (named with its axis).
  """
  if isinstance(mesh, Mapping):
    raw = {str(k): v for k, v in mesh.items()}
  elif hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
    raw = {str(k): v for k, v in dict(mesh.shape).items()}
  else:
    raise TypeError("mesh: expected a jax.sharding.Mesh, an AbstractMesh or a mapping of "
                    f"axis name to size, got {type(mesh).__name__}")
  if not raw:
    raise ValueError("mesh: no axes; give at least one axis name and its size")
  for name, v in raw.items():
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f"mesh: axis {name!r} has size {v!r}; axis sizes must be positive "
                       f"integers (the number of devices along the axis)")
  return {k: int(v) for k, v in raw.items()}


def _check_leaves(flat: Sequence[tuple[Any, Any]]) -> None:
  """Every leaf has a shape and a dtype (an array or a ``jax.ShapeDtypeStruct``)."""
  for p, x in flat:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise ValueError(
          f"{path_str(p)}: expected an array or a jax.ShapeDtypeStruct leaf (with shape and "
          f"dtype), got {type(x).__name__} {x!r:.40}; wrap Python scalars with jnp.asarray, "
          "and keep non-array values out of the parameter tree")


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
                       param_labels: Any = None, layer_axis: Any = None,
                       per_head: bool = False, coeffs: CoeffsLike = "keller",
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
    layer_axis: as for :func:`muonclip_jax.muon`.
    per_head: as for :func:`muonclip_jax.muon`.
    coeffs: Newton–Schulz preset or coefficients (for the FLOP counts).
    steps: Newton–Schulz steps (default: the preset's).
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    switch: as for :func:`muonclip_jax.mesh_orthogonalizer`.

  Returns:
    A :class:`MuonShardingPlan`; ``str(plan)`` is a table. With several JAX
    processes every process gets the same plan for a mesh over all devices.

  Raises:
    TypeError: ``mesh`` is not a mesh or a mapping.
    ValueError: an axis size is not a positive integer (naming the axis), a
      leaf is not an array or ``ShapeDtypeStruct``, is sharded on another
      mesh, or is a Muon leaf of rank < 2, or the errors of the routing
      (naming the parameter path).

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
  dims_fn = dimension_numbers_fn(dimension_numbers, layer_axis=layer_axis, per_head=per_head)
  ns = NSOptions(resolve_coefficients(coeffs, steps), None, check_method(method), None, 1e-7)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  _check_leaves(flat)
  labels = jax.tree.leaves(resolve_labels(params, param_labels, layer_axis=layer_axis))
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

