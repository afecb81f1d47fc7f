"""Muon on a device mesh: whole matrices, device-local Newton–Schulz.

Newton–Schulz multiplies whole matrices (``X X^T``, ``(X X^T) X``). With a
parameter sharded on a :class:`jax.sharding.Mesh` (FSDP rows or columns, tensor
parallel), letting XLA's SPMD partitioner split each product puts collectives
inside every iteration (REFERENCE.md §4: 8x-11x the momentum's bytes, or 1.8x
redundant FLOPs). Here whole matrices are moved once instead, with JAX's own
SPMD machinery (one :func:`jax.shard_map` and its collectives):

1. **Group.** Matrices that share a shape, a dtype and a sharding of their
   ``(batch, rows, cols)`` view form one operand, whether they come from
   separate leaves or from the batch axes of one stacked leaf. Tall matrices
   enter transposed (``NS(X^T) = NS(X)^T``), and so do square ones sharded by
   rows only, so that they join column-sharded ones.
2. **Reshard in.** An operand sharded ``(b, r, c)`` (mesh axes of its batch,
   rows and columns) and replicated over the remaining axes ``rep`` numbers
   the devices in the order ``b + rep + r + c``. Each device takes its slice of
   the batch over ``rep`` (no communication), then one ``all_to_all`` per
   sharded matrix axis trades its block of rows/columns of every matrix for
   whole matrices: for FSDP or tensor parallelism, one all-to-all.
3. **Local Newton–Schulz** on the device's whole matrices: no collective in
   the iteration (their number does not depend on the number of steps).
4. **Reshard out**: the reverse all-to-all, then an ``all_gather`` over
   ``rep``; every leaf comes back in its own sharding. A stacked leaf whose
   layer axis carries the whole mesh never moves.

Placement. ``count // n`` matrices of each operand go to every device; the
leftovers (``count mod n`` per operand) of all operands are placed together
by longest processing time first (Graham 1969): heaviest first, each on the
least-loaded device, so small groups of different shapes fill each other's
gaps. The layout is padded with zero matrices to a whole number of slots per
device, and each device computes only its real matrices (one
:func:`jax.lax.switch` branch per pattern of counts; XLA's cost analysis
counts the heaviest branch). An operand of one matrix is gathered whole on
every device and computed there, if that does not load the busiest device
more: same time, and nothing to send back.

:func:`muon_sharding_summary` prints what each leaf gets.

Output shardings. With an explicit mesh (``jax.make_mesh``'s default
``AxisType.Explicit``) the update runs under :func:`jax.sharding.auto_axes` and
every output takes its input's sharding type. With an ``AxisType.Auto`` mesh,
shardings are not visible while tracing, so ``init`` records the shardings of
the concrete parameters it is given and ``update`` uses them; call ``init`` on
the sharded parameters outside ``jax.jit``. A leaf whose sharding is unknown is
treated as replicated: XLA gathers it on entry (correct, more traffic) and its
output sharding is left to XLA.

Several JAX processes. The mesh may span every device of every process (a pod
slice): the plan depends only on shapes, shardings and the mesh, so every
process computes the same one, and each device runs its own branch in the one
SPMD program, the all-to-alls crossing processes where the mesh does. Nothing
is fetched to the host. ``init`` on an ``AxisType.Auto`` mesh records the
shardings of global arrays, the same on every process.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muonclip_jax._dimensions import normalize_axes, path_str
from muonclip_jax._newton_schulz import (
    _orthogonalize,
    choose_method,
    default_restarts,
    newton_schulz_flops,
    resolve_compute_dtype,
)

if TYPE_CHECKING:
  from muonclip_jax._muon import NSOptions

__all__ = [
    "ArrayPlan",
    "MeshOrthogonalizer",
    "MeshPlan",
    "mesh_orthogonalizer",
    "muon_sharding_summary",
    "plan_mesh",
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
    rows, cols: the wide (``rows <= cols``) matrix shape.
    dtype: the matrices' dtype.
    spec: the view sharding ``(b, r, c)``.
    order: mesh axes, major first, that number the devices.
    members: inputs in this operand.
    transposed: per member, whether it is tall and enters transposed.
    cells: for an unsharded batch (``b == ()``), the layout: per position,
      ``(member, index)`` of a matrix or ``None`` for a zero pad; device
      ``t`` (in ``order``) gets positions ``[t * slots, (t + 1) * slots)``.
      ``None`` for a batch-sharded single member, which is padded on device.
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
    arrays: the operands (one per shape and sharding; one per batch-sharded input).
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


def _ns_flops(rows: int, cols: int, ns: NSOptions) -> int:
  """FLOPs of one orthogonalisation as :func:`_orthogonalize` will run it."""
  steps = len(ns.config.triples)
  restarts = default_restarts(steps) if ns.restarts is None else ns.restarts
  method = ns.method
  if method == "auto":
    method = choose_method(rows, cols, steps, restarts)
  return newton_schulz_flops(rows, cols, steps, method, restarts)


def _size(axes: Axes, sizes: dict[str, int]) -> int:
  return math.prod(sizes[a] for a in axes)


def _numbering(order: Axes, sizes: dict[str, int]) -> list[int]:
  """Per device (numbered in mesh-axis order): its number in ``order``."""
  names = list(sizes)
  out = []
  for coords in itertools.product(*(range(sizes[a]) for a in names)):
    at = dict(zip(names, coords, strict=True))
    t = 0
    for a in order:
      t = t * sizes[a] + at[a]
    out.append(t)
  return out


def plan_mesh(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
              specs: Sequence[ViewSpec | None] | None, axis_sizes: dict[str, int],
              ns: NSOptions, *, switch: bool = True) -> MeshPlan:
  """Groups ``(batch, fan_in, fan_out)`` matrices and places them on the devices.

  Matrices of one shape (tall ones transposed) and sharding form one operand.
  Each gets ``count // n`` matrices per device; the rest (``count mod n`` per
  operand) are placed by longest processing time first (Graham 1969): heaviest
  first, each on the least-loaded device. A device computes only its real
  matrices (a :func:`jax.lax.switch` branch per pattern of counts); with
  ``switch=False`` or more than ``MAX_BRANCHES`` patterns, every device
  computes every slot, pads included. A batch-sharded input (a stacked layer
  axis on the mesh) stays on its devices as its own operand.

  Args:
    shapes: the matrix views, in the orthogonaliser's input order.
    dtypes: their dtypes.
    specs: their view shardings (mesh axes of batch, fan-in, fan-out), or
      ``None`` where unknown (treated as replicated: gathered on entry).
    axis_sizes: mesh axis name -> size, in mesh order.
    ns: the Newton–Schulz options (for the per-matrix cost).
    switch: skip pads with a per-device branch.

  Returns:
    A :class:`MeshPlan`.
  """
  sizes = dict(axis_sizes)
  axes = tuple(sizes)
  n = _size(axes, sizes)
  specs = [None] * len(shapes) if specs is None else list(specs)

  def order_of(spec: ViewSpec) -> Axes:
    b, r, c = spec
    return b + tuple(a for a in axes if a not in b + r + c) + r + c

  arrays: list[ArrayPlan] = []
  pooled: dict[tuple[Any, ...], list[int]] = {}
  transpose: dict[int, bool] = {}
  for i, ((batch, fi, fo), dt, sp) in enumerate(zip(shapes, dtypes, specs, strict=True)):
    sp = REPLICATED if sp is None else sp
    # Tall matrices enter transposed; so do square ones sharded by rows only, so
    # that they share an operand with column-sharded ones (NS(X^T) = NS(X)^T).
    tall = fi > fo or (fi == fo and bool(sp[1]) and not sp[2])
    transpose[i] = tall
    wide_spec = (sp[0], sp[2], sp[1]) if tall else sp
    rows, cols = min(fi, fo), max(fi, fo)
    b = wide_spec[0]
    if b and batch % _size(b, sizes) == 0:
      local = batch // _size(b, sizes)
      m = n // _size(b, sizes)
      slots = -(-local // m)
      counts = tuple(min(max(local - (t % m) * slots, 0), slots) for t in range(n))
      arrays.append(ArrayPlan(rows, cols, jnp.dtype(dt), wide_spec, order_of(wide_spec), (i,),
                              (tall,), None, slots, counts, _ns_flops(rows, cols, ns)))
    else:
      if b:  # Uneven batch sharding: gather it.
        wide_spec = ((),) + wide_spec[1:]
      key = (rows, cols, jnp.dtype(dt).name, wide_spec)
      pooled.setdefault(key, []).append(i)

  numbering = {a.order: _numbering(a.order, sizes) for a in arrays}
  base = [0] * n  # per device in mesh order
  for a in arrays:
    num = numbering[a.order]
    for p in range(n):
      base[p] += a.counts[num[p]] * a.flops
  drafts = []
  leftovers = []  # (weight, draft index, member j, index k)
  for (rows, cols, dt, spec), members in pooled.items():
    mats = [(j, k) for j, i in enumerate(members) for k in range(shapes[i][0])]
    q = len(mats) // n
    flops = _ns_flops(rows, cols, ns)
    order = order_of(spec)
    if order not in numbering:
      numbering[order] = _numbering(order, sizes)
    base = [x + q * flops for x in base]
    leftovers += [(flops, len(drafts), j, k) for j, k in mats[n * q:]]
    drafts.append(((rows, cols, dt, spec, tuple(members)), order, flops, mats, q))

  def lpt(replicated: set[int]) -> tuple[list[tuple[int, int, int, int]], int]:
    """Longest processing time first over the leftovers, on top of the uniform load."""
    load = [x + sum(drafts[d][2] for d in replicated) for x in base]
    placed = []
    for flops, d, j, k in sorted(leftovers, key=lambda x: (-x[0], x[1])):
      if d in replicated:
        continue
      p = min(range(n), key=lambda p: (load[p], p))
      load[p] += flops
      placed.append((d, j, k, p))
    return placed, max(load)

  # A lone matrix of its operand is computed on every device instead (gathered
  # once, nothing to send back) when that does not load the busiest device more.
  replicated: set[int] = set()
  placed, busiest = lpt(replicated)
  for d in sorted((d for d, x in enumerate(drafts) if len(x[3]) == 1), key=lambda d: -drafts[d][2]):
    trial, cost = lpt(replicated | {d})
    if cost <= busiest:
      replicated.add(d)
      placed, busiest = trial, cost
  for d, ((rows, cols, dt, spec, members), order, flops, mats, q) in enumerate(drafts):
    transposed = tuple(transpose[i] for i in members)
    if d in replicated:
      arrays.append(ArrayPlan(rows, cols, jnp.dtype(dt), spec, order, members, transposed,
                              (mats[0],), 1, (1,) * n, flops, True))
      continue
    per_device = [list(mats[t * q:(t + 1) * q]) for t in range(n)]
    for dd, j, k, p in placed:
      if dd == d:
        per_device[numbering[order][p]].append((j, k))
    slots = max(len(x) for x in per_device)
    cells: list[tuple[int, int] | None] = []
    for x in per_device:
      cells += x + [None] * (slots - len(x))
    arrays.append(ArrayPlan(rows, cols, jnp.dtype(dt), spec, order, members, transposed,
                            tuple(cells), slots, tuple(len(x) for x in per_device), flops))

  per_device = [tuple(a.counts[numbering[a.order][p]] for a in arrays) for p in range(n)]
  patterns = sorted(set(per_device))
  if not switch or len(patterns) > MAX_BRANCHES:
    patterns = [tuple(a.slots for a in arrays)]
    per_device = patterns * n
  busiest = max(sum(c * a.flops for c, a in zip(pat, arrays, strict=True)) for pat in patterns)
  total = sum(a.count * a.flops for a in arrays)
  return MeshPlan(tuple(arrays), tuple(patterns),
                  tuple(patterns.index(pat) for pat in per_device), busiest, total)


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


def _to_wide(x: jax.Array, transposed: bool) -> jax.Array:
  return jnp.swapaxes(x, -1, -2) if transposed else x


def _auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``AxisType.Auto`` (for constraints and shard_map)."""
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _entry(axes: Axes) -> Any:
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


