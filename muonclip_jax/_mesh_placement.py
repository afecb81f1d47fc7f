r"""Where Muon orthogonalises each matrix on a mesh: a plan from shapes alone.

The mental model is Keller Jordan's distributed Muon: each device takes whole
matrices round robin, orthogonalises them locally, and the results are
gathered back. Here the same idea is planned statically, so that it runs as
one SPMD program with collectives XLA can schedule (:mod:`._sharding` runs the
plan; this module only decides it; :mod:`._mesh_cost` prices its collectives
and :mod:`._mesh_plan` reports it for a parameter tree):

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
their bytes (:func:`muonclip_jax._mesh_cost.operand_collectives`), checked
against the compiled HLO on 8 host devices in ``tests/test_sharding.py``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from muonclip_jax._newton_schulz import (
  NSOptions,
  choose_method,
  default_restarts,
  newton_schulz_flops,
)
from muonclip_jax._view_sharding import Axes, ViewSpec

__all__ = ["ArrayPlan", "MeshPlan", "axes_size", "ns_flops", "plan_mesh"]

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
