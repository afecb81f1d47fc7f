r"""Flash attention whose kernel also returns QK-Clip's statistic (no second pass).

On GPU and TPU attention runs as a fused kernel that never writes out the
logits, so :func:`muonclip_jax.max_logits_blockwise` has to compute ``q k^T``
a second time for the statistic. The kernels already keep each query row's
maximum for their online softmax; tokamax returns it (``return_residuals``
on its ops, ``save_residuals`` on the TPU splash kernel). :func:`flash_attention`
is a drop-in ``attention_fn`` that sows the per-head max of those row maxima:

.. math::
  S_{\max}^h = \max_{b, i} m_{b,h,i}, \qquad
  m_{b,h,i} = \max_j \mathrm{cap}(q_{b,i}^h \cdot k_{b,j}^h / \sqrt{d})
  \text{ over unmasked } j.

The kernels report the max *after* the soft-cap; ``cap * tanh`` is monotone,
so the package's statistic (before the cap) is ``cap * atanh(m / cap)``. When
the capped max rounds to the cap itself (pre-cap logits beyond about
``9 cap`` in f32) the pre-cap value is lost: the statistic is then ``+inf``,
which QK-Clip never applies and counts as skipped (``qk_clip_metrics``'s
``skipped``); use :func:`muonclip_jax.dot_product_attention`, which takes
the statistic before the cap, if that happens.

Refused, with a clear error, where a kernel cannot give the exact statistic:
attention sinks and ``max_logit_const`` (the kernel's "max" is then the sink
or the constant), an additive ``bias`` (the kernels add it before the max;
pass ``stats_include_bias=True`` to accept that definition), and dropout
(not in the fused kernels). The Triton and Mosaic GPU kernels run with their
stable softmax forced on: with a soft-cap of 60 or less their default skips it
and returns zeros for the max. cuDNN's logsumexp is only an upper bound
(``max <= lse <= max + log(keys)``); it is used only when asked for by name,
``statistic="logsumexp_upper_bound"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from muonclip_jax import _tokamax
from muonclip_jax._attention import check_qkv, sow_max_logits
from muonclip_jax._statistic import MAX_LOGITS

__all__ = ["IMPLEMENTATIONS", "flash_attention"]

Array = jax.Array
Implementation = Literal["auto", "xla", "triton", "mosaic_gpu", "splash"]
IMPLEMENTATIONS = ("auto", "xla", "triton", "mosaic_gpu", "splash")
Statistic = Literal["max", "logsumexp_upper_bound"]
_SPLASH_BLOCK = 128


def choose_implementation(implementation: str, platform: str, device_kind: str, *,
                          bias: Array | None, mask: Array | None, ndim: int) -> str:
  """The kernel to run: ``implementation``, or for ``"auto"`` the fastest of
  ``platform`` (``jax.default_backend()``) that supports the arguments.

  Pure (no device query), so the choice is testable on any machine. On TPU,
  splash takes every sequence length (:func:`_splash_rows` pads to its
  128-blocks and masks the pad keys); it needs ``[batch, seq, heads, depth]``
  inputs, no bias, and no mask other than key padding, else XLA.
  """
  if implementation != "auto":
    return implementation
  if platform == "tpu":
    ok_mask = mask is None or _key_padding(mask) is not None
    return "splash" if bias is None and ok_mask and ndim == 4 else "xla"
  if platform == "gpu":
    kind = device_kind.lower()
    return "mosaic_gpu" if any(s in kind for s in ("h100", "h200", "b200", "gb200")) \
        else "triton"
  return "xla"


def _pick(implementation: str, bias: Array | None, mask: Array | None, ndim: int) -> str:
  """:func:`choose_implementation` on this process's backend."""
  if implementation != "auto":
    return implementation
  platform = jax.default_backend()
  kind = jax.devices()[0].device_kind if platform == "gpu" else ""
  return choose_implementation(implementation, platform, kind, bias=bias, mask=mask, ndim=ndim)


def _check_soft_cap(logit_soft_cap: Any) -> float | None:
  """``None``, or the soft-cap as a positive finite Python float."""
  if logit_soft_cap is None:
    return None
  if isinstance(logit_soft_cap, jax.core.Tracer):
    raise ValueError("flash_attention: logit_soft_cap must be a concrete number (the "
                     "kernels take it as a static setting), got a traced value; pass it with "
                     "functools.partial outside jax.jit, or use None to disable the soft-cap")
  try:
    cap = float(logit_soft_cap)
  except (TypeError, ValueError):
    raise ValueError(f"flash_attention: logit_soft_cap must be a positive finite float or "
                     f"None, got {logit_soft_cap!r}") from None
  if not math.isfinite(cap) or cap <= 0:
    raise ValueError(f"flash_attention: logit_soft_cap must be a positive finite float "
                     f"(logits become cap * tanh(logits / cap)), got {cap}; use None to "
                     "disable the soft-cap")
  return cap


