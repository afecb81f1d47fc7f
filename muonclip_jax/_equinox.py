"""QK-Clip statistics and layouts for Equinox's ``eqx.nn.MultiheadAttention``.

Equinox has no intermediates collection: a forward pass returns what its code
returns and nothing else, so the per-head statistic

.. math::
  S_{\\max}^h = \\max_{i,\\, j} \\; \\frac{q_i^h \\cdot k_j^h}{\\sqrt{d_{qk}}}

(Kimi K2, arXiv 2507.20534, §2.1; over the positions, after the mask) has to
leave the model as a return value. That is also what makes it robust: a
returned array is stacked by ``jax.vmap`` over the batch and by ``lax.scan``
over layers like any other output, under ``jax.jit``/``eqx.filter_jit`` and
any nesting of them. No tracer is stored anywhere.

* :func:`equinox_attention` runs the real ``eqx.nn.MultiheadAttention`` (the
  same call, the same ``process_heads`` hook for RoPE) and also returns the
  statistic of that call, ``(num_heads,)`` per example. It takes the heads
  that the module's own attention uses (after ``process_heads``), so RoPE and
  custom per-head processing are included.
* :func:`equinox_layouts` describes every ``MultiheadAttention`` of a model
  for :func:`muonclip_jax.qk_clip`: Equinox's ``Linear`` stores ``weight`` as
  ``(out, in)``; the heads are the row blocks of ``query_proj.weight`` and
  ``key_proj.weight`` (and the entries of their biases).
* :func:`equinox_max_logits` turns what the model returned (``(batch...,
  [layers,] heads)``, or one array per attention module) into the statistics
  tree QK-Clip reads, the batch axes max-reduced.

Usage (one line changed in the block, the statistic returned through it)::

  class Block(eqx.Module):
    def __call__(self, x, mask):
      a, s = mc.equinox_attention(self.attn, x, x, x, mask, process_heads=self.rope_fn)
      ...
      return x, s

  tx = mc.muonclip(lr, tau=100.0, layouts=mc.equinox_layouts(model))
  ...
  max_logits = mc.equinox_max_logits(model, stats)   # stats: (batch, layers, heads)
  updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)

Equinox is imported lazily: the package does not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from muonclip_jax._paths import path_components, show_path
from muonclip_jax._presets import torch_layout
from muonclip_jax._qk_layouts import QKLayout
from muonclip_jax._statistic import MAX_LOGITS

Array = jax.Array


def _eqx() -> Any:
  try:
    import equinox as eqx  # noqa: PLC0415 (optional dependency)
  except ImportError as e:  # pragma: no cover - exercised only without equinox
    raise ImportError("muonclip_jax's Equinox support needs equinox: pip install equinox"
                      ) from e
  return eqx


def _check_mha(mha: Any, where: str) -> None:
  eqx = _eqx()
  if not isinstance(mha, eqx.nn.MultiheadAttention):
    raise TypeError(f"{where}: expected an equinox.nn.MultiheadAttention, got "
                    f"{type(mha).__name__}. For other attention code compute the logits "
                    f"yourself and reduce them with muonclip_jax.head_max_logits.")


def equinox_attention(
    mha: Any,
    query: Array,
    key_: Array,
    value: Array,
    mask: Array | None = None,
    *,
    key: Array | None = None,
    inference: bool | None = None,
    process_heads: Callable[[Array, Array, Array], tuple[Array, Array, Array]] | None = None,
) -> tuple[Array, Array]:
  r"""Calls an ``eqx.nn.MultiheadAttention`` and returns its output and per-head max logits.

  The output is the module's own (``mha(query, key_, value, mask, ...)``,
  unchanged). The statistic is computed from the query and key heads the
  module attends with, after ``process_heads`` (RoPE), as Equinox scales
  them: ``S^h = max_{i,j} (q_i^h / sqrt(qk_size)) . k_j^h`` over the entries
  where ``mask`` is ``True``. Like the module, this works on one example;
  ``jax.vmap`` it over the batch and the statistic gets a batch axis.

  Args:
    mha: the ``equinox.nn.MultiheadAttention``.
    query: ``(q_seq, query_size)``.
    key_: ``(kv_seq, key_size)``.
    value: ``(kv_seq, value_size)``.
    mask: ``(q_seq, kv_seq)`` or ``(num_heads, q_seq, kv_seq)`` booleans, as
      for the module.
    key: dropout key, as for the module.
    inference: as for the module.
    process_heads: as for the module (e.g. RoPE).

  Returns:
    ``(output, max_logits)``: the module's output and a float32
    ``(num_heads,)`` array, ``stop_gradient``-ed (``-inf`` for a head whose
    every entry is masked; QK-Clip skips it).

  Raises:
    TypeError: ``mha`` is not an ``equinox.nn.MultiheadAttention``.
  """
  _check_mha(mha, "equinox_attention")
  seen: list[tuple[Array, Array]] = []

  def hook(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    if process_heads is not None:
      q, k, v = process_heads(q, k, v)
    seen.append((q, k))
    return q, k, v

  out = mha(query, key_, value, mask, key=key, inference=inference, process_heads=hook)
  if len(seen) != 1:
    raise RuntimeError(f"equinox_attention: the module called process_heads {len(seen)} "
                       f"times (expected once); this version of Equinox is not supported")
  q, k = seen[0]
  q = q / math.sqrt(q.shape[-1])                              # as Equinox scales it
  logits = jnp.einsum("shd,Shd->hsS", q, k).astype(jnp.float32)
  if mask is not None:
    m = mask if mask.ndim == 3 else mask[None]
    logits = jnp.where(m, logits, -jnp.inf)
  return out, jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1)))


def _attention_modules(model: Any) -> list[tuple[tuple[str, ...], Any]]:
  """``[(path components, module)]`` of every ``MultiheadAttention`` in ``model``, tree order."""
  eqx = _eqx()
  is_mha = lambda x: isinstance(x, eqx.nn.MultiheadAttention)
  found, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_mha)
  return [(path_components(p), m) for p, m in found if is_mha(m)]


def _lead(mha: Any) -> tuple[int, ...]:
  """Stacked (scanned) layer axes of a module built with ``eqx.filter_vmap``."""
  return tuple(jnp.shape(mha.query_proj.weight)[:-2])


def equinox_layout(num_heads: int) -> QKLayout:
  """The :class:`QKLayout` of one ``eqx.nn.MultiheadAttention`` (``(out, in)`` weights).

  ``query_proj.weight`` and ``key_proj.weight`` are ``(num_heads * qk_size,
  in)``: head ``h`` owns rows ``[h * qk_size, (h + 1) * qk_size)``; the
  biases (when ``use_query_bias``/``use_key_bias``) are ``(num_heads *
  qk_size,)``. Extra leading axes (layers stacked by ``eqx.filter_vmap`` for
  ``lax.scan``) are layer axes.

  Args:
    num_heads: the module's ``num_heads``.

  Returns:
    The layout, with paths relative to the ``MultiheadAttention`` module.
  """
  return torch_layout(num_heads, query="query_proj", key="key_proj", name="equinox_mha")


def equinox_layouts(model: Any) -> dict[str, QKLayout]:
  """Layouts for every ``eqx.nn.MultiheadAttention`` in ``model``, for ``layouts=``.

  Args:
    model: an Equinox module (or any pytree holding them).

  Returns:
    ``{module path: QKLayout}`` (exact paths, as :func:`muonclip_jax.qk_clip`
    names the model's parameters), each from the module's ``num_heads``.

  Raises:
    ValueError: the model has no ``MultiheadAttention``.
  """
  mods = _attention_modules(model)
  if not mods:
    raise ValueError("equinox_layouts: the model has no equinox.nn.MultiheadAttention; "
                     "describe other attention code with muonclip_jax.QKLayout")
  return {"/".join(p): equinox_layout(m.num_heads) for p, m in mods}


def _reduce(stat: Array, lead: tuple[int, ...], heads: int, where: str) -> Array:
  stat = jnp.asarray(stat, jnp.float32)
  want = lead + (heads,)
  n = len(want)
  if stat.ndim < n or tuple(stat.shape[stat.ndim - n:]) != want:
    raise ValueError(
        f"equinox_max_logits: statistics for {where!r} have shape {tuple(stat.shape)}; "
        f"expected (batch..., {', '.join(map(str, want))}) (batch axes first, then the "
        f"layer axes {lead} of the stacked module, then heads)")
  if stat.ndim > n:
    stat = jnp.max(stat, axis=tuple(range(stat.ndim - n)))
  return stat


def equinox_max_logits(model: Any, stats: Array | Sequence[Array] | Mapping[str, Array]
                       ) -> dict[str, Any]:
  """The statistics tree :func:`muonclip_jax.qk_clip` reads, from what an Equinox model returned.

  ``stats`` comes from :func:`equinox_attention` through the model's return
  values. Leading batch axes (``jax.vmap`` over examples, micro-batches) are
  max-reduced; the trailing axes must be the module's stacked layer axes, then
  heads.

  Args:
    model: the model whose ``MultiheadAttention`` modules produced ``stats``.
    stats: one array when the model has one ``MultiheadAttention`` (stacked
      or not): ``(batch..., [layers,] heads)``; a sequence with one array per
      module, in the model's tree order; or ``{module path: array}``.

  Returns:
    ``{module path components...: {"max_logits": [layers...,] heads}}``, a
    nested dict for ``update(..., max_logits=...)``.

  Raises:
    ValueError: a count, path or shape that does not match the model's
      attention modules (naming the module and the expected shape).
  """
  mods = _attention_modules(model)
  if not mods:
    raise ValueError("equinox_max_logits: the model has no equinox.nn.MultiheadAttention")
  names = ["/".join(p) for p, _ in mods]
  if isinstance(stats, Mapping):
    unknown = sorted(set(stats) - set(names))
    missing = sorted(set(names) - set(stats))
    if unknown or missing:
      raise ValueError(f"equinox_max_logits: statistics keyed {sorted(stats)}; the model's "
                       f"attention modules are {names} (unknown: {unknown}, missing: "
                       f"{missing})")
    values = [stats[n] for n in names]
  elif isinstance(stats, (list, tuple)):
    if len(stats) != len(mods):
      raise ValueError(f"equinox_max_logits: {len(stats)} statistics for "
                       f"{len(mods)} attention modules {names}; pass one per module, in "
                       f"this order")
    values = list(stats)
  else:
    if len(mods) != 1:
      raise ValueError(f"equinox_max_logits: one array for {len(mods)} attention "
                       f"modules {names}; pass a list (one per module, in this order) or "
                       f"{{path: array}}")
    values = [stats]
  tree: dict[str, Any] = {}
  for (path, mha), name, value in zip(mods, names, values, strict=True):
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[MAX_LOGITS] = _reduce(value, _lead(mha), mha.num_heads, show_path(path) or name)
  return tree
