"""QK-Clip statistics for DeepMind's ``gemma`` package (linen), with no model change.

Gemma's ``gemma.gm.nn._modules.Attention`` (``gemma`` 3.3.0) computes its
logits inline and sows nothing. :func:`gemma_max_logits` is a context manager
that intercepts every ``Attention.__call__`` (``flax.linen.intercept_methods``)
and sows, on that module, the per-head statistic of Kimi K2 (arXiv 2507.20534,
§2.1),

.. math::
  S_{\\max}^h = \\max_{b,\\, t,\\, s \\in \\text{mask}} \\;
  (\\text{query\\_pre\\_attn\\_scalar} \\cdot \\tilde q_{b,t}^h) \\cdot \\tilde k_{b,s}^{g(h)},

with ``q~``, ``k~`` the module's own projections (``qkv_einsum`` or
``q_einsum`` + ``kv_einsum``), its QK-norms (``_query_norm``/``_key_norm``) and
Gemma's own ``apply_rope``; the mask is the call's ``attn_mask`` and, for
``LOCAL_SLIDING`` layers, Gemma's own ``create_sliding_mask``; the value is
taken *before* the soft-cap (``attn_logits_soft_cap``), as K2 defines it. GQA
and MQA are per query head. The projections are the module's own submodules
called on the same input, so XLA computes them once.

The ``nn.jit`` trap. ``gemma.gm.nn.Transformer.__call__`` is wrapped in
``nn.jit``: a forward pass traced *without* the interceptor is cached, and a
later call inside ``gemma_max_logits()`` reuses that trace, so no interceptor
runs. The same holds for any ``jax.jit`` whose trace is reused. The context
manager counts the attention calls it saw and raises on exit when there were
none, naming the fix (enter it on the first call, or ``jax.clear_caches()``
once), so the trap cannot turn into silently missing statistics.

Usage (two lines of glue, no model change)::

  tx = mc.muonclip(lr, tau=100.0, layouts=mc.gemma_layouts(params))
  def loss_fn(params, batch):
    with mc.gemma_max_logits():
      out, state = model.apply({'params': params}, batch, mutable=['intermediates'])
    return loss(out.logits, batch), state['intermediates']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from muonclip_jax._attention import sow_max_logits
from muonclip_jax._paths import leaves_with_paths, show_path
from muonclip_jax._qk_layouts import QKLayout, qk_norm, separate_qk

Array = jax.Array
# The versions whose attention code this module mirrors (gemma/gm/nn/_modules.py).
SUPPORTED = ("3.3.0",)


def _gemma_modules() -> tuple[Any, Any]:
  """``(gemma.gm.nn._modules, gemma.gm.math._positional_embeddings)``, imported lazily."""
  try:
    from gemma.gm.math import _positional_embeddings  # noqa: PLC0415 (optional)
    from gemma.gm.nn import _modules  # noqa: PLC0415 (optional)
  except ImportError as e:
    raise ImportError("muonclip_jax.gemma_max_logits needs DeepMind's gemma package "
                      "(pip install gemma==3.3.0)") from e
  return _modules, _positional_embeddings


def attention_max_logits(m: Any, x: Array, segment_pos: Array, attn_mask: Array,
                         pe: Any, modules: Any) -> Array:
  """The per-head pre-soft-cap max logit of one bound Gemma ``Attention`` call."""
  if m.use_qkv_einsum:
    q, k, _ = m.qkv_einsum("BTD,SNDH->SBTNH", x)
  else:
    q = m.q_einsum("BTD,NDH->BTNH", x)
    k, _ = m.kv_einsum("BSD,CKDH->CBSKH", x)
  if m.use_qk_norm:
    q, k = m._query_norm(q), m._key_norm(k)  # noqa: SLF001 (Gemma's own submodules)
  rope = dict(base_frequency=m.rope_base_frequency, scale_factor=m.rope_scale_factor)
  q = pe.apply_rope(q, segment_pos, **rope) * m.query_pre_attn_scalar
  k = pe.apply_rope(k, segment_pos, **rope)
  b, t, n, h = q.shape
  kv = k.shape[2]
  logits = jnp.einsum("BTKGH,BSKH->BTKGS", q.reshape(b, t, kv, n // kv, h), k)
  logits = logits.reshape(b, t, n, -1).astype(jnp.float32)
  mask = attn_mask
  if m.attn_type == modules.AttentionType.LOCAL_SLIDING:
    mask = mask * modules.create_sliding_mask(segment_pos,
                                              sliding_window_size=m.sliding_window_size)
  logits = jnp.where(jnp.expand_dims(mask, -2).astype(bool), logits, -jnp.inf)
  return jnp.max(logits, axis=(0, 1, 3))


class _Tally:
  """Attention calls seen inside one :func:`gemma_max_logits` block."""

  def __init__(self) -> None:
    self.calls = 0


@contextlib.contextmanager
def gemma_max_logits(*, require: bool = True) -> Iterator[_Tally]:
  """Sows ``max_logits`` on every Gemma ``Attention`` called inside the block.

  Wrap the ``model.apply(..., mutable=['intermediates'])`` of the training
  step; the statistics appear in ``state['intermediates']`` under each
  attention module's path (``layer_0/attn/max_logits``), one float32 per
  query head, pre-soft-cap. Works under ``jax.jit``/``jax.grad`` (the
  interceptor runs while tracing).

  Args:
    require: raise on exit when no ``Attention`` call was intercepted. That
      happens when an ``nn.jit`` (``gemma.gm.nn.Transformer.__call__``) or a
      ``jax.jit`` trace made before the block is reused: the cached trace
      never reaches the interceptor.

  Yields:
    A tally whose ``calls`` counts the intercepted attention calls.

  Raises:
    ImportError: the ``gemma`` package is missing.
    ValueError: an attention call with a KV cache (decoding; the statistic is
      for training forward passes).
    RuntimeError: no attention call was intercepted (``require=True``).
  """
  modules, pe = _gemma_modules()
  tally = _Tally()

  def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, modules.Attention):
      return next_fun(*args, **kwargs)
    names = ("x", "segment_pos", "cache", "attn_mask")
    bound = dict(zip(names, args, strict=False)) | kwargs
    if bound.get("cache") is not None:
      raise ValueError("gemma_max_logits: an attention call with a KV cache (decoding); "
                       "collect statistics on training forward passes (cache=None)")
    out = next_fun(*args, **kwargs)
    s = attention_max_logits(m, bound["x"], bound["segment_pos"], bound["attn_mask"], pe,
                             modules)
    sow_max_logits(m, s)
    tally.calls += 1
    return out

  with nn.intercept_methods(interceptor):
    yield tally
  if require and tally.calls == 0:
    raise RuntimeError(
        "gemma_max_logits: no Gemma Attention call was intercepted. gemma's Transformer."
        "__call__ is wrapped in nn.jit, so a forward pass traced before this block (an "
        "init, an eval step, a call outside the block) is cached and reused without the "
        "interceptor. Enter gemma_max_logits() around every training forward pass from the "
        "first one, or call jax.clear_caches() once before the first call inside it.")


def _gemma_layout(names: set[str], heads: int, kv_heads: int) -> QKLayout:
  if "_query_norm/scale" in names:
    # After a QK-norm only the norms' gains scale the logit; Gemma's RMSNorm
    # multiplies by (1 + scale), shared by the heads of a layer.
    return qk_norm("_query_norm", "_key_norm", num_heads=heads, num_kv_heads=kv_heads,
                   gain="one_plus", bias=None)._replace(name="gemma[qk_norm]")
  if "qkv_einsum/w" in names:                                # MHA: (3, N, D, H)
    layout = separate_qk("qkv_einsum", "qkv_einsum", num_heads=heads, kernel="w",
                         head_axis=0, query_stack=(0, 0), key_stack=(0, 1), bias=None)
  else:                                                      # GQA/MQA: (N, D, H), (2, K, D, H)
    layout = separate_qk("q_einsum", "kv_einsum", num_heads=heads, kernel="w", head_axis=0,
                         key_stack=(0, 0), bias=None)
  return layout._replace(name="gemma")


def gemma_layouts(params: Any) -> dict[str, QKLayout]:
  """QK-Clip layouts for every Gemma ``Attention`` module in a parameter tree.

  An attention module is a path holding ``qkv_einsum/w`` (MHA, ``(3, N, D,
  H)``) or ``q_einsum/w`` ``(N, D, H)`` with ``kv_einsum/w`` ``(2, K, D, H)``
  (GQA/MQA); with QK-norm (``_query_norm/scale``, Gemma 3) the clip acts on
  the norms' ``(1 + scale)`` gains instead of the kernels (a norm after the
  projection cancels any kernel scaling).

  Args:
    params: the Gemma parameter tree (``{'params': ...}`` or its content).

  Returns:
    ``{attention module path: QKLayout}`` for ``qk_clip(layouts=...)``.

  Raises:
    ValueError: no Gemma attention parameters in ``params``.
  """
  leaves, _ = leaves_with_paths(params)
  shapes = {p: tuple(jnp.shape(x)) for p, x in leaves}
  cut = 1 if leaves and all(p and p[0] == "params" for p, _ in leaves) else 0
  modules: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
  for p, shape in shapes.items():
    p = p[cut:]
    for tail in (("qkv_einsum", "w"), ("q_einsum", "w"), ("kv_einsum", "w"),
                 ("_query_norm", "scale"), ("_key_norm", "scale")):
      if p[-2:] == tail:
        modules.setdefault(p[:-2], {})["/".join(tail)] = shape
  out = {}
  for m, found in modules.items():
    if "qkv_einsum/w" in found:
      heads = kv = found["qkv_einsum/w"][-3]
    elif "q_einsum/w" in found and "kv_einsum/w" in found:
      heads, kv = found["q_einsum/w"][-3], found["kv_einsum/w"][-3]
    else:
      continue
    out[show_path(m) if m else ""] = _gemma_layout(set(found), heads, kv)
  if not out:
    raise ValueError("gemma_layouts: no Gemma attention parameters (qkv_einsum/w, or "
                     "q_einsum/w with kv_einsum/w) in params")
  return out
