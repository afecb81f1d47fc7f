"""Muon on a device mesh: whole matrices, device-local Newton–Schulz.

Newton–Schulz multiplies whole matrices (``X X^T``, ``(X X^T) X``). With a
parameter sharded on a :class:`jax.sharding.Mesh` (FSDP rows or columns, tensor
parallel), letting XLA's SPMD partitioner split each product puts collectives
inside every iteration (measured for ``optax.contrib.muon`` under 8-way FSDP:
8x-11x the momentum's bytes in all-gathers, or 1.8x redundant FLOPs). Here
whole matrices are moved once instead, with JAX's own SPMD machinery (one
:func:`jax.shard_map` and its collectives):

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
more: same time, and nothing to send back. An operand of fewer matrices than
devices is not padded to one per device when the gather back would move more
than twice its own bytes: it is spread over only some of the replicated mesh
axes and computed again along the others (on all of them, for unsharded
matrices: every device computes them and nothing moves), whichever costs
least in FLOPs and bytes (:func:`muonclip_jax._mesh_placement._spread_axes`).

:mod:`muonclip_jax._mesh_placement` decides the placement from shapes alone,
:mod:`muonclip_jax._mesh_cost` prices its collectives, and
:func:`muonclip_jax.plan_muon_sharding` (:mod:`muonclip_jax._mesh_plan`) shows
both for a tree; this module only runs the placement.

Output shardings. With an explicit mesh (``jax.make_mesh``'s default
``AxisType.Explicit``) the update runs under :func:`jax.sharding.auto_axes` and
every output takes its input's sharding type. With an ``AxisType.Auto`` mesh,
shardings are not visible while tracing, so ``init`` records the shardings of
the concrete parameters it is given (in the orthogonaliser, at construction
of the state, not during tracing) and ``update`` uses them; call ``init`` on
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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muonclip_jax._dimensions import normalize_axes
from muonclip_jax._mesh_placement import ArrayPlan, MeshPlan, axes_size, plan_mesh
from muonclip_jax._mesh_plan import muon_sharding_summary  # noqa: F401  (old import path)
from muonclip_jax._newton_schulz import NSOptions, orthogonalize_traced, resolve_compute_dtype
from muonclip_jax._paths import path_str
from muonclip_jax._view_sharding import Axes, ViewSpec, view_spec

__all__ = [
    "MeshOrthogonalizer",
    "mesh_orthogonalizer",
]


def _to_wide(x: jax.Array, transposed: bool) -> jax.Array:
  return jnp.swapaxes(x, -1, -2) if transposed else x


def _auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis ``AxisType.Auto`` (for constraints and shard_map)."""
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _entry(axes: Axes) -> Any:
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


class _Undo(NamedTuple):
  """What :meth:`MeshOrthogonalizer._reshard_out` needs to reverse the way in."""

  rep: Axes
  rows: Axes
  cols: Axes
  sizes: tuple[int, ...]  # local batch of each member (joined on device)
  counts: tuple[int, ...] | None  # batch-sharded: real matrices per position


