"""A printable report of what :func:`muonclip_jax.muon` does with each parameter.

For every leaf: its label (Muon or AdamW) and the rule that chose it; for a
Muon leaf, its matrix view (batch, fan-in and fan-out axes and their sizes) and
the rule that chose that. Leaves whose view cannot be told for sure from names
and shapes are flagged with the reason. It uses the very functions the
optimizer uses, with the same arguments, so it reports what ``muon`` will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from muonclip_jax._dimensions import (
  DimensionNumbersLike,
  check_matrix_rank,
  dimension_rules_fn,
  normalize_axes,
)
from muonclip_jax._layer_axis import LayerAxisLike, check_layer_axis, check_layer_axis_used
from muonclip_jax._paths import path_str
from muonclip_jax._routing import MUON, label_rule, matrix_rank, resolve_labels
from muonclip_jax._shape_scaling import check_shape_scaling

__all__ = ["MuonRouting", "RoutedLeaf", "muon_routing"]


class RoutedLeaf(NamedTuple):
  """One parameter in a :class:`MuonRouting` report.

  Attributes:
    path: the ``'/'``-joined parameter path.
    shape: the parameter's shape.
    label: ``"muon"`` or ``"adamw"``.
    label_rule: why it got that label (``"param_labels"`` when given).
    batch_axes: the batch axes of the matrix view (``()`` for AdamW leaves).
    fan_in_axes: the fan-in (reduction) axes (``()`` for AdamW leaves).
    fan_out_axes: the fan-out (output) axes (``()`` for AdamW leaves).
    matrix: ``(batch, fan_in, fan_out)`` sizes of the view; ``None`` for AdamW.
    view_rule: why those axes (``""`` for AdamW leaves).
    flags: reasons the view may not be what the model means (empty if none).
  """

  path: str
  shape: tuple[int, ...]
  label: str
  label_rule: str
  batch_axes: tuple[int, ...]
  fan_in_axes: tuple[int, ...]
  fan_out_axes: tuple[int, ...]
  matrix: tuple[int, int, int] | None
  view_rule: str
  flags: tuple[str, ...]


def _axes(axes: tuple[int, ...], shape: tuple[int, ...]) -> str:
  if not axes:
    return "-"
  return ",".join(str(a) for a in axes) + "=" + "x".join(str(shape[a]) for a in axes)


class MuonRouting(NamedTuple):
  """What :func:`muonclip_jax.muon` does with each parameter; ``str()`` is a table.

  Attributes:
    leaves: one :class:`RoutedLeaf` per parameter, in flattening order.
  """

  leaves: tuple[RoutedLeaf, ...]

  @property
  def flagged(self) -> tuple[RoutedLeaf, ...]:
    """The leaves with at least one flag."""
    return tuple(leaf for leaf in self.leaves if leaf.flags)

  def labels(self) -> dict[str, str]:
    """``{path: "muon" | "adamw"}``."""
    return {leaf.path: leaf.label for leaf in self.leaves}

  def __str__(self) -> str:
    muon = [leaf for leaf in self.leaves if leaf.label == MUON]
    n_muon = sum(math.prod(leaf.shape) for leaf in muon)
    n_all = sum(math.prod(leaf.shape) for leaf in self.leaves)
    head = (f"Muon routing: {len(self.leaves)} leaves; {len(muon)} to Muon "
            f"({n_muon:,} of {n_all:,} parameters), {len(self.leaves) - len(muon)} to AdamW; "
            f"{len(self.flagged)} flagged (!)")
    rows = [("", "path", "shape", "label", "matrix view: batch | fan-in | fan-out", "rule")]
    for leaf in self.leaves:
      shape = str(leaf.shape)
      if leaf.matrix is None:
        view, rule = "", leaf.label_rule
      else:
        b, fi, fo = leaf.matrix
        view = (f"{b} x {fi}x{fo}  [{_axes(leaf.batch_axes, leaf.shape)} | "
                f"{_axes(leaf.fan_in_axes, leaf.shape)} | "
                f"{_axes(leaf.fan_out_axes, leaf.shape)}]")
        rule = leaf.view_rule
      rows.append(("!" if leaf.flags else "", leaf.path, shape, leaf.label, view, rule))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [head, ""]
    for r in rows:
      lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    notes = [f"! {leaf.path}: {f}" for leaf in self.leaves for f in leaf.flags]
    if notes:
      lines += ["", *notes]
    return "\n".join(line.rstrip() for line in lines)


def muon_routing(
    params: Any,
    *,
    param_labels: Any | Callable[[Any], Any] | None = None,
    dimension_numbers: DimensionNumbersLike = None,
    layer_axis: LayerAxisLike = None,
    per_head: bool = False,
    shape_scaling: str | None = "rms",
) -> MuonRouting:
  """What :func:`muonclip_jax.muon` does with each parameter of ``params``.

  Pass the same ``param_labels``, ``dimension_numbers``, ``layer_axis``,
  ``per_head`` and ``shape_scaling`` as to ``muon``/``muonclip``: the report
  uses the optimizer's own routing functions.

  Args:
    params: the parameter tree (arrays, ``jax.ShapeDtypeStruct`` leaves or
      ``nnx.Param`` variables).
    param_labels: as for :func:`muonclip_jax.muon`.
    dimension_numbers: as for :func:`muonclip_jax.scale_by_muon`.
    layer_axis: as for :func:`muonclip_jax.scale_by_muon`.
    per_head: as for :func:`muonclip_jax.scale_by_muon`.
    shape_scaling: as for :func:`muonclip_jax.scale_by_muon`; with
      ``"keller"`` a leaf whose fan-in side is unknown is flagged (``muon``
      refuses it).

  Returns:
    A :class:`MuonRouting`; ``str()`` of it is a table with, per leaf, the
    path, shape, label, matrix view (``batch x fan_in x fan_out`` and which
    axes, with their sizes) and the rule that chose it, then a note for each
    flagged (``!``) leaf.

  Raises:
    ValueError: the errors ``muon`` raises at ``init`` (bad labels,
      dimension numbers or ``layer_axis``), naming the parameter path.

  Example:
    >>> import jax.numpy as jnp
    >>> import muonclip_jax as mc
    >>> params = {"attn": {"q_einsum": {"w": jnp.zeros((4, 32, 8))}},
    ...           "norm": {"scale": jnp.zeros(32)}}
    >>> print(mc.muon_routing(params))
    Muon routing: 2 leaves; 1 to Muon (1,024 of 1,056 parameters), 1 to AdamW; 0 flagged (!)
    <BLANKLINE>
       path              shape       label  matrix view: batch | fan-in | fan-out  rule
       attn/q_einsum/w   (4, 32, 8)  muon   1 x 32x32  [- | 1=32 | 0,2=4x8]        Gemma ...
       norm/scale        (32,)       adamw                                         rank < 2
    >>> mc.muon_routing(params, per_head=True).leaves[0].matrix  # 4 heads, 32 x 8 each
    (4, 32, 8)
  """
  scaling = check_shape_scaling(shape_scaling)
  layer_axis = check_layer_axis(layer_axis)
  rules_fn = dimension_rules_fn(dimension_numbers, layer_axis=layer_axis, per_head=per_head)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  labels = jax.tree.leaves(resolve_labels(params, param_labels, layer_axis=layer_axis))
  check_layer_axis_used(
      (path_str(p) for (p, _), lab in zip(flat, labels, strict=True) if lab == MUON), layer_axis)
  out = []
  for (p, x), label in zip(flat, labels, strict=True):
    path, shape = path_str(p), tuple(int(s) for s in x.shape)
    if param_labels is None:
      why = label_rule(path, matrix_rank(path, shape, layer_axis))[1]
    else:
      why = "param_labels"
    if label != MUON:
      out.append(RoutedLeaf(path, shape, label, why, (), (), (), None, "", ()))
      continue
    check_matrix_rank(path, shape)
    rule = rules_fn(path, shape)
    batch, red, fout = normalize_axes(path, shape, rule.dims)
    matrix = tuple(math.prod(shape[a] for a in axes) for axes in (batch, red, fout))
    flags = [rule.ambiguity] if rule.ambiguity else []
    if scaling == "keller" and not rule.orientation_known and matrix[1] != matrix[2]:
      flags.append("muon refuses this leaf with shape_scaling='keller' (fan-in side unknown); "
                   "declare it with dimension_numbers")
    out.append(RoutedLeaf(path, shape, label, why, batch, red, fout, matrix, rule.rule,
                          tuple(flags)))
  return MuonRouting(tuple(out))