def _check_mask(mask: Any, query: Array, key: Array) -> Array | None:
  """The mask as a boolean array of the query's rank, or a clear error.

  Accepted: boolean (``True`` attends) or integer (nonzero attends, as
  ``jnp.where`` reads it in Flax's attention), of shape ``[batch...,
  num_heads, q_len, kv_len]`` with each axis the full size or 1. Float masks
  are refused: an additive ``0 / -inf`` mask would read inverted.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  target = query.shape[:-3] + (query.shape[-2], query.shape[-3], key.shape[-3])
  layout = "[" + ", ".join(["batch"] * (query.ndim - 3) + ["num_heads", "q_len", "kv_len"]) + "]"
  if jnp.issubdtype(mask.dtype, jnp.integer):
    mask = mask != 0
  elif mask.dtype != jnp.bool_:
    raise ValueError(f"flash_attention: mask must be boolean (True attends) or integer 0/1, "
                     f"got dtype {mask.dtype}; convert it (an additive 0/-inf mask: "
                     "mask == 0), or pass an additive mask as bias")
  if mask.ndim != len(target) or any(m not in (1, t) for m, t in zip(mask.shape, target)):
    raise ValueError(f"flash_attention: mask of shape {tuple(mask.shape)} does not fit "
                     f"{layout} = {target}: it needs rank {len(target)}, each axis 1 or the "
                     f"full size. A key padding mask [batch, kv_len] is "
                     "mask[:, None, None, :]")
  return mask


def _check_rank4(query: Array, implementation: str, reason: str) -> None:
  """Splash and ``mesh=`` read ``[batch, seq_len, num_heads, head_dim]``."""
  if query.ndim != 4:
    raise ValueError(
        f"flash_attention: {reason} needs query, key and value of rank 4, [batch, seq_len, "
        f"num_heads, head_dim]; got query of shape {tuple(query.shape)} (rank {query.ndim}). "
        "Add a batch axis (x[None]) or merge extra batch axes into one"
        + (", or use implementation='xla', which takes any batch axes"
           if implementation != "xla" else ""))


def _key_padding(mask: Array) -> Array | None:
  """``[batch, kv_len]`` if ``mask`` only masks keys (``[B, 1, 1, T_k]``), else ``None``."""
  if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
    return mask[:, 0, 0, :]
  return None


def _refuse(implementation: str, *, bias: Array | None, stats_include_bias: bool,
            dropout: bool, sinks: Array | None, max_logit_const: float | None,
            flax_kwargs: dict[str, Any]) -> None:
  """Clear errors for what no kernel can give exactly (see the module docstring)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flash_attention: implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  for name in ("einsum_dot_general", "qk_attn_weights_einsum", "attn_weights_value_einsum"):
    if flax_kwargs.get(name) is not None:
      raise ValueError(f"flash_attention: {name} is not supported by fused kernels; use "
                       "muonclip_jax.dot_product_attention")
  if dropout:
    raise ValueError("flash_attention: attention dropout is not in the fused kernels; set "
                     "dropout_rate=0 (or deterministic=True) or use dot_product_attention")
  if sinks is not None:
    raise ValueError("flash_attention: with attention sinks the kernel's row max includes "
                     "the sink logit, not QK-Clip's statistic; not supported")
  if max_logit_const is not None:
    raise ValueError("flash_attention: with max_logit_const the kernel returns the "
                     "constant, not the row max; not supported")
  if bias is not None and not stats_include_bias:
    raise ValueError("flash_attention: the kernels add bias before the max, so the "
                     "statistic would include it; pass stats_include_bias=True to accept "
                     "that, or use dot_product_attention")
  if implementation == "splash" and bias is not None:
    raise ValueError("flash_attention: the splash kernel takes no bias")


def _tokamax_op(implementation: str) -> Any:
  tk = _tokamax.load()
  if implementation == "xla":
    return tk.base.DotProductAttention()
  if implementation == "triton":
    # Stable softmax forced on: tokamax's default turns it off for soft-caps <= 60
    # and then returns zeros for the max.
    return tk.triton.PallasTritonFlashAttention(use_stable_softmax=True)
  return tk.mosaic_gpu.PallasMosaicGpuFlashAttention(use_stable_softmax=True)


