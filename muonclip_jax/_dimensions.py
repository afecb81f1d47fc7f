"""Which axes of an N-D parameter are fan-in, fan-out and batch.

Muon orthogonalises matrices. An N-D kernel is viewed as a batch of
``(fan_in, fan_out)`` matrices: the fan-in (reduction) axes are flattened into
rows, the fan-out (output) axes into columns, and every other axis is a batch
axis (a scanned layer stack, experts, the K/V pair, ...). This is optax's
:class:`optax.contrib.MuonDimensionNumbers`, which this module reuses.

The default, :func:`default_dimension_numbers`, reads the layout from the
parameter's path and shape (``N`` heads, ``K`` key/value heads, ``D`` embed,
``H`` head dim, ``F`` MLP hidden):

========================================  ========================  ===========================
parameter (leaf or module name)           shape                     batch / fan-in / fan-out
========================================  ========================  ===========================
Flax ``Dense``, Haiku ``w``, other 2-D    ``(in, out)``             - / ``in`` / ``out``
PyTorch / Equinox ``weight``              ``(out, in)``             - / ``in`` / ``out``
conv ``weight`` (PyTorch / Equinox)       ``(out, in, *window)``    - / ``in*window`` / ``out``
Flax ``Conv`` ``kernel``                  ``(*window, in, out)``    - / ``window*in`` / ``out``
q/k/v ``DenseGeneral`` (``query``, ...)   ``(D, N, H)``             - / ``D`` / ``N*H``
attention output (``out``, ``o_proj``)    ``(N, H, D)``             - / ``N*H`` / ``D``
``wo``/``out`` under ``mlp``/``ffn``      ``(F, D)``                - / ``F`` / ``D``
MaxText fused ``mlp/wi`` (1)              ``(D, 2, F)``             ``2`` / ``D`` / ``F``
experts (under ``moe``/``expert``)        ``(E, in, out)``          ``E`` / ``in`` / ``out``
Gemma ``q_einsum/w``                      ``(N, D, H)``             - / ``D`` / ``N*H``
Gemma ``kv_einsum/w``                     ``(2, K, D, H)``          ``2`` / ``D`` / ``K*H``
Gemma ``qkv_einsum/w``                    ``(3, N, D, H)``          ``3`` / ``D`` / ``N*H``
Gemma ``attn_vec_einsum/w``               ``(N, H, D)``             - / ``N*H`` / ``D``
Gemma ``mlp/gating_einsum`` (2)           ``(2, F, D)``             ``2`` / ``D`` / ``F``
3-D+ kernel of another name               ``(..., in, out)``        leading / ``in`` / ``out``
scanned stack of any of these             layer axis anywhere       the layer axis is batch
========================================  ========================  ===========================

(1) when ``layer_axis`` is declared, so a 3-D ``wi`` is known not to be a stack.
(2) see the orientation note below.

A head-factored projection is one linear map, so it is orthogonalised whole
(``D x N*H``) by default, as in Moonlight and Kimi K2; ``per_head=True``
orthogonalises each head's ``D x H`` block instead.

The layer axis of a scanned stack is declared with ``layer_axis`` (see
:mod:`muonclip_jax._layer_axis`); without it, axes beyond a layout's rank are
read as leading batch axes.

Two things cannot be told from names and shapes, and are reported by
:func:`muonclip_jax.muon_routing` as ambiguous:

* Gemma's ``gating_einsum`` is ``(2, F, D)`` in every Gemma 2 9B/27B and
  Gemma 3 config (``transpose_gating_einsum=True``) but ``(2, D, F)`` in
  Gemma 2 2B. It is read as ``(2, F, D)``. Which side is fan-in changes
  nothing for ``shape_scaling="rms"`` (``max(fan_in, fan_out)``) or ``None``,
  and Newton–Schulz is transpose-invariant; ``"keller"`` scaling refuses such a
  leaf unless ``dimension_numbers`` declares it.
* A 3-D or higher kernel under a name no rule knows is read as a leading batch
  of ``(in, out)`` matrices.

Pass explicit ``dimension_numbers`` wherever a layout is not the one above.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from optax.contrib import MuonDimensionNumbers

from muonclip_jax._layer_axis import LayerAxisLike, check_layer_axis, stack_axis
from muonclip_jax._layer_axis import in_container as under_scan_container
from muonclip_jax._paths import lower_components, path_str

__all__ = [
    "check_matrix_rank",
    "DimensionRule",
    "MuonDimensionNumbers",
    "default_dimension_numbers",
    "dimension_rule",
    "matrix_view",
    "normalize_axes",
]

# q/k/v projections whose 3-D kernel is (embed, heads, head_dim): Flax/MaxText
# DenseGeneral, MLA's up-projections (MaxText wq_b/wkv_b, HF q_b_proj/kv_b_proj).
_QKV = re.compile(
    r"^(query|key|value|qkv|q|k|v|wq|wk|wv|wqkv|q_proj|k_proj|v_proj|qkv_proj|c_attn|"
    r"in_proj|query_key_value|kv|wkv|kv_proj|q_b_proj|kv_b_proj|wq_b|wkv_b)$")
# Attention outputs whose 3-D kernel is (heads, head_dim, embed).
_OUT = re.compile(r"^(out|o|wo|o_proj|out_proj|attn_out|c_proj_attn|dense_out|output_proj)$")
# An ancestor that makes ``wo``/``out`` an MLP output: mlp, mlp_global, ffn, ffw,
# feed_forward, MoeBlock_0, experts, ...
_MLP = re.compile(r"mlp|ffn|ffw|feed_?forward|moe|expert")
_ATTN = re.compile(r"attn|attention")
_CONV = re.compile(r"conv", re.IGNORECASE)
# Gemma (gemma 3.3.0, gm/nn/_modules.py): Attention's Einsum modules and FeedForward's
# gating einsum (a leaf of the MLP through nn.share_scope).
_GEMMA_Q = "q_einsum"
_GEMMA_STACKED_QKV = ("kv_einsum", "qkv_einsum")
_GEMMA_OUT = "attn_vec_einsum"
_GEMMA_GATING = "gating_einsum"


class DimensionRule(NamedTuple):
  """The dimension numbers chosen for one parameter, and why.

  Attributes:
    dims: the fan-in (``reduction_axis``) and fan-out (``output_axis``) axes.
    rule: the rule that chose them, in words (as the routing report prints it).
    ambiguity: why the view might not be what the model means (``""`` if
      nothing is in doubt); :func:`muonclip_jax.muon_routing` flags these.
    orientation_known: ``False`` where fan-in and fan-out could be swapped
      (``shape_scaling="keller"`` refuses such a leaf unless it is square).
  """

  dims: MuonDimensionNumbers
  rule: str
  ambiguity: str = ""
  orientation_known: bool = True


def _dims(red: tuple[int, ...], out: tuple[int, ...]) -> MuonDimensionNumbers:
  """Dimension numbers with a single axis written as an int (optax's own style)."""
  one = lambda axes: axes[0] if len(axes) == 1 else tuple(axes)
  return MuonDimensionNumbers(reduction_axis=one(red), output_axis=one(out))


class _View(NamedTuple):
  batch: tuple[int, ...]
  red: tuple[int, ...]
  out: tuple[int, ...]
  rule: str
  ambiguity: str = ""
  orientation_known: bool = True


def _leading(view: _View, base_rank: int, rank: int, declared: bool, in_container: bool
             ) -> _View:
  """``view`` for a layout of ``base_rank`` applied to a leaf of ``rank``: extra leading axes
  are batch axes (a stack whose layer axis was not declared)."""
  extra = rank - base_rank
  if extra <= 0:
    return view
  shift = lambda axes: tuple(a + extra for a in axes)
  lead = tuple(range(extra))
  amb = view.ambiguity
  if not declared:
    note = ("leading axis read as a layer stack (Flax's scan axis 0); if the stack is on "
            "another axis (MaxText's param_scan_axis=1) declare layer_axis") if in_container else (
            f"{extra} leading ax{'is' if extra == 1 else 'es'} beyond the layout read as a batch "
            "(a stack); declare layer_axis or dimension_numbers if that is wrong")
    amb = f"{amb}; {note}" if amb else note
  return _View(lead + shift(view.batch), shift(view.red), shift(view.out),
               f"{view.rule}, leading batch", amb, view.orientation_known)


def _under_mlp(ancestors: list[str]) -> bool:
  """Whether the nearest ancestor that is an attention or an MLP block is an MLP
  (``moe_layers/self_attention/out`` is an attention output)."""
  for c in reversed(ancestors):
    if _ATTN.search(c):
      return False
    if _MLP.search(c):
      return True
  return False


def _layout(comps: list[str], rank: int, per_head: bool, declared: bool, in_container: bool
            ) -> _View:
  """The view of an unstacked (or undeclared-stack) leaf, from its names (``comps``)."""
  leaf = comps[-1] if comps else ""
  module = comps[-2] if len(comps) >= 2 else ""
  ancestors = comps[:-1]
  under_mlp = _under_mlp(comps[:-2])
  lead = lambda view, base: _leading(view, base, rank, declared, in_container)

  # Gemma's hand-written einsums (gemma 3.3.0, gm/nn/_modules.py).
  if module == _GEMMA_Q and rank >= 3:  # 'BTD,NDH->BTNH'
    view = (_View((0,), (1,), (2,), "Gemma q_einsum (N, D, H), per head (per_head=True)")
            if per_head else
            _View((), (1,), (0, 2), "Gemma q_einsum (N, D, H): whole D x N*H projection"))
    return lead(view, 3)
  if module in _GEMMA_STACKED_QKV and rank >= 4:  # 'BSD,CKDH->CBSKH', 'BTD,SNDH->SBTNH'
    view = (_View((0, 1), (2,), (3,), f"Gemma {module} (S, N, D, H), per head (per_head=True)")
            if per_head else
            _View((0,), (2,), (1, 3), f"Gemma {module} (S, N, D, H): S separate D x N*H "
                  "projections"))
    return lead(view, 4)
  if module == _GEMMA_OUT and rank >= 3:  # 'BTNH,NHD->BTD'
    view = (_View((0,), (1,), (2,), "Gemma attn_vec_einsum (N, H, D), per head (per_head=True)")
            if per_head else
            _View((), (0, 1), (2,), "Gemma attn_vec_einsum (N, H, D): whole N*H x D projection"))
    return lead(view, 3)
  if (leaf == _GEMMA_GATING or module == _GEMMA_GATING) and rank >= 3:  # '...F,NHF->...NH'
    return lead(_View((0,), (2,), (1,), "Gemma gating_einsum (2, F, D): gate and up separate",
                      "orientation: (2, F, D) in Gemma 2 9B/27B and Gemma 3, (2, D, F) in "
                      "Gemma 2 2B; no effect on 'rms' scaling", False), 3)

  # PyTorch / Equinox: ``weight`` is (out, in), a conv's (out, in, *window).
  if leaf == "weight":
    if rank >= 3 and any(_CONV.search(c) for c in ancestors):
      return _View((), tuple(range(1, rank)), (0,), "conv 'weight' (out, in, *window)")
    return lead(_View((), (1,), (0,), "'weight' is (out, in) (PyTorch/Equinox)"), 2)

  if rank >= 3 and any(_CONV.search(c) for c in ancestors):
    return _View((), tuple(range(rank - 1)), (rank - 1,), "conv kernel (*window, in, out)")

  if module == "wi" and under_mlp and rank == 3 and declared:
    return _View((1,), (0,), (2,), "MaxText fused mlp/wi (D, activations, F)")
  if _QKV.match(module) and rank >= 3:
    view = (_View((1,), (0,), (2,), f"attention {module} (D, N, H), per head (per_head=True)")
            if per_head else
            _View((), (0,), (1, 2), f"attention {module} (D, N, H): whole D x N*H projection"))
    return lead(view, 3)
  if _OUT.match(module) and rank >= 3 and not under_mlp:
    view = (_View((0,), (1,), (2,), f"attention {module} (N, H, D), per head (per_head=True)")
            if per_head else
            _View((), (0, 1), (2,), f"attention {module} (N, H, D): whole N*H x D projection"))
    return lead(view, 3)

  if rank == 2:
    if leaf == "linear" and _under_mlp(comps[:-1]):  # '...H,HF->...F'
      return _View((), (0,), (1,), "Gemma mlp/linear (F, D)")
    if _OUT.match(module) and under_mlp:
      return _View((), (0,), (1,), f"MLP output {module} (F, D)")
    return _View((), (0,), (1,), "(in, out)")
  # MaxText's RoutedMoE keeps its experts as leaves of MoeBlock_0 (wi_0, wi_1, wo), not in a
  # Dense 'kernel'; a shared expert's MLP is an ordinary Dense.
  experts = any(("moe" in c or "expert" in c) and "shared" not in c for c in comps[-2:])
  if experts and rank == 3:
    return _View((0,), (1,), (2,), "experts (E, in, out)")
  what = f"MLP output {module}" if _OUT.match(module) and under_mlp else "(in, out)"
  view = _leading(_View((), (0,), (1,), what), 2, rank, declared, in_container)
  if not declared and not in_container and rank >= 3 and module == "wi" and under_mlp:
    view = view._replace(ambiguity=view.ambiguity + "; a MaxText fused mlp/wi is (D, 2, F)")
  if declared and not view.ambiguity:
    view = view._replace(ambiguity=f"unknown {rank}-D kernel: leading axes read as a batch")
  return view


def check_matrix_rank(path: str, shape: Sequence[int]) -> None:
  """Refuses a Muon leaf of rank < 2, naming its path and the fix.

  Raises:
    ValueError: ``shape`` has fewer than two axes.
  """
  if len(shape) < 2:
    raise ValueError(f"{path}: Muon needs a parameter of rank >= 2, got shape "
                     f"{tuple(shape)}; route it to AdamW (see muonclip_jax.muon's "
                     "param_labels)")


def dimension_rule(path: str, shape: Sequence[int], *, layer_axis: LayerAxisLike = None,
                   per_head: bool = False) -> DimensionRule:
  """The dimension numbers for a parameter of ``shape`` at ``path``, with the rule that chose them.

  Args:
    path: the ``'/'``-joined parameter path.
    shape: the parameter's shape (rank >= 2).
    layer_axis: the declared layer axis of scanned stacks (see
      :mod:`muonclip_jax._layer_axis`).
    per_head: orthogonalise head-factored attention kernels one head at a time.

  Returns:
    A :class:`DimensionRule`.

  Raises:
    ValueError: rank < 2, or a declared layer axis that leaves fewer than two
      axes (naming the path).
  """
  shape = tuple(int(s) for s in shape)
  ndim = len(shape)
  check_matrix_rank(path, shape)
  comps = lower_components(path)
  k = stack_axis(path, shape, check_layer_axis(layer_axis))
  if k is None:
    v = _layout(comps, ndim, per_head, declared=layer_axis is not None,
                in_container=under_scan_container(comps))
    return DimensionRule(_dims(v.red, v.out), v.rule, v.ambiguity,
                         v.orientation_known)
  if ndim < 3:
    raise ValueError(f"{path}: a layer axis is declared for a leaf of shape {shape}, which "
                     "leaves fewer than 2 axes for a matrix; exclude it from layer_axis (use a "
                     "mapping of path prefixes)")
  v = _layout(comps, ndim - 1, per_head, declared=True, in_container=True)
  up = lambda axes: tuple(a + (a >= k) for a in axes)
  rule = f"{v.rule}; layer axis {k} (declared)"
  return DimensionRule(_dims(up(v.red), up(v.out)), rule, v.ambiguity,
                       v.orientation_known)


def default_dimension_numbers(path: str, shape: Sequence[int], *,
                              layer_axis: LayerAxisLike = None,
                              per_head: bool = False) -> MuonDimensionNumbers:
  """The dimension numbers for a parameter of ``shape`` at ``path`` (see module doc).

  Args:
    path: the ``'/'``-joined parameter path (names such as ``query``/``out``
      tell attention kernels' head axes apart).
    shape: the parameter's shape (rank >= 2).
    layer_axis: where scanned stacks keep their layer axis: ``None``
      (leading), an int for MaxText-style containers, or a mapping of path
      prefix to axis (see :mod:`muonclip_jax._layer_axis`).
    per_head: orthogonalise head-factored attention kernels (Gemma's einsums,
      ``DenseGeneral`` q/k/v/out) one head at a time instead of as the whole
      projection.

  Returns:
    ``MuonDimensionNumbers(reduction_axis, output_axis)``: the fan-in and
    fan-out axes; the other axes are a batch of matrices.

  Raises:
    ValueError: rank < 2, or a declared layer axis out of range, naming the path.

  Example:
    >>> from muonclip_jax import default_dimension_numbers
    >>> default_dimension_numbers("layers/mlp/kernel", (12, 768, 3072))
    MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    >>> default_dimension_numbers("decoder/layers/mlp/wo/kernel", (3072, 12, 768), layer_axis=1)
    MuonDimensionNumbers(reduction_axis=0, output_axis=2)
  """
  return dimension_rule(path, shape, layer_axis=layer_axis, per_head=per_head).dims


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

  check_matrix_rank(path, shape)
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


def dimension_rules_fn(dimension_numbers: DimensionNumbersLike, *,
                       layer_axis: LayerAxisLike = None, per_head: bool = False
                       ) -> Callable[[str, tuple[int, ...]], DimensionRule]:
  """Normalises a ``dimension_numbers`` argument into ``(path, shape) -> DimensionRule``.

  Args:
    dimension_numbers: ``None`` (the default for every leaf), one
      :class:`MuonDimensionNumbers` for all leaves, a tree of them (``None``
      leaves take the default), or a callable ``(path, shape) -> dims | None``.
    layer_axis: the declared layer axis of scanned stacks, for the default.
    per_head: per-head attention kernels, for the default.

  Returns:
    A function of a leaf's ``'/'``-joined path and shape.

  Raises:
    ValueError: a tree leaf that is neither ``None`` nor dimension numbers,
      naming its path, a malformed ``layer_axis``, or ``per_head`` with one
      :class:`MuonDimensionNumbers` for every leaf (it would do nothing).
  """
  layer_axis = check_layer_axis(layer_axis)

  def default(path, shape):
    return dimension_rule(path, shape, layer_axis=layer_axis, per_head=per_head)

  def given(d, what):
    return DimensionRule(d, what)

  if dimension_numbers is None:
    return default
  if isinstance(dimension_numbers, MuonDimensionNumbers):
    if per_head:
      raise ValueError("per_head=True does nothing with one MuonDimensionNumbers for every "
                       "leaf (it chooses among the default layouts); declare per-head views "
                       "in dimension_numbers, or pass a tree or callable that returns None "
                       "where the default (with per_head) should apply")
    return lambda path, shape: given(dimension_numbers, "dimension_numbers (one for all)")
  if callable(dimension_numbers):
    def from_callable(path, shape):
      d = dimension_numbers(path, shape)
      return default(path, shape) if d is None else given(d, "dimension_numbers (callable)")
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
    return default(path, shape) if d is None else given(d, "dimension_numbers (tree)")
  return from_table


def dimension_numbers_fn(dimension_numbers: DimensionNumbersLike, *,
                         layer_axis: LayerAxisLike = None, per_head: bool = False
                         ) -> Callable[[str, tuple[int, ...]], MuonDimensionNumbers]:
  """:func:`dimension_rules_fn`, returning only the dimension numbers."""
  rules = dimension_rules_fn(dimension_numbers, layer_axis=layer_axis, per_head=per_head)
  return lambda path, shape: rules(path, shape).dims
