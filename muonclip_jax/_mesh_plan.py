"""The plan of ``muon(..., mesh=mesh)`` for a parameter tree, and its printed report.

:func:`plan_muon_sharding` routes the leaves, takes each Muon leaf's matrix
view and its sharding (:mod:`._view_sharding`), places the matrices
(:mod:`._mesh_placement`) and prices the collectives (:mod:`._mesh_cost`);
:class:`MuonShardingPlan` holds the result and prints as a table
(:func:`muon_sharding_summary`).

The plan needs only shapes, dtypes, view shardings and the mesh's axis sizes:
it takes ``jax.ShapeDtypeStruct`` leaves on a
:class:`jax.sharding.AbstractMesh` (or a dict of axis sizes), so a pod-scale
run can be planned on a laptop.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonclip_jax._coefficients import CoeffsLike, resolve_coefficients
from muonclip_jax._dimensions import check_matrix_rank, dimension_numbers_fn, normalize_axes
from muonclip_jax._layer_axis import check_layer_axis, check_layer_axis_used
from muonclip_jax._mesh_cost import Collective, operand_collectives
from muonclip_jax._mesh_placement import (  # noqa: F401  (ns_flops, axes_size: old import path)
  ArrayPlan,
  MeshPlan,
  axes_size,
  ns_flops,
  plan_mesh,
)
from muonclip_jax._newton_schulz import NSOptions, check_method
from muonclip_jax._paths import path_str
from muonclip_jax._routing import MUON, resolve_labels
from muonclip_jax._view_sharding import Axes, entry_axes, view_spec  # noqa: F401

__all__ = [
  "ArrayPlan",
  "Collective",
  "LeafPlacement",
  "MeshPlan",
  "MuonShardingPlan",
  "mesh_axis_sizes",
  "muon_sharding_summary",
  "operand_collectives",
  "plan_mesh",
  "plan_muon_sharding",
  "view_spec",
]


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
  check_layer_axis_used((path_str(p) for p, _ in flat), check_layer_axis(layer_axis))
  labels = jax.tree.leaves(resolve_labels(params, param_labels, layer_axis=layer_axis))
  views, dtypes, vspecs, rows = [], [], [], []
  for (p, x), label in zip(flat, labels, strict=True):
    path, shape, spec = path_str(p), tuple(x.shape), _leaf_spec(x, sizes)
    if label != MUON:
      rows.append((path, shape, spec, None, None))
      continue
    check_matrix_rank(path, shape)
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


def muon_sharding_summary(params: Any, mesh: Any, dimension_numbers: Any = None, *,
                          param_labels: Any = None, layer_axis: Any = None,
                          per_head: bool = False, coeffs: Any = "keller",
                          steps: int | None = None, method: str = "auto",
                          switch: bool = True) -> str:
  """A printable table of how ``muon(..., mesh=mesh)`` orthogonalises each leaf.

  ``str(plan_muon_sharding(...))``: see :func:`muonclip_jax.plan_muon_sharding`
  for the structured plan.

  Args:
    params: arrays or ``jax.ShapeDtypeStruct`` leaves with their shardings.
    mesh: a ``Mesh``, an ``AbstractMesh`` or a mapping of axis sizes.
    dimension_numbers: as for :func:`muonclip_jax.scale_by_muon`.
    param_labels: as for :func:`muonclip_jax.muon`.
    layer_axis: as for :func:`muonclip_jax.muon`.
    per_head: as for :func:`muonclip_jax.muon`.
    coeffs: Newton–Schulz preset or coefficients (for the FLOP counts).
    steps: Newton–Schulz steps.
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    switch: as for :func:`muonclip_jax.mesh_orthogonalizer`.

  Returns:
    A header line (busiest device's Newton–Schulz FLOPs against the ideal
    ``total / n``, the collectives and bytes per device), then per leaf:
    parameter shape and sharding, matrix view, operand, how the operand
    moves, devices computing it and pad slots; then the operands.
  """
  return str(plan_muon_sharding(params, mesh, dimension_numbers, param_labels=param_labels,
                                layer_axis=layer_axis, per_head=per_head, coeffs=coeffs,
                                steps=steps, method=method, switch=switch))