def _op_rows(query: Array, key: Array, value: Array, *, implementation: str,
             bias: Array | None, mask: Array | None, is_causal: bool,
             logit_soft_cap: float | None, precision: Any, interpret: bool
             ) -> tuple[Array, Array]:
  """tokamax op: output ``[B, T, H, d]`` and row maxima ``[B, H, T]`` (after the cap)."""
  del interpret  # the splash kernel's option (see _splash_rows)
  op = _tokamax_op(implementation)
  out, (row_max, _) = op(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                         logits_soft_cap=logit_soft_cap,
                         precision=precision if precision is not None else
                         jax.lax.Precision.DEFAULT, return_residuals=True)
  return out, row_max


def _splash_rows(query: Array, key: Array, value: Array, *, mask: Array | None,
                 is_causal: bool, logit_soft_cap: float | None, interpret: bool
                 ) -> tuple[Array, Array]:
  """Splash kernel per batch element: output and row maxima ``[B, H, T]``.

  The kernel works in blocks of 128 and needs lengths that are multiples of
  them: shorter or uneven sequences are padded, the pad keys masked out (a
  segment of their own) and the pad query rows dropped, so the output and the
  row maxima are those of the unpadded inputs.
  """
  tk = _tokamax.load()
  q_len, kv_len = query.shape[-3], key.shape[-3]
  q_pad, kv_pad = (-(-x // _SPLASH_BLOCK) * _SPLASH_BLOCK for x in (q_len, kv_len))
  block = _SPLASH_BLOCK
  config = dataclasses.replace(
      tk.splash.SplashConfig.get_default(), block_q=block, block_kv=block,
      block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
      block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
      attn_logits_soft_cap=logit_soft_cap, interpret=interpret)
  shape = (q_pad, kv_pad)
  kmask = (tk.splash_mask.CausalMask(shape) if is_causal else tk.splash_mask.FullMask(shape))
  kernel = tk.splash.make_splash_mha(kmask, config=config, save_residuals=True,
                                     q_seq_shards=1)
  scale = 1.0 / jnp.sqrt(query.shape[-1]).astype(query.dtype)  # the caller scales q
  batch = query.shape[0]
  valid = None if mask is None else jnp.broadcast_to(_key_padding(mask), (batch, kv_len))
  if kv_pad != kv_len:
    valid = jnp.ones((batch, kv_len), bool) if valid is None else valid
    valid = jnp.pad(valid, ((0, 0), (0, kv_pad - kv_len)))  # pad keys: masked
  # [B, T, H, D] -> [B, H, T, D], the sequence padded to whole blocks.
  to_hd = lambda x, n: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))),
                                    -3, -2)

  def one(q, k, v, keep):
    segments = None
    if keep is not None:  # keys of segment 0 are masked for queries of segment 1
      segments = tk.splash_base.SegmentIds(q=jnp.ones((q_pad,), jnp.int32),
                                           kv=keep.astype(jnp.int32))
    out, stats = kernel(q, k, v, segments)
    return out, stats["max_logits"]

  args = (to_hd(query * scale, q_pad), to_hd(key, kv_pad), to_hd(value, kv_pad))
  if valid is None:
    out, rows = jax.vmap(lambda q, k, v: one(q, k, v, None))(*args)
  else:
    out, rows = jax.vmap(one)(*args, valid)
  return jnp.swapaxes(out[..., :q_len, :], -3, -2), rows[..., :q_len]


def _lse_rows(query: Array, key: Array, value: Array, *, bias: Array | None,
              mask: Array | None, is_causal: bool) -> tuple[Array, Array]:
  """``jax.nn.dot_product_attention`` (cuDNN on GPU): output and logsumexp ``[B, H, T]``."""
  out, lse = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                          is_causal=is_causal, return_residual=True)
  return out, jnp.swapaxes(lse.astype(jnp.float32), -1, -2)  # [B, T, H] -> [B, H, T]


def head_max_from_rows(rows: Array, logit_soft_cap: float | None) -> Array:
  """Per query head: the max row max, before the soft-cap; ``-inf`` for masked heads."""
  rows = jax.lax.stop_gradient(rows.astype(jnp.float32))
  # Fully masked rows carry the kernels' large negative sentinels.
  rows = jnp.where(rows > -1e30, rows, -jnp.inf)
  head = jnp.max(rows, axis=tuple(a for a in range(rows.ndim) if a != rows.ndim - 2))
  if logit_soft_cap is not None:
    cap = jnp.float32(logit_soft_cap)
    # cap * tanh is monotone: invert it. |m| == cap (saturated) gives +-inf.
    head = jnp.where(jnp.isfinite(head), cap * jnp.arctanh(jnp.clip(head / cap, -1, 1)), head)
  return head