class MeshOrthogonalizer:
  """Callable ``(mats, ns, specs) -> orthogonalised mats`` on a mesh (see module doc).

  Satisfies the :class:`muonclip_jax._newton_schulz.Orthogonalizer` protocol,
  like the single-device ``LocalOrthogonalizer``. Also carries the update
  wrapper (:meth:`wrap_update`) that passes the view shardings in and sets
  the output shardings, and the shardings ``init`` recorded for
  ``AxisType.Auto`` meshes.
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

  def place(self, shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[Any],
            ns: NSOptions, specs: Sequence[ViewSpec | None] | None = None) -> MeshPlan:
    """The mesh plan (:func:`~muonclip_jax._mesh_placement.plan_mesh`) for these matrices."""
    return plan_mesh(shapes, dtypes, specs, self.sizes, ns, switch=self.switch)

  # -- orthogonalisation -------------------------------------------------------------

  def __call__(self, mats: Sequence[jax.Array], ns: NSOptions,
               specs: Sequence[ViewSpec | None] | None = None) -> list[jax.Array]:
    mats = list(mats)
    if not mats:
      return []
    if specs is not None and len(specs) != len(mats):
      raise ValueError(f"specs: expected one view sharding per matrix ({len(mats)}), "
                       f"got {len(specs)}")
    plan = self.place([tuple(m.shape) for m in mats], [m.dtype for m in mats], ns, specs)
    inputs, in_specs = _pack(plan, mats)
    fns = [functools.partial(orthogonalize_traced, cfg=ns.config,
                             compute_dtype=resolve_compute_dtype(ns.dtype, a.dtype),
                             method=ns.method, restarts=ns.restarts, eps=ns.eps)
           for a in plan.arrays]
    ys = jax.shard_map(functools.partial(self._local, plan, fns), mesh=self._auto,
                       in_specs=in_specs, out_specs=in_specs, check_vma=False)(*inputs)
    return _unpack(plan, mats, ys)

  def _local(self, plan: MeshPlan, fns: Sequence[Callable[[jax.Array], jax.Array]],
             *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Per device: reshard in, Newton–Schulz on its whole matrices, reshard out."""
    whole, undo, at = [], [], 0
    for a in plan.arrays:
      k = 1 if a.cells is not None else len(a.members)
      w, u = self._reshard_in(a, xs[at:at + k])
      whole.append(w)
      undo.append(u)
      at += k
    ys = self._compute(plan, fns, whole)
    outs: list[jax.Array] = []
    for a, y, u in zip(plan.arrays, ys, undo, strict=True):
      outs += self._reshard_out(a, y, u)
    return tuple(outs)

  def _reshard_in(self, a: ArrayPlan, xs: Sequence[jax.Array]) -> tuple[jax.Array, _Undo | None]:
    """Whole matrices of operand ``a`` on this device (its ``slots``)."""
    b, r, c = a.spec
    if a.replicated:  # gather the lone matrix whole
      (x,) = xs
      if r:
        x = jax.lax.all_gather(x, r, axis=1, tiled=True)
      if c:
        x = jax.lax.all_gather(x, c, axis=2, tiled=True)
      return x, None
    # Batch-sharded members are joined on device (no communication); position
    # t of the batch shard gets the next counts[t] matrices, padded to slots.
    x = xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    # Axes in a.redundant take no slice: their devices repeat the same work.
    rep = tuple(ax for ax in self.axes if ax not in b + r + c + a.redundant)
    m = self.n // axes_size(b + a.redundant, self.sizes)
    per_shard = a.slots * m
    if a.cells is None and x.shape[0] < per_shard:
      x = _spread(x, a.counts[:m], a.slots)
    if rep:  # replicated axes: each device keeps its slice of the batch
      size = per_shard // axes_size(rep, self.sizes)
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(rep) * size, size, axis=0)
    # Trade a block of rows (then columns) of every matrix for whole matrices.
    if r:
      x = jax.lax.all_to_all(x, r, split_axis=0, concat_axis=1, tiled=True)
    if c:
      x = jax.lax.all_to_all(x, c, split_axis=0, concat_axis=2, tiled=True)
    spread = a.counts[:m] if a.cells is None else None
    return x, _Undo(rep, r, c, tuple(v.shape[0] for v in xs), spread)

  def _reshard_out(self, a: ArrayPlan, y: jax.Array, undo: _Undo | None) -> list[jax.Array]:
    """The reverse of :meth:`_reshard_in`: each member's local block."""
    if undo is None:  # replicated: keep this device's shard of the result
      _, r, c = a.spec
      for axis, names in ((1, r), (2, c)):
        if names:
          size = y.shape[axis] // axes_size(names, self.sizes)
          y = jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index(names) * size, size, axis)
      return [y]
    if undo.cols:
      y = jax.lax.all_to_all(y, undo.cols, split_axis=2, concat_axis=0, tiled=True)
    if undo.rows:
      y = jax.lax.all_to_all(y, undo.rows, split_axis=1, concat_axis=0, tiled=True)
    if undo.rep:
      y = jax.lax.all_gather(y, undo.rep, axis=0, tiled=True)
    if undo.counts is not None and sum(undo.counts) < y.shape[0]:
      y = _gather_real(y, undo.counts, y.shape[0] // len(undo.counts))
    starts = np.cumsum((0,) + undo.sizes)
    return [y[s:e] for s, e in zip(starts[:-1], starts[1:], strict=True)]

  def _compute(self, plan: MeshPlan, fns: Sequence[Callable[[jax.Array], jax.Array]],
               whole: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Newton–Schulz on this device's real matrices (a branch per count skips pads)."""
    def first(f: Callable[[jax.Array], jax.Array], k: int) -> Callable[[jax.Array], jax.Array]:
      def run(w: jax.Array) -> jax.Array:
        if k == 0:
          return w
        if k == w.shape[0]:
          return f(w)
        return jnp.concatenate([f(w[:k]), w[k:]])
      return run

    ys = []
    me = jax.lax.axis_index(self.axes)
    for f, w, counts, of in zip(fns, whole, plan.branches, plan.branch_of, strict=True):
      if len(counts) == 1:
        ys.append(first(f, counts[0])(w))
        continue
      idx = jnp.asarray(np.asarray(of, np.int32))[me]
      ys.append(jax.lax.switch(idx, [first(f, k) for k in counts], w))
    return tuple(ys)

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
      update_fn: ``(updates, state, params, view_specs=None) -> (updates, state)``;
        it receives the view sharding of every update leaf (``None`` where
        unknown) and passes them on to this orthogonaliser.
      dims_fn: ``(path, shape) -> MuonDimensionNumbers``, the leaves' matrix views.

    Returns:
      ``(updates, state, params=None) -> (updates, state)``.
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
      specs = [view(p, x, t) for (p, x), t in zip(flat, tflat, strict=True)]
      run = functools.partial(update_fn, view_specs=specs)
      if self._explicit:  # outputs take their targets' explicit shardings
        return jax.sharding.auto_axes(run, axes=self._explicit,
                                      out_sharding=targets)(updates, state, params)
      out = run(updates, state, params)
      return jax.tree.map(
          lambda s, x: x if s is None else jax.lax.with_sharding_constraint(x, s),
          targets, out, is_leaf=lambda s: s is None)
    return wrapped


def _spread(x: jax.Array, counts: Sequence[int], slots: int) -> jax.Array:
  """``counts[t]`` consecutive matrices of ``x`` then zero pads, for each position ``t``."""
  pieces, at = [], 0
  for k in counts:
    if k:
      pieces.append(x[at:at + k])
    if slots - k:
      pieces.append(jnp.zeros((slots - k,) + x.shape[1:], x.dtype))
    at += k
  return jnp.concatenate(pieces)


def _gather_real(y: jax.Array, counts: Sequence[int], slots: int) -> jax.Array:
  """The inverse of :func:`_spread`: the real matrices, in order."""
  return jnp.concatenate([y[t * slots:t * slots + k] for t, k in enumerate(counts) if k])


def _pack(plan: MeshPlan, mats: Sequence[jax.Array]) -> tuple[list[jax.Array], tuple[P, ...]]:
  """The shard_map inputs: one stacked array per pooled operand (pads as zeros),
  each member of a batch-sharded operand as it is."""
  inputs, specs = [], []
  for a in plan.arrays:
    spec = P(*(_entry(x) for x in a.spec))
    if a.cells is None:
      for i, t in zip(a.members, a.transposed, strict=True):
        inputs.append(_to_wide(mats[i], t))
        specs.append(spec)
      continue
    zero = jnp.zeros((a.rows, a.cols), a.dtype)
    inputs.append(jnp.stack([
        zero if cell is None else _to_wide(mats[a.members[cell[0]]][cell[1]],
                                           a.transposed[cell[0]])
        for cell in a.cells]))
    specs.append(spec)
  return inputs, tuple(specs)


def _unpack(plan: MeshPlan, mats: Sequence[jax.Array], ys: Sequence[jax.Array]
            ) -> list[jax.Array]:
  """The inverse of :func:`_pack`: each input's orthogonalised matrices, in its dtype."""
  pieces: list[list[jax.Array | None]] = [[None] * m.shape[0] for m in mats]
  result: list[jax.Array | None] = [None] * len(mats)
  at = 0
  for a in plan.arrays:
    if a.cells is None:
      for i, t in zip(a.members, a.transposed, strict=True):
        result[i] = _to_wide(ys[at], t).astype(mats[i].dtype)
        at += 1
      continue
    y = ys[at]
    at += 1
    for pos, cell in enumerate(a.cells):
      if cell is not None:
        j, k = cell
        pieces[a.members[j]][k] = _to_wide(y[pos], a.transposed[j])
  for i, m in enumerate(mats):
    if result[i] is None:
      result[i] = jnp.stack(pieces[i]).astype(m.dtype)
  return result  # type: ignore[return-value]


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
