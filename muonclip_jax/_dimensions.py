"""Which axes of an N-D parameter are fan-in, fan-out and batch.

Muon orthogonalises matrices. An N-D kernel is viewed as a batch of
``(fan_in, fan_out)`` matrices: the fan-in (reduction) axes are flattened into
rows, the fan-out (output) axes into columns, and every other axis is a batch
axis (a scanned layer stack, experts, ...). This is optax's
:class:`optax.contrib.MuonDimensionNumbers`, which this module reuses.

The default, :func:`default_dimension_numbers`, reads Flax's layouts from the
parameter's path and shape:

=================================  ===============================  ==========================
parameter                          kernel shape                     fan-in / fan-out
=================================  ===============================  ==========================
``Dense`` / ``Linear``             ``(in, out)``                    ``in`` / ``out``
q/k/v ``DenseGeneral``             ``(embed, heads, head_dim)``     ``embed`` / ``heads*head_dim``
attention output ``DenseGeneral``  ``(heads, head_dim, embed)``     ``heads*head_dim`` / ``embed``
``Conv`` (path holds ``conv``)     ``(*window, in, out)``           ``window*in`` / ``out``
scanned stack of any of these      ``(layers, ...)``                leading axes are batch
=================================  ===============================  ==========================

A 3-D kernel under an attention query/key/value name is read as
``(embed, heads, head_dim)``; a 3-D kernel under any other name as a stack of
``(in, out)`` matrices. Pass explicit dimension numbers where that guess is
wrong (for instance a scanned stack of 2-D query kernels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from optax.contrib import MuonDimensionNumbers

from muonclip_jax._paths import lower_components, path_str

__all__ = [
    "MuonDimensionNumbers",
    "default_dimension_numbers",
    "matrix_view",
    "normalize_axes",
]

_QKV = re.compile(
    r"^(query|key|value|qkv|q|k|v|wq|wk|wv|wqkv|q_proj|k_proj|v_proj|qkv_proj|c_attn|"
    r"in_proj|query_key_value|kv|wkv|kv_proj|q_a_proj|q_b_proj|kv_a_proj|kv_b_proj|"
    r"wq_a|wq_b|wkv_a|wkv_b)$")
_OUT = re.compile(r"^(out|o|wo|o_proj|out_proj|attn_out|c_proj_attn|dense_out)$")
_CONV = re.compile(r"conv", re.IGNORECASE)


def default_dimension_numbers(path: str, shape: Sequence[int]) -> MuonDimensionNumbers:
  """The dimension numbers for a parameter of ``shape`` at ``path`` (see module doc).

  Args:
    path: the ``'/'``-joined parameter path (names such as ``query``/``out``
      tell attention kernels' head axes apart).
    shape: the parameter's shape (rank >= 2).

  Returns:
    ``MuonDimensionNumbers(reduction_axis, output_axis)``: the fan-in and
    fan-out axes; the other axes are a batch of matrices.

  Raises:
    ValueError: rank < 2, naming the path.

  Example:
    >>> from muonclip_jax import default_dimension_numbers
    >>> default_dimension_numbers("layers/mlp/kernel", (12, 768, 3072))
    MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  """
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"{path}: Muon needs a parameter of rank >= 2, got shape {tuple(shape)}")
  comps = lower_components(path)
  module = comps[-2] if len(comps) >= 2 else ""
  if ndim >= 3 and _QKV.match(module):
    return MuonDimensionNumbers(reduction_axis=ndim - 3, output_axis=(ndim - 2, ndim - 1))
  if ndim >= 3 and _OUT.match(module):
    return MuonDimensionNumbers(reduction_axis=(ndim - 3, ndim - 2), output_axis=ndim - 1)
  if ndim >= 3 and any(_CONV.search(c) for c in comps[:-1]):
    return MuonDimensionNumbers(reduction_axis=tuple(range(ndim - 1)), output_axis=ndim - 1)
  return MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)


def normalize_axes(path: str, shape: Sequence[int], dims: MuonDimensionNumbers
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, fan-in, fan-out) axes as sorted non-negative tuples; checks they fit."""
  ndim = len(shape)
  if not isinstance(dims, MuonDimensionNumbers):
    raise ValueError(f"{path}: expected MuonDimensionNumbers, got {dims!r}")

  def norm(axes: int | Sequence[int], what: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if not axes:
      raise ValueError(f"{path}: {what} axes are empty in {dims} for shape {tuple(shape)}")
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f"{path}: {what} axis {a} is out of range for shape {tuple(shape)} "
                         f"(rank {ndim}); dimension numbers {dims}")
    out = tuple(sorted(a % ndim for a in axes))
    if len(set(out)) != len(out):
      raise ValueError(f"{path}: repeated {what} axis in {dims}")
    return out

  if ndim < 2:
    raise ValueError(f"{path}: Muon needs a parameter of rank >= 2, got shape {tuple(shape)}")
  red = norm(dims.reduction_axis, "reduction (fan-in)")
  out = norm(dims.output_axis, "output (fan-out)")
  if set(red) & set(out):
    raise ValueError(f"{path}: reduction axes {red} and output axes {out} overlap "
                     f"for shape {tuple(shape)}")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return batch, red, out


def matrix_view(path: str, shape: Sequence[int], dims: MuonDimensionNumbers
                ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array],
                           tuple[int, int, int]]:
  """Functions to and from the ``(batch, fan_in, fan_out)`` view of a leaf."""
  batch, red, out = normalize_axes(path, shape, dims)
  perm = batch + red + out
  inv = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
  sizes = lambda axes: math.prod(shape[a] for a in axes)
  flat = (sizes(batch), sizes(red), sizes(out))
  permuted = tuple(shape[a] for a in perm)
  identity = perm == tuple(range(len(shape)))

  def to_matrix(x: jax.Array) -> jax.Array:
    return (x if identity else x.transpose(perm)).reshape(flat)

  def from_matrix(x: jax.Array) -> jax.Array:
    x = x.reshape(permuted)
    return x if identity else x.transpose(inv)

  return to_matrix, from_matrix, flat