def _attend(query: Array, key: Array, value: Array, *, implementation: str,
            statistic: str, bias: Array | None, mask: Array | None, is_causal: bool,
            logit_soft_cap: float | None, precision: Any, interpret: bool
            ) -> tuple[Array, Array]:
  """Output ``[B, T, H, d]`` and the per-head statistic ``[H]`` on this device."""
  if statistic == "logsumexp_upper_bound":
    if logit_soft_cap is not None:
      raise ValueError("flash_attention: the logsumexp bound has no soft-cap option")
    out, rows = _lse_rows(query, key, value, bias=bias, mask=mask, is_causal=is_causal)
  elif implementation == "splash":
    out, rows = _splash_rows(query, key, value, mask=mask, is_causal=is_causal,
                             logit_soft_cap=logit_soft_cap, interpret=interpret)
  else:
    out, rows = _op_rows(query, key, value, implementation=implementation, bias=bias,
                         mask=mask, is_causal=is_causal, logit_soft_cap=logit_soft_cap,
                         precision=precision, interpret=interpret)
  return out, head_max_from_rows(rows, logit_soft_cap)


def _sharded(fn: Callable[..., tuple[Array, Array]], mesh: Mesh, batch_axes: Sequence[str],
             head_axes: Sequence[str], has_mask: bool) -> Callable[..., tuple[Array, Array]]:
  """``fn`` under ``shard_map`` over batch and heads; the statistic is max-reduced over
  the batch shards and stays sharded over heads."""
  b = tuple(batch_axes) or None
  h = tuple(head_axes) or None
  qkv = P(b, None, h, None)
  in_specs = (qkv, qkv, qkv) + ((P(b),) if has_mask else ())

  def local(*args):
    out, stat = fn(*args)
    return out, (jax.lax.pmax(stat, b) if b else stat)

  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(qkv, P(h)),
                       check_vma=False)


