"""Where the query and key parameters of an attention layer live, per head.

QK-Clip (Kimi K2, arXiv 2507.20534) rescales, for every head ``h`` whose max
logit ``S_max^h`` exceeds ``tau``, the query and key parameters of that head so
that its logit shrinks by ``gamma_h = tau / S_max^h``. A *layout* tells
:func:`muonclip_jax.qk_clip` which parameter entries belong to which head,
relative to the module that sowed ``max_logits``.

A :class:`QKLayout` is a tuple of :class:`QKParam` entries. Each entry names one
parameter (a path relative to the sowing module, ``'/'``-separated, ``'..'``
climbs one level) and says

* its ``role``: ``"query"`` (a factor on ``q``), ``"key"`` (on ``k``), or
  ``"query_rope"`` (MLA's per-head rotary query ``q^R``, which gets all of
  ``gamma_h`` because its key ``k^R`` is shared across heads and left alone);
* ``ndim``, its rank for one layer (extra leading axes are scanned-layer axes;
  statistics then carry the same leading axes: ``(layers, heads)``);
* how heads sit in it: optionally ``split`` one axis into several (a view),
  then ``head_axes`` (row-major, possibly several axes) enumerate ``heads``
  head slots, each slot covering an equal contiguous run of entries, and
  ``select`` restricts every axis it names to a ``[start, stop)`` range (fused
  QKV kernels, the ``k`` half of MLA's ``kv_b`` projection). ``head_axes=()``
  means one slot shared by every head (QK-norm gains of shape ``(head_dim,)``).

How ``gamma`` is shared. Let ``n_k`` be the key slots and ``n_q`` the query slots.

* ``n_q == n_k`` (MHA, MLA, shared QK-norm gains): query and key entries of a
  slot each get ``sqrt(gamma)`` (the slot's minimum ``gamma`` when a slot covers
  several heads); ``query_rope`` gets ``gamma``. This is the paper's rule.
* ``n_k < n_q`` (GQA/MQA), ``gqa_sharing``:

  - ``"query"`` (default): query head ``h`` gets ``gamma_h``, the shared key is
    untouched. Exact per head and touches no other head (the paper's own rule
    for MLA's shared ``k^R``).
  - ``"group"``: one factor per KV group, ``gamma_g = min_{h in g} gamma_h``
    (from the group's largest logit), ``gamma_g^alpha`` on every query head of
    the group and ``gamma_g^(1-alpha)`` on the key (Megatron; ``alpha=0.5`` by
    default). Sibling heads are clipped by the hottest head's factor.
  - ``"split"``: query head ``h`` gets ``sqrt(gamma_h)``, the shared key
    ``sqrt(min_g gamma)``. The hottest head lands exactly on ``tau``; its
    siblings are over-clipped by ``sqrt(min_g gamma / gamma_h)``.

* no key entries: query entries get ``gamma``; no query entries: key entries
  get ``gamma``.

Declared, never guessed. What the shapes cannot tell is declared or refused:

* orientation: Flax's ``kernel`` is ``(in, out)``; any other name (PyTorch and
  Equinox ``weight`` are ``(out, in)``) needs ``weight_layout=`` (or, for 3-D
  per-head kernels, ``head_axis=``);
* a layer axis that is not the first (MaxText's ``param_scan_axis=1``):
  ``scan_axis=``; statistics keep their layer axis first;
* a norm gain stored as ``1 + scale`` (Gemma): ``qk_norm(gain="one_plus")``;
* projections stacked on one axis (Gemma's ``kv_einsum`` ``(2, K, D, H)``):
  ``query_stack=``/``key_stack=`` ``(axis, index)``.

QK-norm: ``RMSNorm``/``LayerNorm`` on ``q`` and ``k`` after the projection
cancels any scaling of ``W_q``, ``W_k``, so the clip acts on the norm gains.
Gains shared by all heads (Flax's ``normalize_qk``: shape ``(head_dim,)``)
cannot clip one head alone: the layer's smallest ``gamma`` is applied,
``sqrt`` on each side, which over-clips the cooler heads of a hot layer;
per-head gains (``(heads, head_dim)``) clip per head.

Flax's ``MultiHeadDotProductAttention`` (linen) and ``MultiHeadAttention``
(NNX) are detected by parameter names next to where ``max_logits`` was sown
(``query``, ``key``, ``value``, ``out`` with 3-D ``kernel``; ``query_ln`` /
``key_ln`` ``scale`` with ``normalize_qk=True``) and need no layout.

Examples (paths are relative to the module that called ``sow``)::

  separate_qk("q_proj", "k_proj", num_heads=8, merged_heads=True)  # nn.Dense
  separate_qk("q", "k")                                 # DenseGeneral (E, H, D)
  fused_qkv("c_attn", num_heads=12)                     # GPT-2 (E, 3*H*D)
  fused_qkv("qkv", num_heads=32, num_kv_heads=8, order="groups")  # Megatron
  mla("wq_b", "wkv_b", num_heads=16, qk_nope_head_dim=128,
      qk_rope_head_dim=64, v_head_dim=128)
  qk_norm("q_norm", "k_norm", num_heads=8, gain="scale")  # shared gains (D,)
  qk_norm("_query_norm", "_key_norm", num_heads=8, gain="one_plus")  # Gemma 3
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

from muonclip_jax._paths import show_path
from muonclip_jax._statistic import MAX_LOGITS  # noqa: F401  (re-exported: old import path)

Role = Literal["query", "key", "query_rope"]
GQASharing = Literal["query", "group", "split"]
_ROLES = ("query", "key", "query_rope")
GQA_SHARINGS = ("query", "group", "split")
Path = tuple[str, ...]


class QKParam(NamedTuple):
  """One parameter that QK-Clip rescales, and where its heads are.

  Attributes:
    path: ``'/'``-separated path relative to the module that sowed
      ``max_logits`` (``'..'`` goes up one level).
    role: ``"query"``, ``"key"`` or ``"query_rope"`` (see module docstring).
    ndim: the parameter's rank for one layer; leading extra axes are layer
      (scan) axes and must match the statistic's leading axes.
    head_axes: axes (of the per-layer view, negative counts from the end) that
      enumerate head slots, in increasing order; ``()`` for a slot shared by
      all heads.
    heads: number of head slots along ``head_axes``; ``None`` means their
      (selected) extent, i.e. one slot per index. For ``(embed, heads*dim)``
      kernels give ``heads`` so each slot covers ``dim`` entries.
    split: ``(axis, sizes)``: view the per-layer parameter with ``axis`` split
      into ``sizes`` (one ``-1`` allowed) before reading ``head_axes`` and
      ``select``.
    select: ``((axis, start, stop), ...)`` ranges of the view this entry
      covers (``stop=None``: to the end); entries outside are untouched.
    optional: skip silently when the parameter does not exist (biases).
    scan_axis: where a scanned stack keeps its layer axis in the full
      parameter (MaxText's ``param_scan_axis=1``: kernels ``(embed, layers,
      heads, head_dim)``); ``None``: extra axes lead. A parameter of rank
      ``ndim`` is one layer either way; with ``scan_axis`` set it may have one
      extra axis, at that position. Statistics always put the layer axis first.
    offset: the parameter acts as ``p + offset`` (a norm gain ``1 + scale``,
      Gemma's RMSNorm: ``offset=1``); the clip by ``f`` then sets
      ``p' = f (p + offset) - offset`` so that the gain, not ``p``, scales by ``f``.
  """

  path: str
  role: Role
  ndim: int
  head_axes: tuple[int, ...] = (-2,)
  heads: int | None = None
  split: tuple[int, tuple[int, ...]] | None = None
  select: tuple[tuple[int, int, int | None], ...] = ()
  optional: bool = False
  scan_axis: int | None = None
  offset: float = 0.0


class QKLayout(NamedTuple):
  """The query/key parameters of one attention layer, relative to its sowing module.

  Attributes:
    params: the :class:`QKParam` entries.
    num_heads: query heads (size of the statistic's last axis); ``None`` infers
      it from the query entries' head slots. Required when every query entry
      is shared (``head_axes=()``).
    name: a label used in error messages.
  """

  params: tuple[QKParam, ...]
  num_heads: int | None = None
  name: str = "custom"


# --------------------------------------------------------------------------
# Constructors for common layouts.


def _scanned(params: list[QKParam], scan_axis: int | None) -> tuple[QKParam, ...]:
  """Every entry with the layer (scan) axis at ``scan_axis`` (``None``: leading)."""
  return tuple(p._replace(scan_axis=scan_axis) for p in params)


WeightLayout = Literal["in_out", "out_in"]
WEIGHT_LAYOUTS = ("in_out", "out_in")
Stack = tuple[int, int]


def weight_layout_of(where: str, kernel: str, weight_layout: WeightLayout | None,
                     declared_axis: bool = False) -> WeightLayout | None:
  """The declared orientation, Flax's ``(in, out)`` for ``kernel``, or a ``ValueError``.

  ``kernel`` is Flax's name for ``(in_features, out_features)`` weights, so
  its orientation is known. Any other name (PyTorch and Equinox ``weight`` are
  ``(out, in)``, hand-written code either) must be declared: a square kernel
  reads either way, and reading it wrong clips the input side.
  """
  if weight_layout is not None:
    if weight_layout not in WEIGHT_LAYOUTS:
      raise ValueError(f"{where}: weight_layout must be one of {WEIGHT_LAYOUTS}, got "
                       f"{weight_layout!r}")
    return weight_layout
  if kernel == "kernel":
    return "in_out"
  if declared_axis:
    return None
  raise ValueError(
      f"{where}: the orientation of {kernel!r} weights cannot be told from their names or "
      f"shapes (a square kernel reads either way, and reading it wrong clips the input "
      f"side). Declare it: weight_layout='out_in' for (out_features, in_features) weights "
      f"(PyTorch, Equinox eqx.nn.Linear.weight, y = W @ x) or weight_layout='in_out' for "
      f"(in_features, out_features) ones (Flax's kernel, y = x @ W); for 3-D per-head "
      f"kernels, head_axis= alone is enough.")


def _kernel_entry(path: str, role: Role, *, merged: bool, heads: int | None,
                  layout: WeightLayout | None, head_axis: int | None,
                  stack: Stack | None) -> QKParam:
  """A projection kernel: per-layer ``(in, H*D)``/``(H*D, in)`` merged, or 3-D per head.

  ``stack=(axis, index)``: the kernel stacks several projections along ``axis``
  (Gemma's ``kv_einsum`` ``(2, K, D, H)``: keys then values along axis 0) and
  this one is entry ``index``; ``head_axis`` counts axes without that axis.
  """
  rank = 2 if merged else 3
  if merged:
    if heads is None:
      raise ValueError(f"{path}: merged (2-D) kernels need the number of heads")
    if head_axis is not None:
      raise ValueError(f"{path}: head_axis is for 3-D per-head kernels; merged (2-D) "
                       f"kernels take weight_layout=")
    axis = 1 if layout == "in_out" else 0
  else:
    axis = head_axis if head_axis is not None else (-2 if layout == "in_out" else -3)
    if not -rank <= axis < rank:
      raise ValueError(f"{path}: head_axis={axis} out of range for a 3-D kernel")
    axis %= rank
  select: tuple[tuple[int, int, int | None], ...] = ()
  ndim = rank
  if stack is not None:
    s_axis, index = stack
    ndim = rank + 1
    if not -ndim <= s_axis < ndim or index < 0:
      raise ValueError(f"{path}: stack=(axis, index)={stack} does not fit a {ndim}-D "
                       f"stacked kernel")
    s_axis %= ndim
    axis = axis if axis < s_axis else axis + 1
    select = ((s_axis - ndim, index, index + 1),)
  return QKParam(path, role, ndim, (axis - ndim,), heads if merged else None, None, select)


def _bias_entry(path: str, role: Role, *, merged: bool, heads: int | None,
                stack: Stack | None) -> QKParam:
  """A projection bias ``(H*D,)`` or ``(H, D)`` (stacked along ``stack``'s axis too)."""
  rank = 1 if merged else 2
  axis, ndim = 0, rank  # heads lead: (H*D,) or (H, D)
  select: tuple[tuple[int, int, int | None], ...] = ()
  if stack is not None:
    ndim = rank + 1
    if not -ndim <= stack[0] < ndim:
      raise ValueError(f"{path}: stack axis {stack[0]} does not fit the {ndim}-D stacked "
                       f"bias; pass bias=None if the projections have none")
    s_axis = stack[0] % ndim
    axis = axis if axis < s_axis else axis + 1
    select = ((s_axis - ndim, stack[1], stack[1] + 1),)
  return QKParam(path, role, ndim, (axis - ndim,), heads if merged else None, None, select,
                 optional=True)


def separate_qk(query: str = "query", key: str = "key", *, num_heads: int | None = None,
                num_kv_heads: int | None = None, merged_heads: bool = False,
                kernel: str = "kernel", bias: str | None = "bias",
                weight_layout: WeightLayout | None = None, head_axis: int | None = None,
                query_stack: Stack | None = None, key_stack: Stack | None = None,
                scan_axis: int | None = None) -> QKLayout:
  """Separate query and key projections, with optional biases.

  Examples::

    separate_qk("query", "key")                    # Flax DenseGeneral (E, H, D)
    separate_qk("q_proj", "k_proj", num_heads=8, merged_heads=True)  # nn.Dense
    separate_qk("query_proj", "key_proj", num_heads=8, merged_heads=True,
                kernel="weight", weight_layout="out_in")  # Equinox / PyTorch
    # Gemma: q_einsum/w (N, D, H); kv_einsum/w (2, K, D, H), keys at index 0
    separate_qk("q_einsum", "kv_einsum", kernel="w", head_axis=0,
                key_stack=(0, 0), bias=None)
    # Gemma MHA: qkv_einsum/w (3, N, D, H)
    separate_qk("qkv_einsum", "qkv_einsum", kernel="w", head_axis=0,
                query_stack=(0, 0), key_stack=(0, 1), bias=None)

  Args:
    query: path of the query projection module.
    key: path of the key projection module.
    num_heads: query heads; required with ``merged_heads``.
    num_kv_heads: key heads (GQA/MQA); default ``num_heads``.
    merged_heads: ``True`` for 2-D kernels with one ``heads*head_dim`` axis
      (heads major: ``nn.Dense``, ``nnx.Linear``, ``eqx.nn.Linear``),
      ``False`` for 3-D per-head kernels (``DenseGeneral``/``LinearGeneral``).
    kernel: the kernel's name inside each module.
    bias: the bias's name (skipped when absent); ``None`` for no bias.
    weight_layout: ``"in_out"`` for ``(in, out)`` kernels (``(in, H*D)``;
      3-D ``(in, H, D)``), ``"out_in"`` for ``(out, in)`` ones (PyTorch,
      Equinox: ``(H*D, in)``; 3-D ``(H, D, in)``). Default: ``"in_out"`` for
      Flax's ``kernel``; any other ``kernel`` name must declare it (or give
      ``head_axis`` for 3-D kernels), since shapes cannot tell.
    head_axis: for 3-D kernels, the heads axis of the (unstacked, per-layer)
      kernel, overriding ``weight_layout`` (Gemma's ``(N, D, H)``: ``0``).
    query_stack: ``(axis, index)`` when the query kernel stacks several
      projections along ``axis`` (of the stacked per-layer kernel) and the
      query is entry ``index`` (Gemma's ``qkv_einsum``: ``(0, 0)``).
    key_stack: the same for the key kernel (Gemma's ``kv_einsum``: ``(0, 0)``;
      ``qkv_einsum``: ``(0, 1)``). A bias, if present, is stacked the same way.
    scan_axis: the position of the layer axis in scanned parameters when it is
      not the first (MaxText's ``param_scan_axis=1``); ``None``: leading.

  Returns:
    A :class:`QKLayout` for ``qk_clip(layouts=...)`` (its paths are relative to
    the module that sows ``max_logits``).

  Raises:
    ValueError: an orientation that the names do not fix and is not declared;
      merged kernels without ``num_heads``; axes out of range.
  """
  layout = weight_layout_of("separate_qk", kernel, weight_layout,
                            declared_axis=head_axis is not None and not merged_heads)
  kv = num_kv_heads if num_kv_heads is not None else num_heads
  params = []
  for module, role, heads, stack in ((query, "query", num_heads, query_stack),
                                     (key, "key", kv, key_stack)):
    params.append(_kernel_entry(f"{module}/{kernel}", role, merged=merged_heads, heads=heads,
                                layout=layout, head_axis=head_axis, stack=stack))
    if bias:
      params.append(_bias_entry(f"{module}/{bias}", role, merged=merged_heads, heads=heads,
                                stack=stack))
  return QKLayout(_scanned(params, scan_axis), num_heads, "separate_qk")


def fused_qkv(path: str = "qkv", *, num_heads: int, num_kv_heads: int | None = None,
              order: Literal["blocks", "heads", "groups"] = "blocks",
              kernel: str = "kernel", bias: str | None = "bias",
              weight_layout: WeightLayout | None = None,
              scan_axis: int | None = None) -> QKLayout:
  """One fused QKV projection with a 2-D kernel ``(embed, (H + 2 H_kv) * head_dim)``.

  Per-head 3-D fused kernels that stack q, k and v on their own axis (Gemma's
  ``qkv_einsum`` ``(3, N, D, H)``) are :func:`separate_qk` with ``query_stack``
  and ``key_stack``.

  Args:
    path: path of the fused projection module.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads ``H_kv`` (default ``H``).
    order: how the output axis is laid out:
      ``"blocks"``: ``[q_0..q_{H-1} | k_0..k_{H_kv-1} | v ...]`` (GPT-2
      ``c_attn``, fused ``qkv_proj``); ``"heads"``: per head ``[q_h, k_h, v_h]``
      (GPT-NeoX; MHA only); ``"groups"``: per KV group
      ``[q x (H/H_kv), k, v]`` (Megatron GQA).
    kernel: the kernel's name inside the module.
    bias: the bias's name (skipped when absent); ``None`` for no bias.
    weight_layout: ``"in_out"`` (``(embed, out)``) or ``"out_in"``
      (``(out, embed)``: PyTorch ``in_proj_weight``); default ``"in_out"`` for
      Flax's ``kernel``, required for any other name.
    scan_axis: the position of the layer axis in scanned parameters when it is
      not the first (MaxText's ``param_scan_axis=1``); ``None``: leading.

  Returns:
    A :class:`QKLayout` for ``qk_clip(layouts=...)`` (its paths are relative to
    the module that sows ``max_logits``).
  """
  layout = weight_layout_of("fused_qkv", kernel, weight_layout)
  kv = num_kv_heads if num_kv_heads is not None else num_heads
  if num_heads % kv:
    raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv})")
  rep = num_heads // kv
  entries: list[tuple[str, int]] = [(kernel, 2)] + ([(bias, 1)] if bias else [])
  params = []
  for name, nd in entries:
    optional = name == bias
    full = f"{path}/{name}"
    # (out, in) kernels: the output axis, and every axis split from it, one to the left.
    t = -1 if (name == kernel and layout == "out_in") else 0
    if order == "blocks":
      split = (-1 + t, (num_heads + 2 * kv, -1))
      params += [QKParam(full, "query", nd, (-2 + t,), None, split, ((-2 + t, 0, num_heads),),
                         optional),
                 QKParam(full, "key", nd, (-2 + t,), None, split,
                         ((-2 + t, num_heads, num_heads + kv),), optional)]
    elif order == "heads":
      if kv != num_heads:
        raise ValueError("order='heads' is MHA only; use order='groups' for GQA")
      split = (-1 + t, (num_heads, 3, -1))
      params += [QKParam(full, "query", nd, (-3 + t,), None, split, ((-2 + t, 0, 1),), optional),
                 QKParam(full, "key", nd, (-3 + t,), None, split, ((-2 + t, 1, 2),), optional)]
    elif order == "groups":
      split = (-1 + t, (kv, rep + 2, -1))
      params += [QKParam(full, "query", nd, (-3 + t, -2 + t), None, split,
                         ((-2 + t, 0, rep),), optional),
                 QKParam(full, "key", nd, (-3 + t,), None, split, ((-2 + t, rep, rep + 1),),
                         optional)]
    else:
      raise ValueError(f"order: expected 'blocks', 'heads' or 'groups', got {order!r}")
  return QKLayout(_scanned(params, scan_axis), num_heads, f"fused_qkv[{order}]")


def mla(q: str = "wq", kv: str = "wkv_b", *, num_heads: int, qk_nope_head_dim: int,
        qk_rope_head_dim: int, v_head_dim: int, merged_heads: bool = False,
        kernel: str = "kernel", weight_layout: WeightLayout | None = None,
        scan_axis: int | None = None) -> QKLayout:
  """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2).

  The query projection's per-head output is ``[q^C (nope) | q^R (rope)]``; the
  key/value up-projection's is ``[k^C (nope) | v]``; the rotary key ``k^R`` is
  shared by all heads (from the down-projection) and left untouched. QK-Clip
  scales ``q^C`` and ``k^C`` by ``sqrt(gamma_h)`` and ``q^R`` by ``gamma_h``.

  Args:
    q: path of the (up-)projection producing queries (``wq`` or ``wq_b``).
    kv: path of the key/value up-projection ``wkv_b``.
    num_heads: heads.
    qk_nope_head_dim: per-head width of ``q^C`` and ``k^C``.
    qk_rope_head_dim: per-head width of ``q^R``.
    v_head_dim: per-head width of ``v``.
    merged_heads: 2-D kernels ``(in, heads * width)`` instead of 3-D
      ``(in, heads, width)``.
    kernel: the kernel's name inside each module.
    weight_layout: ``"in_out"`` (``(in, heads, width)`` or merged
      ``(in, heads*width)``) or ``"out_in"`` (``(heads, width, in)``,
      ``(heads*width, in)``); default ``"in_out"`` for Flax's ``kernel``,
      required for any other name.
    scan_axis: the position of the layer axis in scanned parameters when it is
      not the first (MaxText's ``param_scan_axis=1``); ``None``: leading.

  Returns:
    A :class:`QKLayout` for ``qk_clip(layouts=...)`` (its paths are relative to
    the module that sows ``max_logits``).
  """
  layout = weight_layout_of("mla", kernel, weight_layout)
  t = -1 if layout == "out_in" else 0  # (out, in): the output's axes one to the left
  nope, rope = qk_nope_head_dim, qk_rope_head_dim
  if merged_heads:
    q_split = (-1 + t, (num_heads, nope + rope))
    kv_split = (-1 + t, (num_heads, nope + v_head_dim))
    nd = 2
  else:
    q_split = kv_split = None
    nd = 3
  return QKLayout(_scanned([
      QKParam(f"{q}/{kernel}", "query", nd, (-2 + t,), None, q_split, ((-1 + t, 0, nope),)),
      QKParam(f"{q}/{kernel}", "query_rope", nd, (-2 + t,), None, q_split,
              ((-1 + t, nope, nope + rope),)),
      QKParam(f"{kv}/{kernel}", "key", nd, (-2 + t,), None, kv_split, ((-1 + t, 0, nope),)),
  ], scan_axis), num_heads, "mla")


GAIN_FORMS = {"scale": 0.0, "one_plus": 1.0}


def qk_norm(query: str = "query_norm", key: str = "key_norm", *, num_heads: int,
            gain: Literal["scale", "one_plus"] | float | None = None,
            num_kv_heads: int | None = None, per_head: bool = False,
            scale: str = "scale", bias: str | None = "bias",
            scan_axis: int | None = None) -> QKLayout:
  """QK-norm gains: the clip scales the norms' gains (and biases) instead of kernels.

  A norm after the projection cancels any scaling of ``W_q``, ``W_k``; what
  scales the logit is the norm's *gain* ``g``, which a model stores either as
  ``g = scale`` or as ``g = 1 + scale`` with ``scale`` initialised at 0 (Gemma
  2/3's RMSNorm). The clip by ``f`` makes ``g' = f g``: ``scale' = f scale`` for
  the first form, ``scale' = f (1 + scale) - 1`` for the second. The two cannot
  be told apart from the parameters, so ``gain`` must be declared: scaling
  ``scale`` of a ``1 + scale`` norm would leave the logit as it was while the
  telemetry counts the head clipped.

  Args:
    query: path of the query norm module.
    key: path of the key norm module.
    num_heads: query heads.
    gain: how the norm applies ``scale`` (required): ``"scale"`` for
      ``x_hat * scale`` (Flax's ``LayerNorm``/``RMSNorm``, Equinox, MaxText's
      ``RMSNorm`` with ``scale_offset=0``), ``"one_plus"`` for
      ``x_hat * (1 + scale)`` (Gemma 2/3), or a number ``c`` for
      ``x_hat * (scale + c)`` (MaxText's ``scale_offset=c``).
    num_kv_heads: key heads for per-head gains under GQA (default ``num_heads``).
    per_head: ``True`` for gains of shape ``(heads, head_dim)``, ``False`` for
      gains ``(head_dim,)`` shared by all heads (per-layer clip, see module doc).
    scale: name of the gain parameter.
    bias: name of the norm's bias (LayerNorm with bias; skipped when absent).
    scan_axis: the position of the layer axis in scanned parameters when it is
      not the first (MaxText's ``param_scan_axis=1``); ``None``: leading.

  Returns:
    A :class:`QKLayout` for ``qk_clip(layouts=...)`` (its paths are relative to
    the module that sows ``max_logits``).
  """
  offset = _gain_offset(gain)
  kv = num_kv_heads if num_kv_heads is not None else num_heads
  params = []
  for module, role, heads in ((query, "query", num_heads), (key, "key", kv)):
    names = [(scale, False, offset)] + ([(bias, True, 0.0)] if bias else [])
    for name, optional, off in names:
      if per_head:
        params.append(QKParam(f"{module}/{name}", role, 2, (-2,), heads, optional=optional,
                              offset=off))
      else:
        params.append(QKParam(f"{module}/{name}", role, 1, (), optional=optional,
                              offset=off))
  return QKLayout(_scanned(params, scan_axis), num_heads, "qk_norm")


def _gain_offset(gain: str | float | None) -> float:
  if gain is None:
    raise ValueError(
        "qk_norm: declare how the norm applies its gain: gain='scale' for x_hat * scale "
        "(Flax LayerNorm/RMSNorm, Equinox, MaxText RMSNorm), gain='one_plus' for "
        "x_hat * (1 + scale) with scale initialised at 0 (Gemma 2/3's RMSNorm), or a "
        "number c for x_hat * (scale + c) (MaxText scale_offset=c). The parameters cannot "
        "tell them apart, and scaling scale of a (1 + scale) norm does not lower the logit.")
  if isinstance(gain, str):
    if gain not in GAIN_FORMS:
      raise ValueError(f"qk_norm: gain must be one of {tuple(GAIN_FORMS)} or a number, got "
                       f"{gain!r}")
    return GAIN_FORMS[gain]
  if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
    raise ValueError(f"qk_norm: gain must be one of {tuple(GAIN_FORMS)} or a finite number, "
                     f"got {gain!r}")
  return float(gain)


def flax_attention(*, normalize_qk: bool = False, num_heads: int | None = None) -> QKLayout:
  """Flax's ``MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention`` parameters.

  Args:
    normalize_qk: the module was built with ``normalize_qk=True`` (QK-norm).
    num_heads: heads (needed with ``normalize_qk``).

  Returns:
    A :class:`QKLayout` (QK-Clip detects Flax's modules without it).

  Raises:
    ValueError: ``normalize_qk`` without ``num_heads``.
  """
  if normalize_qk:
    if num_heads is None:
      raise ValueError("flax_attention(normalize_qk=True) needs num_heads")
    layout = qk_norm("query_ln", "key_ln", num_heads=num_heads, gain="scale")
  else:
    layout = separate_qk("query", "key", num_heads=num_heads)
  return layout._replace(name="flax_attention" + ("[normalize_qk]" if normalize_qk else ""))


def detect_flax_attention(module: Path, shapes: Mapping[Path, tuple[int, ...]]
                          ) -> QKLayout | None:
  """The layout of a Flax attention module at ``module``, or ``None`` if it is not one."""
  def get(*names: str) -> tuple[int, ...] | None:
    return shapes.get(module + names)

  q, k, v, o = (get(n, "kernel") for n in ("query", "key", "value", "out"))
  if q is None or k is None or v is None or o is None or len(q) < 3 or len(o) < 3:
    return None
  leads = {name: shape[:-3] for name, shape in zip(("query", "key", "value", "out"),
                                                    (q, k, v, o))}
  if len(set(leads.values())) > 1 or q[:-3] != k[:-3]:
    raise ValueError(
        f"qk_clip: the attention kernels at {'/'.join(module) or '<root>'!r} disagree on "
        f"their leading (layer) axes {leads}: a scanned stack keeps its layer axis "
        f"elsewhere than first (MaxText's param_scan_axis=1?). Declare it, e.g. "
        f"layouts=muonclip_jax.separate_qk('query', 'key', scan_axis=1).")
  num_heads = q[-2]
  if get("query_ln", "scale") is not None and get("key_ln", "scale") is not None:
    return flax_attention(normalize_qk=True, num_heads=num_heads)
  return flax_attention(num_heads=num_heads)


# --------------------------------------------------------------------------
# Resolution against a parameter tree and factor arrays.


class Target(NamedTuple):
  """A :class:`QKParam` resolved against a concrete parameter."""

  param: Path
  spec: QKParam
  shape: tuple[int, ...]
  lead: tuple[int, ...]
  layer_axis: int | None  # the scan axis's position in ``shape`` when not leading
  view: tuple[int, ...]
  head_axes: tuple[int, ...]       # non-negative axes of the view
  ranges: tuple[tuple[int, int], ...]  # per view axis [start, stop)
  slots: int


class Layer(NamedTuple):
  """A layout resolved at one module path."""

  module: Path
  layout: QKLayout
  targets: tuple[Target, ...]
  num_heads: int
  lead: tuple[int, ...]


def join(module: Path, rel: str) -> Path:
  out = list(module)
  for part in rel.split("/"):
    if part in ("", "."):
      continue
    if part == "..":
      if not out:
        raise ValueError(f"path {rel!r} climbs above the root from {show_path(module)!r}")
      out.pop()
    else:
      out.append(part)
  return tuple(out)


def _view(shape: tuple[int, ...], split: tuple[int, tuple[int, ...]] | None,
          where: str) -> tuple[int, ...]:
  if split is None:
    return shape
  axis, sizes = split
  axis = axis % len(shape)
  sizes = tuple(sizes)
  known = math.prod(s for s in sizes if s != -1)
  n_free = sum(1 for s in sizes if s == -1)
  if n_free > 1 or known == 0:
    raise ValueError(f"{where}: invalid split sizes {sizes}")
  if n_free:
    if shape[axis] % known:
      raise ValueError(f"{where}: axis of size {shape[axis]} cannot be split into {sizes}")
    sizes = tuple(shape[axis] // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != shape[axis]:
    raise ValueError(f"{where}: axis of size {shape[axis]} cannot be split into {sizes}")
  return shape[:axis] + sizes + shape[axis + 1:]


def resolve_target(spec: QKParam, module: Path, shape: tuple[int, ...]) -> Target:
  """Checks ``spec`` against the parameter's ``shape``; raises ``ValueError`` naming it."""
  param = join(module, spec.path)
  where = f"qk_clip: layout entry {spec.path!r} at {show_path(param)!r} (shape {shape})"
  if spec.role not in _ROLES:
    raise ValueError(f"{where}: role must be one of {_ROLES}, got {spec.role!r}")
  if spec.ndim < 1 or spec.ndim > len(shape):
    raise ValueError(f"{where}: per-layer ndim {spec.ndim} does not fit the parameter")
  n_lead = len(shape) - spec.ndim
  layer_axis = None
  if spec.scan_axis is not None and n_lead:
    if n_lead != 1 or not -len(shape) <= spec.scan_axis < len(shape):
      raise ValueError(f"{where}: scan_axis={spec.scan_axis} declares one layer axis, but "
                       f"the parameter has {n_lead} axes beyond its per-layer rank "
                       f"{spec.ndim}")
    layer_axis = spec.scan_axis % len(shape)
    lead = (shape[layer_axis],)
    per_layer = shape[:layer_axis] + shape[layer_axis + 1:]
  else:
    lead, per_layer = shape[:n_lead], shape[n_lead:]
  try:
    view = _view(per_layer, spec.split, where)
  except ValueError as e:
    if not lead:
      raise
    raise ValueError(
        f"{e} (the parameter has {len(shape)} axes where the layout expects {spec.ndim} per "
        f"layer, so {lead} were read as layer axes; a kernel that stacks q, k and v on an "
        f"axis of its own, like Gemma's qkv_einsum (3, N, D, H), is separate_qk("
        f"'qkv_einsum', 'qkv_einsum', kernel='w', head_axis=0, query_stack=(0, 0), "
        f"key_stack=(0, 1), bias=None))") from None
  rank = len(view)
  ranges = [(0, s) for s in view]
  for axis, start, stop in spec.select:
    if not -rank <= axis < rank:
      raise ValueError(f"{where}: select axis {axis} out of range for view {view}")
    a = axis % rank
    stop = view[a] if stop is None else stop
    if not 0 <= start < stop <= view[a]:
      raise ValueError(f"{where}: select range [{start}, {stop}) out of bounds for axis "
                       f"{axis} of view {view}")
    ranges[a] = (start, stop)
  head_axes = []
  for axis in spec.head_axes:
    if not -rank <= axis < rank:
      raise ValueError(f"{where}: head axis {axis} out of range for view {view}")
    head_axes.append(axis % rank)
  if sorted(set(head_axes)) != head_axes:
    raise ValueError(f"{where}: head_axes must be distinct and in increasing order")
  extent = math.prod(ranges[a][1] - ranges[a][0] for a in head_axes)
  slots = extent if spec.heads is None else spec.heads
  if not head_axes:
    if spec.heads not in (None, 1):
      raise ValueError(f"{where}: a shared entry (head_axes=()) has one head slot")
    slots = 1
  elif slots < 1 or extent % slots:
    raise ValueError(f"{where}: {extent} entries along the head axes do not split into "
                     f"{slots} heads")
  return Target(param, spec, shape, lead, layer_axis, view, tuple(head_axes), tuple(ranges),
                slots)


def resolve_layout(layout: QKLayout, module: Path,
                   shapes: Mapping[Path, tuple[int, ...]]) -> Layer:
  """Resolves every entry of ``layout`` at ``module``; raises ``ValueError`` naming paths."""
  targets = []
  for spec in layout.params:
    param = join(module, spec.path)
    if param not in shapes:
      if spec.optional:
        continue
      raise ValueError(f"qk_clip: layout {layout.name!r} at {show_path(module)!r}: no "
                       f"parameter {show_path(param)!r}")
    targets.append(resolve_target(spec, module, shapes[param]))
  where = f"qk_clip: layout {layout.name!r} at {show_path(module)!r}"
  if not targets:
    raise ValueError(f"{where}: matches no parameter")
  leads = {t.lead for t in targets}
  if len(leads) != 1:
    raise ValueError(f"{where}: entries disagree on leading (layer) axes: "
                     + ", ".join(f"{show_path(t.param)}: {t.lead}" for t in targets))
  q_slots = [t.slots for t in targets if t.spec.role != "key"]
  k_slots = [t.slots for t in targets if t.spec.role == "key"]
  num_heads = layout.num_heads if layout.num_heads is not None else max(q_slots + k_slots)
  for t in targets:
    if num_heads % t.slots:
      raise ValueError(f"{where}: {show_path(t.param)} has {t.slots} head slots, which do "
                       f"not divide num_heads={num_heads}")
  if len(set(k_slots)) > 1:
    raise ValueError(f"{where}: key entries disagree on the number of heads: {k_slots}")
  return Layer(module, layout, tuple(targets), num_heads, leads.pop())