def fan_in_out(path: str, shape: Sequence[int], dims: MuonDimensionNumbers) -> tuple[int, int]:
  _, red, out = normalize_axes(path, shape, dims)
  return math.prod(shape[a] for a in red), math.prod(shape[a] for a in out)


DimensionNumbersLike = (
    MuonDimensionNumbers | Any | Callable[[str, tuple[int, ...]], MuonDimensionNumbers | None]
    | None)


def dimension_numbers_fn(dimension_numbers: DimensionNumbersLike
                 ) -> Callable[[str, tuple[int, ...]], MuonDimensionNumbers]:
  """Normalises a ``dimension_numbers`` argument into ``(path, shape) -> dims``.

  Args:
    dimension_numbers: ``None`` (the default for every leaf), one
      :class:`MuonDimensionNumbers` for all leaves, a tree of them (``None``
      leaves take the default), or a callable ``(path, shape) -> dims | None``.

  Returns:
    A function of a leaf's ``'/'``-joined path and shape.

  Raises:
    ValueError: a tree leaf that is neither ``None`` nor dimension numbers,
      naming its path.
  """
  if dimension_numbers is None:
    return default_dimension_numbers
  if isinstance(dimension_numbers, MuonDimensionNumbers):
    return lambda path, shape: dimension_numbers
  if callable(dimension_numbers):
    def from_callable(path, shape):
      d = dimension_numbers(path, shape)
      return default_dimension_numbers(path, shape) if d is None else d
    return from_callable
  flat, _ = jax.tree_util.tree_flatten_with_path(
      dimension_numbers,
      is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
  table = {}
  for p, d in flat:
    if d is not None and not isinstance(d, MuonDimensionNumbers):
      raise ValueError(f"dimension_numbers at {path_str(p)}: expected MuonDimensionNumbers "
                       f"or None, got {d!r}")
    table[path_str(p)] = d

  def from_table(path, shape):
    d = table.get(path)
    return default_dimension_numbers(path, shape) if d is None else d
  return from_table
