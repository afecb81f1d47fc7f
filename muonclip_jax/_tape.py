"""QK-Clip statistics from hand-written JAX attention: one line in the model.

A model written as plain functions over a dict of arrays (PyTorch-style
``q_proj``/``k_proj``/``v_proj``/``o_proj``) has no module system to sow
into. :func:`max_logits_tape` opens a tape for one forward pass;
:func:`record_max_logits`, the one line added to the attention function,
reduces that call's logits to per-head maxima (Kimi K2, arXiv 2507.20534,
§2.1: over the batch and positions, after the mask, before any soft-cap) and
files them under the attention's parameter path, which it finds by the
*identity* of the parameter arrays it is given (the very arrays, or tracers,
that were passed to the tape). ``tape.max_logits`` is then the statistics tree
:func:`muonclip_jax.qk_clip` reads.

The tape lives in one trace: open it inside the function that ``jax.jit`` /
``jax.grad`` trace (the loss function), around the forward pass. Attention
called inside an inner ``lax.scan`` or ``jax.vmap`` of the model gets sliced or
batched parameters the tape does not know: :func:`record_max_logits` raises
there (return the statistic from the scan instead, as for Equinox).

Usage::

  def attention(p, x, mask):                      # p = params['layers'][i]['attn']
    ...
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d)
    mc.record_max_logits(p, logits, mask=mask)     # the one model line
    ...

  def loss_fn(params, tokens):
    with mc.max_logits_tape(params) as tape:
      logits = forward(params, tokens)
    return loss(logits, tokens), tape.max_logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from muonclip_jax._attention import head_max_logits
from muonclip_jax._paths import leaves_with_paths, show_path
from muonclip_jax._statistic import MAX_LOGITS

Array = jax.Array
_TAPES: list[MaxLogitsTape] = []


class MaxLogitsTape:
  """Per-head statistics recorded during one forward pass, keyed by attention module path."""

  def __init__(self, params: Any) -> None:
    leaves, _ = leaves_with_paths(params)
    self._paths = {id(x): p for p, x in leaves}
    self._stats: dict[tuple[str, ...], Array] = {}

  def _module_of(self, params: Any) -> tuple[str, ...]:
    leaves = [x for _, x in leaves_with_paths(params)[0]]
    paths = [self._paths.get(id(x)) for x in leaves]
    if not leaves or any(p is None for p in paths):
      raise ValueError(
          "record_max_logits: the parameters given are not (all) leaves of the tree passed "
          "to max_logits_tape(params). Pass the attention's own parameter subtree (e.g. "
          "params['layers'][i]['attn']) unchanged; inside lax.scan/jax.vmap over layers the "
          "parameters are slices the tape cannot name: return the statistic instead.")
    prefix = paths[0]
    for p in paths[1:]:
      n = 0
      while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
        n += 1
      prefix = prefix[:n]
    if len(paths) == 1:
      prefix = prefix[:-2]  # a single kernel: module/<proj>/<weight>
    return prefix

  def record(self, params: Any, max_logits: Array) -> None:
    module = self._module_of(params)
    if module in self._stats:
      max_logits = jnp.maximum(self._stats[module], max_logits)
    self._stats[module] = max_logits

  @property
  def max_logits(self) -> dict[str, Any]:
    """``{path components...: {'max_logits': (heads,)}}``, nested, for ``max_logits=``."""
    if not self._stats:
      raise ValueError("max_logits_tape: nothing was recorded; call "
                       "muonclip_jax.record_max_logits(params, logits) in the attention")
    tree: dict[str, Any] = {}
    for module, s in self._stats.items():
      node = tree
      for part in module:
        node = node.setdefault(part, {})
      node[MAX_LOGITS] = s
    return tree

  def __repr__(self) -> str:
    return f"MaxLogitsTape({[show_path(m) for m in self._stats]})"


@contextlib.contextmanager
def max_logits_tape(params: Any) -> Iterator[MaxLogitsTape]:
  """Opens a tape for :func:`record_max_logits` calls during one forward pass.

  Args:
    params: the parameter tree the forward pass is called with (inside the
      traced loss function: the traced parameters).

  Yields:
    The :class:`MaxLogitsTape`; read ``tape.max_logits`` after the pass.
  """
  tape = MaxLogitsTape(params)
  _TAPES.append(tape)
  try:
    yield tape
  finally:
    _TAPES.remove(tape)


def record_max_logits(params: Any, logits: Array, *, mask: Array | None = None,
                      head_axis: int = -3) -> Array:
  """Records the per-head max of ``logits`` for the attention that owns ``params``.

  Args:
    params: the attention's parameter subtree (or its query kernel), exactly
      as taken from the tree given to :func:`max_logits_tape`.
    logits: pre-softmax logits after the ``1/sqrt(d)`` scale, before any
      soft-cap, e.g. ``[batch, heads, q_len, kv_len]``.
    mask: booleans broadcastable to ``logits`` (``False``: excluded).
    head_axis: the heads axis of ``logits``.

  Returns:
    The ``(heads,)`` statistic (also when no tape is open, which records nothing:
    evaluation and inference passes).

  Raises:
    ValueError: ``params`` are not leaves of the tape's tree (see the module doc).
  """
  s = head_max_logits(logits, mask=mask, head_axis=head_axis)
  if _TAPES:
    _TAPES[-1].record(params, s)
  return s