def flash_attention(
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
    *,
    is_causal: bool = False,
    implementation: Implementation = "auto",
    interpret: bool = False,
    logit_soft_cap: float | None = None,
    stats_include_bias: bool = False,
    statistic: Statistic = "max",
    sinks: Array | None = None,
    max_logit_const: float | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = (),
    head_axes: Sequence[str] = (),
    sow_name: str = MAX_LOGITS,
    **flax_kwargs: Any,
) -> Array:
  r"""Fused (flash) attention that sows the per-head max logit its kernel computed.

  A drop-in ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``
  and ``flax.nnx.MultiHeadAttention``, like
  :func:`muonclip_jax.dot_product_attention`, for GPU and TPU: the statistic
  comes from the kernel's own row maxima (tokamax), so it costs a reduction
  over rows, not a second ``q k^T``. Set the keyword options with
  ``functools.partial``.

  Args:
    query: ``[batch, q_len, num_heads, depth]``.
    key: ``[batch, kv_len, num_kv_heads, depth]`` (GQA/MQA: ``num_kv_heads``
      divides ``num_heads``).
    value: ``[batch, kv_len, num_kv_heads, v_depth]``.
    bias: additive bias; the kernels add it before their max, so it needs
      ``stats_include_bias=True`` (not with ``"splash"``).
    mask: ``[batch, heads, q_len, kv_len]``, each axis the full size or 1
      (a key padding mask ``[batch, kv_len]`` is ``mask[:, None, None, :]``);
      boolean (``False`` is masked) or integer (nonzero attends, as in
      Flax); float masks are refused (an additive ``0 / -inf`` mask would
      read inverted). ``"splash"`` takes key padding masks
      ``[batch, 1, 1, kv_len]`` only.
    broadcast_dropout: Flax's argument; dropout is not supported.
    dropout_rng: Flax's argument; dropout is not supported.
    dropout_rate: must be 0 unless ``deterministic``.
    deterministic: Flax's argument.
    dtype: computation dtype (default: promoted from the inputs).
    precision: matmul precision (tokamax ops).
    module: the linen or NNX module to sow into; ``None`` sows nothing.
    is_causal: causal mask (top-left aligned).
    implementation: ``"xla"`` (tokamax's XLA reference; any backend),
      ``"triton"`` / ``"mosaic_gpu"`` (NVIDIA; Mosaic needs sm90+),
      ``"splash"`` (TPU; rank-4 inputs; any sequence length: it pads to its
      128-blocks and masks the pad keys, so output and statistic are exact),
      or ``"auto"``: splash on TPU (when no bias, a supported mask and rank-4
      inputs, else XLA), Mosaic GPU on H100/H200/B200, Triton on other GPUs,
      XLA on CPU.
    interpret: run the splash kernel in Pallas interpret mode (CPU tests; the
      GPU kernels have no interpret path here).
    logit_soft_cap: ``cap * tanh(logits / cap)`` before the softmax; the
      statistic is inverted to before the cap (see the module docstring).
      A positive finite Python number (static, not traced); ``None``
      disables it.
    stats_include_bias: accept a statistic that includes ``bias``.
    statistic: ``"max"`` (the kernel's row max), or
      ``"logsumexp_upper_bound"``: ``jax.nn.dot_product_attention``'s
      logsumexp (cuDNN on GPU), an upper bound ``max <= lse <= max +
      log(kv_len)``, only by this name.
    sinks: attention sinks: refused (the kernel's max would include them).
    max_logit_const: refused (the kernel would return the constant).
    mesh: run under ``shard_map`` on this mesh, over ``batch_axes`` and
      ``head_axes`` (the statistic is max-reduced over the batch shards).
    batch_axes: mesh axes of the batch dimension.
    head_axes: mesh axes of the head dimension (key heads must divide by them).
    sow_name: the sown variable's name.
    **flax_kwargs: the rest of Flax's ``attention_fn`` protocol
      (``promote_dtype``, ``force_fp32_for_softmax`` are honoured or
      harmless; custom einsums are refused).

  Returns:
    ``[batch, q_len, num_heads, v_depth]``.

  Raises:
    ValueError: a configuration whose statistic no kernel gives exactly (see
      the module docstring), an unknown implementation, a soft-cap that is
      not a positive finite number, a mask of another shape or a float mask,
      inputs not of rank 4 for splash or ``mesh=`` (each message names the
      argument and what it accepts).
    ImportError: tokamax missing or outside the supported range (the message
      says how to install the ``kernels`` extra).

  References:
    Dao et al., `FlashAttention <https://arxiv.org/abs/2205.14135>`_, 2022
    (online softmax and its row maxima). Kimi Team, `Kimi K2
    <https://arxiv.org/abs/2507.20534>`_, 2025 (§2.1, the statistic).
  """
  _refuse(implementation, bias=bias, stats_include_bias=stats_include_bias,
          dropout=not deterministic and dropout_rate > 0.0, sinks=sinks,
          max_logit_const=max_logit_const, flax_kwargs=flax_kwargs)
  logit_soft_cap = _check_soft_cap(logit_soft_cap)
  query, key, value = check_qkv(query, key, value, dtype, flax_kwargs.get("promote_dtype"),
                                 None, None, None, None)
  mask = _check_mask(mask, query, key)
  if statistic not in ("max", "logsumexp_upper_bound"):
    raise ValueError(f"flash_attention: statistic must be 'max' or 'logsumexp_upper_bound', "
                     f"got {statistic!r}")
  impl = _pick(implementation, bias, mask, query.ndim)
  if impl == "splash":
    _check_rank4(query, implementation, "the splash kernel")
  if mesh is not None:
    _check_rank4(query, implementation, "mesh=")
  if impl == "splash" and mask is not None and _key_padding(mask) is None:
    raise ValueError(f"flash_attention: the splash kernel takes is_causal and key padding "
                     f"masks ([batch, 1, 1, kv_len]), got a mask of shape "
                     f"{tuple(mask.shape)}; other masks need implementation='xla'")
  fn = functools.partial(_attend, implementation=impl, statistic=statistic, bias=bias,
                         is_causal=is_causal, logit_soft_cap=logit_soft_cap,
                         precision=precision, interpret=interpret)
  if mesh is None:
    out, stat = fn(query, key, value, mask=mask)
  else:
    if bias is not None:
      raise ValueError("flash_attention: bias with mesh= is not supported")
    padding = None if mask is None else _key_padding(mask)
    if padding is not None:
      padding = jnp.broadcast_to(padding, (query.shape[0], key.shape[-3]))
    if mask is not None and padding is None:
      raise ValueError("flash_attention: with mesh=, masks must be key padding "
                       "[batch, 1, 1, kv_len]")
    run = (lambda q, k, v, m: fn(q, k, v, mask=m[:, None, None, :])) if padding is not None \
        else (lambda q, k, v: fn(q, k, v, mask=None))
    args = (query, key, value) + ((padding,) if padding is not None else ())
    out, stat = _sharded(run, mesh, batch_axes, head_axes, padding is not None)(*args)
  if module is not None:
    sow_max_logits(module, stat, name=sow_name)
  return out.astype(query.dtype)

