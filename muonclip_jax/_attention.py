"""Attention that records per-head max logits for QK-Clip.

QK-Clip (Kimi K2, arXiv 2507.20534, Algorithm 1) needs, for every attention
head ``h`` of every layer, the largest pre-softmax logit seen in the step's
forward pass,

.. math::
  S_{\\max}^h = \\max_{b,\\, i,\\, j} \\; \\frac{q_{b,i}^h \\cdot k_{b,j}^h}{\\sqrt{d}},

signed (not ``|.|``), after the ``1/sqrt(d)`` scale and the mask, before any
soft-cap. This module provides:

* :func:`dot_product_attention`: a drop-in ``attention_fn`` for
  ``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``
  (it accepts both signatures). It computes attention exactly as Flax does and,
  when Flax hands it the module, sows ``S_max`` (one float32 per query head,
  ``stop_gradient``-ed, max-reduced if the module runs more than once) as
  ``max_logits``: in the ``'intermediates'`` collection (linen) or as an
  ``nnx.Intermediate`` (NNX). It never sows the attention weights.

  Flax passes the module only when the layer is called with
  ``sow_weights=True``; that is the switch::

    attn = nn.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=muonclip_jax.dot_product_attention)
    y = attn(x, sow_weights=True)          # sows intermediates/.../max_logits

  Simpler: :class:`MaxLogitMultiHeadDotProductAttention` (linen) and
  :class:`MaxLogitMultiHeadAttention` (NNX) are the Flax modules with this
  ``attention_fn`` and ``sow_weights=True`` by default; their parameters have
  the same names, so QK-Clip finds them without configuration.

* :func:`max_logits_blockwise`: the same statistic from ``q`` and ``k`` in key
  blocks (``lax.scan``), for models whose fused or flash kernel never exposes
  the logits; memory ``O(batch * heads * q_len * block_size)``.
* :func:`head_max_logits` and :func:`sow_max_logits`: for hand-written
  attention: reduce a logits array to per-head maxima and sow them.

GQA/MQA (fewer key heads than query heads) is supported everywhere; the
statistic is always per query head.

Collecting the statistics:

* linen: ``y, state = model.apply(variables, x, mutable=['intermediates'])``;
  pass ``state['intermediates']`` (or ``state``) as ``max_logits=``.
* NNX: ``y, stats = nnx.capture(model, nnx.Intermediate)(x)`` (preferred), or
  call the model and ``stats = nnx.pop(model, nnx.Intermediate)``. Without
  ``nnx.capture`` the statistic is stored on the module and max-reduced with
  the previous call's value until popped, so pop it every step. A model that
  *assigns* an ``nnx.Intermediate`` attribute instead of calling ``sow``
  (MaxText's ``record_max_logits``) is invisible to ``nnx.capture`` (it returns
  ``{}``): use ``nnx.pop``.
* Equinox, PyTorch-style or plain JAX: return :func:`head_max_logits` from the
  forward pass and pass ``{'path/to/attention': {'max_logits': value}}``.

The statistics contract (what :func:`muonclip_jax.qk_clip` accepts; stated
once in :mod:`muonclip_jax._statistic`): one
``max_logits`` per attention layer, at the path of the module that owns the
query/key parameters or of a parameter-less child of it (MaxText's
``attention_op``), shaped ``[layers..., batch..., heads]``: the scanned layer
axes first (as a scan stacks them), then any batch axes (max-reduced), then
the query heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from muonclip_jax._statistic import MAX_LOGITS

Array = jax.Array


def _neg_inf_like(x: Array) -> Callable[[], Array]:
  return lambda: jnp.full(x.shape, -jnp.inf, x.dtype)


def sow_max_logits(module: Any, max_logits: Array, *, name: str = MAX_LOGITS) -> bool:
  """Sows per-head max logits on a linen or NNX module, max-reduced across calls.

  Call it from hand-written attention with the module that owns (or sits next
  to) the query and key parameters; QK-Clip looks the parameters up relative
  to that module's path. The value is cast to float32 and ``stop_gradient``-ed.

  Args:
    module: a ``flax.linen.Module`` (sows into ``'intermediates'``; the
      collection must be mutable to be kept) or a ``flax.nnx.Module`` (sows an
      ``nnx.Intermediate``).
    max_logits: per-query-head maxima, shape ``(num_heads,)``.
    name: the variable name; QK-Clip reads ``max_logits``.

  Returns:
    Whether the value was stored (linen returns ``False`` when the collection
    is not mutable).
  """
  value = jax.lax.stop_gradient(jnp.asarray(max_logits, jnp.float32))
  if isinstance(module, nn.Module):
    return module.sow("intermediates", name, value, init_fn=_neg_inf_like(value),
                      reduce_fn=jnp.maximum)
  if isinstance(module, nnx.Module):
    return module.sow(nnx.Intermediate, name, value, init_fn=_neg_inf_like(value),
                      reduce_fn=jnp.maximum)
  raise TypeError(
      f"sow_max_logits: expected a flax linen or nnx Module, got {type(module).__name__}. "
      f"Frameworks without intermediates (Equinox, PyTorch-style or plain JAX code) return "
      f"the statistic instead: compute muonclip_jax.head_max_logits(logits, mask=mask) in "
      f"the forward pass, return it next to the output, and pass "
      f"max_logits={{'path/to/attention': {{'max_logits': value}}}} to update, the path "
      f"being that of the module holding the query/key parameters in the parameter tree.")


def head_max_logits(logits: Array, *, mask: Array | None = None,
                    head_axis: int = -3) -> Array:
  """Per-head maximum of ``logits`` over every other axis, ignoring masked entries.

  Args:
    logits: pre-softmax logits, already scaled by ``1/sqrt(d)``, typically
      ``[batch..., heads, q_len, kv_len]``.
    mask: optional boolean array broadcastable to ``logits``; ``False`` entries
      are excluded (a head with every entry masked gets ``-inf``, which QK-Clip
      skips).
    head_axis: the heads axis of ``logits``.

  Returns:
    float32 array of shape ``(heads,)``, ``stop_gradient``-ed.
  """
  x = logits.astype(jnp.float32)
  if mask is not None:
    x = jnp.where(mask, x, -jnp.inf)
  head_axis = head_axis % x.ndim
  axes = tuple(a for a in range(x.ndim) if a != head_axis)
  return jax.lax.stop_gradient(jnp.max(x, axis=axes))


def _causal_mask(q_len: int, kv_len: int) -> Array:
  """Top-left aligned causal mask (query ``i`` sees keys ``j <= i``), like ``jnp.tril``."""
  return jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]


def _combine(mask: Array | None, other: Array | None) -> Array | None:
  if mask is None:
    return other
  if other is None:
    return mask
  return jnp.logical_and(mask.astype(jnp.bool_), other)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    *,
    logit_soft_cap: float | None = None,
    stats_include_bias: bool = False,
    sow_name: str = MAX_LOGITS,
) -> Array:
  """Dot-product attention that sows per-head max logits for QK-Clip.

  Computes ``softmax(q k^T / sqrt(d) + bias, mask) v`` like Flax's
  ``dot_product_attention`` (linen and NNX signatures; extra keyword arguments
  of either are accepted) and, when ``module`` is given, sows

  .. math::
    S_{\\max}^h = \\max_{b, i, j} \\; q_{b,i}^h \\cdot k_{b,j}^h / \\sqrt{d}

  per query head, over the batch and all unmasked positions, before any
  soft-cap, as ``max_logits`` (see :func:`sow_max_logits`). Kimi K2,
  arXiv 2507.20534. Flax passes ``module`` when the attention layer is called
  with ``sow_weights=True``; only the max logits are sown, never the weights.

  Set the keyword-only options with ``functools.partial``, e.g.
  ``attention_fn=functools.partial(dot_product_attention, logit_soft_cap=50.)``.

  Args:
    query: ``[batch..., q_len, num_heads, depth]``.
    key: ``[batch..., kv_len, num_kv_heads, depth]``; ``num_kv_heads`` divides
      ``num_heads`` (GQA/MQA: query head ``h`` uses key head
      ``h // (num_heads // num_kv_heads)``).
    value: ``[batch..., kv_len, num_kv_heads, v_depth]``.
    bias: additive bias broadcastable to ``[batch..., num_heads, q_len, kv_len]``.
    mask: boolean mask broadcastable to the same shape; ``False`` is masked out.
    broadcast_dropout: share the dropout mask across batch and heads.
    dropout_rng: PRNG key for dropout.
    dropout_rate: dropout probability on the attention weights.
    deterministic: disables dropout.
    dtype: computation dtype (default: promoted from the inputs).
    precision: matmul precision.
    module: the linen or NNX module to sow into; ``None`` sows nothing.
    force_fp32_for_softmax: compute the softmax in float32 (linen option).
    einsum_dot_general: ``dot_general`` for the einsums (linen option).
    qk_attn_weights_einsum: einsum for ``q k^T`` (linen option, AQT).
    attn_weights_value_einsum: einsum for weights times values (linen option).
    promote_dtype: NNX-style ``promote_dtype((q, k, v), dtype=...)`` function.
    is_causal: apply a top-left aligned causal mask (NNX option).
    logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` before
      the softmax (Gemma 2); the statistic is taken before the cap.
    stats_include_bias: include ``bias`` in the statistic. Off by default:
      QK-Clip bounds ``q . k / sqrt(d)``, which is what the clip rescales; turn
      it on only when ``bias`` encodes masking (large negative entries).
    sow_name: variable name of the statistic.

  The signature is the union of the linen and NNX ``attention_fn``
  protocols, which is why it is long; the work is in five steps below.

  Returns:
    ``[batch..., q_len, num_heads, v_depth]``.

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (§2.1: ``S_max^h``, the
    statistic QK-Clip bounds).

  Example:
    >>> import functools
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import muonclip_jax as mc
    >>> layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
    ...                                         attention_fn=mc.dot_product_attention)
    >>> x = jnp.ones((1, 4, 8))
    >>> params = layer.init(jax.random.key(0), x)
    >>> y, state = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
    >>> state["intermediates"]["max_logits"].shape  # one statistic per head
    (2,)
  """
  # Validate and promote (Flax's checks and messages).
  query, key, value = check_qkv(query, key, value, dtype, promote_dtype, precision,
                                 einsum_dot_general, qk_attn_weights_einsum,
                                 attn_weights_value_einsum)
  dtype = query.dtype
  if qk_attn_weights_einsum is None:
    dot = einsum_dot_general if einsum_dot_general is not None else jax.lax.dot_general
    qk_einsum = functools.partial(jnp.einsum, precision=precision, _dot_general=dot)
    wv_einsum = qk_einsum
  else:
    qk_einsum, wv_einsum = qk_attn_weights_einsum, attn_weights_value_einsum

  # Logits q k^T / sqrt(d), per query head (GQA: shared key heads).
  logits = _attention_logits(query / jnp.sqrt(query.shape[-1]).astype(dtype), key, qk_einsum)
  full_mask = mask
  if is_causal:
    full_mask = _combine(full_mask, _causal_mask(query.shape[-3], key.shape[-3]))

  # The statistic shares the softmax's row maxima when it is taken from the
  # softmax input itself (no soft-cap, no bias unless asked): XLA then computes
  # the row max once and the statistic costs a reduction over rows only.
  shared_rowmax = logit_soft_cap is None and (bias is None or stats_include_bias)
  if module is not None and not shared_rowmax:
    stat_logits = logits + bias if (stats_include_bias and bias is not None) else logits
    sow_max_logits(module, head_max_logits(stat_logits, mask=full_mask), name=sow_name)

  # Soft-cap, bias and mask: the softmax input.
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  if bias is not None:
    logits = logits + bias
  big_neg = jnp.finfo(dtype).min
  if full_mask is not None:
    logits = jnp.where(full_mask, logits, big_neg)
  if module is not None and shared_rowmax:
    sow_max_logits(module, _masked_head_max(logits, big_neg), name=sow_name)

  # Normalise the weights (dropout), then weight the values.
  weights = _softmax_with_dropout(logits, dtype, force_fp32_for_softmax, deterministic,
                                  dropout_rate, dropout_rng, broadcast_dropout)
  return _weighted_values(weights, value, wv_einsum)


def check_qkv(query: Array, key: Array, value: Array, dtype: Any,
              promote_dtype: Callable[..., Any] | None, precision: Any,
              einsum_dot_general: Any, qk_einsum: Any, wv_einsum: Any
              ) -> tuple[Array, Array, Array]:
  """Flax's argument checks; ``query, key, value`` promoted to one dtype."""
  if (qk_einsum is None) != (wv_einsum is None):
    raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum must be "
                     "specified together.")
  if (precision is not None or einsum_dot_general is not None) and qk_einsum:
    raise ValueError("precision/einsum_dot_general and qk_attn_weights_einsum/"
                     "attn_weights_value_einsum are mutually exclusive.")
  if promote_dtype is not None:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  else:
    dt = dtype if dtype is not None else jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x, dt) for x in (query, key, value))
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError("q, k, v must have the same rank.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"q, k depths must match, got {query.shape[-1]} and {key.shape[-1]}.")
  if key.shape[-3] != value.shape[-3] or key.shape[-2] != value.shape[-2]:
    raise ValueError(f"k and v must have the same length and heads, got {key.shape} "
                     f"and {value.shape}.")
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(f"query heads ({query.shape[-2]}) must be a multiple of key heads "
                     f"({key.shape[-2]}).")
  return query, key, value


def _attention_logits(query: Array, key: Array, qk_einsum: Callable[..., Array]) -> Array:
  """``[batch..., q_heads, q_len, kv_len]``; query head ``h`` reads key head ``h // rep``."""
  q_heads, kv_heads = query.shape[-2], key.shape[-2]
  rep = q_heads // kv_heads
  if rep == 1:
    return qk_einsum("...qhd,...khd->...hqk", query, key)
  qg = query.reshape(query.shape[:-2] + (kv_heads, rep, query.shape[-1]))
  logits = qk_einsum("...qhgd,...khd->...hgqk", qg, key)
  return logits.reshape(query.shape[:-3] + (q_heads, query.shape[-3], key.shape[-3]))


def _masked_head_max(logits: Array, big_neg: Any) -> Array:
  """Per head, the max of the (masked) softmax input; ``-inf`` for a fully masked head."""
  row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
  head_max = jnp.max(row_max, axis=tuple(a for a in range(row_max.ndim) if a != row_max.ndim - 3))
  # A head whose every logit is masked reads big_neg: report -inf (skipped by QK-Clip).
  return jnp.where(head_max > big_neg, head_max.astype(jnp.float32), -jnp.inf)


def _softmax_with_dropout(logits: Array, dtype: Any, force_fp32: bool, deterministic: bool,
                          dropout_rate: float, dropout_rng: Array | None,
                          broadcast_dropout: bool) -> Array:
  """Softmax over keys, then dropout on the weights (as Flax applies it)."""
  if force_fp32 and dtype != jnp.float32:
    weights = jax.nn.softmax(logits.astype(jnp.float32))
  else:
    weights = jax.nn.softmax(logits).astype(dtype)
  if deterministic or dropout_rate <= 0.0:
    return weights
  keep_prob = 1.0 - dropout_rate
  if broadcast_dropout:
    dropout_shape = (1,) * (weights.ndim - 2) + weights.shape[-2:]
  else:
    dropout_shape = weights.shape
  keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
  return weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))


def _weighted_values(weights: Array, value: Array, wv_einsum: Callable[..., Array]) -> Array:
  """``[batch..., q_len, q_heads, v_depth]`` from the weights and (shared) value heads."""
  q_heads, kv_heads = weights.shape[-3], value.shape[-2]
  rep = q_heads // kv_heads
  if rep == 1:
    return wv_einsum("...hqk,...khd->...qhd", weights, value)
  batch, q_len, kv_len = weights.shape[:-3], weights.shape[-2], weights.shape[-1]
  wg = weights.reshape(batch + (kv_heads, rep, q_len, kv_len))
  out = wv_einsum("...hgqk,...khd->...qhgd", wg, value)
  return out.reshape(batch + (q_len, q_heads, value.shape[-1]))


@functools.partial(jax.jit, static_argnames=("is_causal", "block_size", "scale", "precision"))
def max_logits_blockwise(
    query: Array,
    key: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    block_size: int = 512,
    scale: float | None = None,
    precision: Any = None,
) -> Array:
  """Per-head max logits computed in key blocks, never materialising ``q k^T``.

  For attention that runs in a fused or flash kernel: call it beside the
  kernel with the same ``q`` and ``k`` and sow the result with
  :func:`sow_max_logits`. A ``lax.scan`` over ``ceil(kv_len / block_size)``
  key blocks keeps a running maximum, so peak memory is
  ``batch * heads * q_len * block_size`` logits instead of ``... * kv_len``.

  .. math::
    S_{\\max}^h = \\max_{b, i, j \\,:\\, \\mathrm{mask}_{b,h,i,j}} \\;
      \\mathrm{scale} \\cdot q_{b,i}^h \\cdot k_{b,j}^{h}

  Args:
    query: ``[batch..., q_len, num_heads, depth]``.
    key: ``[batch..., kv_len, num_kv_heads, depth]`` (GQA/MQA allowed).
    mask: boolean, broadcastable to ``[batch..., num_heads, q_len, kv_len]``.
    is_causal: top-left aligned causal mask (query ``i`` sees keys ``j <= i``).
    block_size: keys per block.
    scale: logit scale, default ``1/sqrt(depth)``.
    precision: matmul precision.

  Returns:
    float32 ``(num_heads,)``, ``stop_gradient``-ed; ``-inf`` for a head whose
    every logit is masked.

  References:
    Kimi Team, `Kimi K2 <https://arxiv.org/abs/2507.20534>`_, 2025 (§2.1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from muonclip_jax import max_logits_blockwise
    >>> q = jax.random.normal(jax.random.key(0), (1, 1024, 2, 16))
    >>> k = jax.random.normal(jax.random.key(1), (1, 1024, 2, 16))
    >>> full = jnp.einsum("bqhd,bkhd->hqk", q, k).max(axis=(1, 2)) / 4.0
    >>> bool(jnp.allclose(max_logits_blockwise(q, k, block_size=256), full, rtol=1e-5))
    True
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  q_heads, kv_heads = query.shape[-2], key.shape[-2]
  if q_heads % kv_heads:
    raise ValueError(f"query heads ({q_heads}) must be a multiple of key heads ({kv_heads}).")
  rep = q_heads // kv_heads
  depth = query.shape[-1]
  q_len, kv_len = query.shape[-3], key.shape[-3]
  batch = query.shape[:-3]
  scale = 1.0 / (depth ** 0.5) if scale is None else scale
  query = jax.lax.stop_gradient(query)
  key = jax.lax.stop_gradient(key)
  qg = (query * jnp.asarray(scale, query.dtype)).reshape(
      query.shape[:-2] + (kv_heads, rep, depth))

  n_blocks = -(-kv_len // block_size)
  padded = n_blocks * block_size
  key_axis = key.ndim - 3
  key = jnp.pad(key, [(0, 0)] * key_axis + [(0, padded - kv_len), (0, 0), (0, 0)])
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)
    if mask.ndim < 2:
      mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
    if mask.shape[-1] == kv_len and kv_len > 1:
      mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, padded - kv_len)])
    elif mask.shape[-1] != 1:
      raise ValueError(f"mask's last axis must be 1 or kv_len={kv_len}, got {mask.shape}")
  q_pos = jnp.arange(q_len)

  def body(running: Array, start: Array) -> tuple[Array, None]:
    kb = jax.lax.dynamic_slice_in_dim(key, start, block_size, axis=key_axis)
    logits = jnp.einsum("...qhgd,...khd->...hgqk", qg, kb, precision=precision,
                        preferred_element_type=jnp.float32)
    logits = logits.reshape(batch + (q_heads, q_len, block_size))
    k_pos = start + jnp.arange(block_size)
    valid = jnp.broadcast_to(k_pos < kv_len, (q_len, block_size))
    if is_causal:
      valid = valid & (q_pos[:, None] >= k_pos[None, :])
    if mask is not None:
      mb = mask if mask.shape[-1] == 1 else jax.lax.dynamic_slice_in_dim(
          mask, start, block_size, axis=mask.ndim - 1)
      valid = valid & mb
    block_max = head_max_logits(logits, mask=valid)
    return jnp.maximum(running, block_max), None

  init = jnp.full((q_heads,), -jnp.inf, jnp.float32)
  starts = jnp.arange(n_blocks) * block_size
  out, _ = jax.lax.scan(body, init, starts)
  return out


class MaxLogitMultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """``flax.linen.MultiHeadDotProductAttention`` that sows ``max_logits`` by default.

  Same parameters (``query``, ``key``, ``value``, ``out``; ``query_ln`` and
  ``key_ln`` with ``normalize_qk=True``) as the Flax module, so QK-Clip finds
  them without configuration; ``attention_fn`` defaults to
  :func:`dot_product_attention` and ``sow_weights`` to ``True`` (which here
  sows only the max logits). Collect them with ``mutable=['intermediates']``.
  """

  attention_fn: Callable[..., Array] = dot_product_attention

  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, sow_weights: bool = True,
               **kwargs: Any) -> Array:
    return super().__call__(inputs_q, inputs_k, inputs_v, sow_weights=sow_weights, **kwargs)


class MaxLogitMultiHeadAttention(nnx.MultiHeadAttention):
  """``flax.nnx.MultiHeadAttention`` that sows ``max_logits`` by default.

  ``attention_fn`` defaults to :func:`dot_product_attention` and ``sow_weights``
  to ``True``; GQA via ``num_kv_heads`` as in the parent. Collect the
  statistics with ``nnx.capture(model, nnx.Intermediate)``.
  """

  def __init__(self, *args: Any, attention_fn: Callable[..., Array] = dot_product_attention,
               **kwargs: Any) -> None:
    super().__init__(*args, attention_fn=attention_fn, **kwargs)

  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, sow_weights: bool = True,
               **kwargs: Any) -> Array:
    return super().__call__(inputs_q, inputs_k, inputs_v, sow_weights=sow_weights, **kwargs)