class MeshOrthogonalizer:
  """Callable ``(mats, ns) -> orthogonalised mats`` on a mesh (see module doc).

  Also carries the update wrapper (:meth:`wrap_update`) that sets the output
  shardings, and the shardings ``init`` recorded for ``AxisType.Auto`` meshes.
  """

  def __init__(self, mesh: Mesh, switch: bool = True):
    if not isinstance(mesh, Mesh):
      raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    self.mesh = mesh
    self.switch = switch
    self.axes: Axes = tuple(mesh.axis_names)
    self.sizes: dict[str, int] = dict(mesh.shape)
    self.n: int = int(mesh.devices.size)
    self._auto = _auto_mesh(mesh)
    self._explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                           if t == AxisType.Explicit)
    self.recorded: dict[tuple[str, tuple[int, ...]], P] = {}
    # View shardings of the inputs being traced (set by wrap_update), in order.
    self._view_specs: list[ViewSpec | None] | None = None

  def plan(self, shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
           ns: NSOptions, specs: Sequence[ViewSpec | None] | None = None) -> MeshPlan:
    return plan_mesh(shapes, dtypes, specs, self.sizes, ns, switch=self.switch)

  # -- orthogonalisation -------------------------------------------------------------

  def __call__(self, mats: Sequence[jax.Array], ns: NSOptions) -> list[jax.Array]:
    mats = list(mats)
    if not mats:
      return []
    specs = self._view_specs
    if specs is not None and len(specs) != len(mats):
      specs = None
    plan = self.plan([tuple(m.shape) for m in mats], [m.dtype for m in mats], ns, specs)

    operands = []
    for a in plan.arrays:
      if a.cells is None:
        operands.append(_to_wide(mats[a.members[0]], a.transposed[0]))
        continue
      zero = jnp.zeros((a.rows, a.cols), a.dtype)
      operands.append(jnp.stack([
          zero if cell is None else _to_wide(mats[a.members[cell[0]]][cell[1]],
                                             a.transposed[cell[0]])
          for cell in a.cells]))
    specs_in = tuple(P(*(_entry(x) for x in a.spec)) for a in plan.arrays)
    fns = []
    for a in plan.arrays:
      dt = resolve_compute_dtype(ns.dtype, a.dtype)
      fns.append(functools.partial(_orthogonalize, cfg=ns.config, compute_dtype=dt,
                                   method=ns.method, restarts=ns.restarts, eps=ns.eps))
    ys = jax.shard_map(functools.partial(self._local, plan, fns), mesh=self._auto,
                       in_specs=specs_in, out_specs=specs_in, check_vma=False)(*operands)

    out: list[list[jax.Array | None]] = [[None] * m.shape[0] for m in mats]
    result: list[jax.Array | None] = [None] * len(mats)
    for a, y in zip(plan.arrays, ys, strict=True):
      if a.cells is None:
        i = a.members[0]
        result[i] = _to_wide(y, a.transposed[0]).astype(mats[i].dtype)
        continue
      for pos, cell in enumerate(a.cells):
        if cell is not None:
          j, k = cell
          out[a.members[j]][k] = _to_wide(y[pos], a.transposed[j])
    for i, m in enumerate(mats):
      if result[i] is None:
        result[i] = jnp.stack(out[i]).astype(m.dtype)
    return result  # type: ignore[return-value]

  def _local(self, plan: MeshPlan, fns: Sequence[Callable[[jax.Array], jax.Array]],
             *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Per device: reshard in, Newton–Schulz on its whole matrices, reshard out."""
    n = self.n
    whole, undo = [], []
    for a, x in zip(plan.arrays, xs, strict=True):
      b, r, c = a.spec
      if a.replicated:
        if r:
          x = jax.lax.all_gather(x, r, axis=1, tiled=True)
        if c:
          x = jax.lax.all_gather(x, c, axis=2, tiled=True)
        whole.append(x)
        undo.append(None)
        continue
      rep = tuple(ax for ax in self.axes if ax not in b + r + c)
      local = x.shape[0]
      per_shard = a.slots * (n // _size(b, self.sizes))
      if local < per_shard:  # batch-sharded input: pad on device
        x = jnp.concatenate([x, jnp.zeros((per_shard - local,) + x.shape[1:], x.dtype)])
      if rep:
        size = per_shard // _size(rep, self.sizes)
        x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(rep) * size, size, axis=0)
      if r:
        x = jax.lax.all_to_all(x, r, 0, 1, tiled=True)
      if c:
        x = jax.lax.all_to_all(x, c, 0, 2, tiled=True)
      whole.append(x)
      undo.append((rep, r, c, local))

    def branch(pattern: tuple[int, ...]) -> Callable[..., tuple[jax.Array, ...]]:
      def run(*ws: jax.Array) -> tuple[jax.Array, ...]:
        ys = []
        for f, w, k in zip(fns, ws, pattern, strict=True):
          if k == 0:
            ys.append(w)
          elif k == w.shape[0]:
            ys.append(f(w))
          else:
            ys.append(jnp.concatenate([f(w[:k]), w[k:]]))
        return tuple(ys)
      return run

    if len(plan.patterns) == 1:
      ys = branch(plan.patterns[0])(*whole)
    else:
      idx = jnp.asarray(np.asarray(plan.branch_of, np.int32))[jax.lax.axis_index(self.axes)]
      ys = jax.lax.switch(idx, [branch(p) for p in plan.patterns], *whole)

    outs = []
    for a, y, how in zip(plan.arrays, ys, undo, strict=True):
      if how is None:  # replicated: keep this device's shard of the result
        _, r, c = a.spec
        for axis, names in ((1, r), (2, c)):
          if names:
            size = y.shape[axis] // _size(names, self.sizes)
            y = jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index(names) * size, size, axis)
        outs.append(y)
        continue
      rep, r, c, local = how
      if c:
        y = jax.lax.all_to_all(y, c, 2, 0, tiled=True)
      if r:
        y = jax.lax.all_to_all(y, r, 1, 0, tiled=True)
      if rep:
        y = jax.lax.all_gather(y, rep, axis=0, tiled=True)
      outs.append(y[:local])
    return tuple(outs)

  # -- output shardings --------------------------------------------------------------

  def record(self, params: Any) -> None:
    """Records the mesh shardings of concrete ``params`` (for ``AxisType.Auto`` meshes)."""
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      s = getattr(x, "sharding", None)
      if isinstance(s, NamedSharding) and s.mesh.shape_tuple == self.mesh.shape_tuple:
        self.recorded[(path_str(p), tuple(x.shape))] = s.spec

  def _targets(self, tree: Any) -> Any:
    """Per leaf of ``tree``: the sharding its output must take, or ``None``."""
    def target(p, x):
      if self._explicit:
        return jax.typeof(x).sharding
      spec = self.recorded.get((path_str(p), tuple(x.shape)))
      return None if spec is None else NamedSharding(self._auto, spec)
    return jax.tree_util.tree_map_with_path(target, tree)

  def wrap_update(self, update_fn: Callable[..., Any],
                  dims_fn: Callable[[str, tuple[int, ...]], Any]) -> Callable[..., Any]:
    """Runs ``update_fn`` with auto sharding inside and fixes its outputs' shardings.

    Args:
      update_fn: ``(updates, state, params) -> (updates, state)``.
      dims_fn: ``(path, shape) -> MuonDimensionNumbers``, the leaves' matrix views.
    """
    def view(p, x, t):
      if t is None:
        return None
      path, shape = path_str(p), tuple(x.shape)
      return view_spec(t.spec, shape, *normalize_axes(path, shape, dims_fn(path, shape)))

    def wrapped(updates, state, params=None):
      targets = (self._targets(updates), self._targets(state))
      flat = jax.tree_util.tree_flatten_with_path(updates)[0]
      tflat = jax.tree.leaves(targets[0], is_leaf=lambda t: t is None)
      self._view_specs = [view(p, x, t) for (p, x), t in zip(flat, tflat, strict=True)]
      try:
        if self._explicit:
          return jax.sharding.auto_axes(update_fn, axes=self._explicit,
                                        out_sharding=targets)(updates, state, params)
        out = update_fn(updates, state, params)
      finally:
        self._view_specs = None
      return jax.tree.map(
          lambda s, x: x if s is None else jax.lax.with_sharding_constraint(x, s),
          targets, out, is_leaf=lambda s: s is None)
    return wrapped


def mesh_orthogonalizer(mesh: Mesh, switch: bool = True) -> MeshOrthogonalizer:
  """The device-local Newton–Schulz of ``scale_by_muon(..., mesh=mesh)``.

  Args:
    mesh: the device mesh; all its axes are flattened into the matrix batch.
    switch: let each device skip its pad matrices (a :func:`jax.lax.switch`
      branch per pattern); ``False`` computes the pads (one program).

  Returns:
    A :class:`MeshOrthogonalizer`: ``fn(mats, ns)`` maps a list of
    ``(batch, fan_in, fan_out)`` arrays to their orthogonalisations (same
    shapes and dtypes).
  """
  return MeshOrthogonalizer(mesh, switch)


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


def muon_sharding_summary(params: Any, mesh: Mesh, dimension_numbers: Any = None, *,
                          param_labels: Any = None, coeffs: Any = "keller",
                          steps: int | None = None, method: str = "auto",
                          switch: bool = True) -> str:
  """A printable table of how ``muon(..., mesh=mesh)`` orthogonalises each leaf.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct`` with
      ``sharding``); leaves without a :class:`NamedSharding` count as unknown.
    mesh: the mesh passed to ``muon``.
    dimension_numbers: as for :func:`muonclip_jax.scale_by_muon`.
    param_labels: as for :func:`muonclip_jax.muon` (default routing); AdamW
      leaves are listed as such.
    coeffs, steps, method: the Newton–Schulz options (for FLOP counts).
    switch: as for :func:`mesh_orthogonalizer`.

  Returns:
    Per leaf: parameter shape and sharding, matrix view, operand, how the
    operand moves, devices computing it and pad slots; per operand: matrices,
    slots per device; in total: busiest device's Newton–Schulz FLOPs against
    the ideal ``total / n``. A plan from shapes and shardings only: with
    several JAX processes every process gets the same text for a mesh over
    all their devices (print it on process 0).
  """
  from muonclip_jax._coefficients import resolve_coefficients
  from muonclip_jax._muon import NSOptions, _dims_lookup
  from muonclip_jax._routing import MUON, resolve_labels

  dims_fn = _dims_lookup(dimension_numbers)
  ns = NSOptions(resolve_coefficients(coeffs, steps), None, method, None, 1e-7)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  labels = jax.tree.leaves(resolve_labels(params, param_labels))
  orth = MeshOrthogonalizer(mesh, switch)
  rows_adam, idx, shapes, dtypes, specs, known = [], [], [], [], [], []
  for (p, x), label in zip(flat, labels, strict=True):
    path, shape = path_str(p), tuple(x.shape)
    s = getattr(x, "sharding", None)
    spec = s.spec if isinstance(s, NamedSharding) else None
    if label != MUON:
      rows_adam.append((path, shape, spec))
      continue
    batch, red, out = normalize_axes(path, shape, dims_fn(path, shape))
    shapes.append((math.prod(shape[d] for d in batch), math.prod(shape[d] for d in red),
                   math.prod(shape[d] for d in out)))
    dtypes.append(x.dtype)
    vs = None if spec is None else view_spec(spec, shape, batch, red, out)
    specs.append(vs)
    known.append(vs is not None)
    idx.append((path, shape, spec))
  plan = orth.plan(shapes, dtypes, ns, specs)
  of = {}
  for t, a in enumerate(plan.arrays):
    for i in a.members:
      of[i] = t
  header = ["leaf", "shape", "sharding", "matrices", "operand", "moved by", "devices", "pads"]
  lines = []
  for i, (path, shape, spec) in enumerate(idx):
    a = plan.arrays[of[i]]
    b_, fi, fo = shapes[i]
    mark = " (T)" if a.transposed[a.members.index(i)] else ""
    lines.append([path, "x".join(map(str, shape)), str(spec) if spec is not None else "?",
                  f"{b_} x {fi}x{fo}{mark}", str(of[i]),
                  _describe(a, orth.axes, known[i]),
                  f"{sum(1 for k in a.counts if k)}/{orth.n}", str(a.padding)])
  for path, shape, spec in rows_adam:
    lines.append([path, "x".join(map(str, shape)), str(spec) if spec is not None else "?",
                  "-", "-", "AdamW (elementwise, in place)", "-", "-"])
  widths = [max(len(r[k]) for r in [header] + lines) for k in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
  ideal = plan.total_flops / orth.n if plan.total_flops else 0.0
  ratio = plan.per_device_flops / ideal if ideal else float("nan")
  out = [f"Muon on mesh {dict(orth.sizes)} ({orth.n} devices): {len(plan.arrays)} operand(s), "
         f"{len(plan.patterns)} device pattern(s); busiest device "
         f"{plan.per_device_flops:.3g} Newton–Schulz FLOPs = {ratio:.3f} x ideal "
         f"({plan.total_flops:.3g} / {orth.n})", fmt(header), fmt(["-" * w for w in widths])]
  out += [fmt(r) for r in lines]
  out.append("operands: " + "; ".join(
      f"{t}: {a.count} x {a.rows}x{a.cols} {a.dtype.name}, {a.slots} slot(s)/device"
      for t, a in enumerate(plan.arrays)))
  return "\n".join(out)
