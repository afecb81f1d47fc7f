"""Finding the attention layers of a parameter tree, and the errors when there are none.

:func:`find_attention_layers` matches the user's layouts (one
:class:`~muonclip_jax._qk_layouts.QKLayout`, or ``{fnmatch pattern:
QKLayout}``) and Flax's own attention modules against the parameter paths,
and resolves each match to a :class:`~muonclip_jax._qk_layouts.Layer`.
:func:`qk_norm_bypassed` finds layouts a QK-norm would silently cancel. The
error builders here say what was found, what was expected, and how to fix it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from muonclip_jax._paths import leaves_with_paths, show_path
from muonclip_jax._qk_layouts import (
  Layer,
  Path,
  QKLayout,
  detect_flax_attention,
  join,
  resolve_layout,
)

__all__ = [
  "LAYOUT_HINT",
  "PRODUCER_HINT",
  "LayoutsLike",
  "empty_stats_error",
  "find_attention_layers",
  "layout_items",
  "no_layers_error",
  "no_params_error",
  "qk_norm_bypassed",
]

LayoutsLike = QKLayout | Mapping[str, QKLayout] | None

# How each kind of model produces the statistic: every "no statistics" error ends with it.
PRODUCER_HINT = (
    "How to produce them, by framework: Flax linen: attention_fn=muonclip_jax."
    "dot_product_attention called with sow_weights=True (or MaxLogitMultiHeadDotProduct"
    "Attention), model.apply(..., mutable=['intermediates']), pass the returned "
    "'intermediates'; Flax NNX: the same attention_fn (or MaxLogitMultiHeadAttention), "
    "then nnx.capture(model, nnx.Intermediate)(x) -- a model that assigns an "
    "nnx.Intermediate attribute instead of calling sow (MaxText's record_max_logits) "
    "gives {} to nnx.capture: call the model, then stats = nnx.pop(model, "
    "nnx.Intermediate); hand-written attention in any framework (Equinox, PyTorch-style, "
    "plain JAX): compute muonclip_jax.head_max_logits(logits, mask=mask) in the forward "
    "pass, return it, and pass {'path/to/attention': {'max_logits': value}}, the path "
    "being the module that holds the query/key parameters (or a parameter-less child of "
    "it).")

LAYOUT_HINT = (
    "QK-Clip detects only Flax's own attention modules (query/key/value/out with 3-D "
    "kernels); say where any other model keeps its query/key weights with layouts=: "
    "separate_qk (separate projections; PyTorch/Equinox (out, in) weights: "
    "weight_layout='out_in'), fused_qkv, mla, qk_norm, e.g. layouts={'*/attn': "
    "muonclip_jax.separate_qk('q_proj', 'k_proj', num_heads=8, merged_heads=True)}.")


def layout_items(layouts: LayoutsLike) -> list[tuple[str, QKLayout]]:
  """``layouts`` as ``(fnmatch pattern, QKLayout)`` pairs, checked: the one normalisation.

  Raises:
    TypeError: ``layouts`` is not a :class:`QKLayout`, a mapping of patterns to
      them, or ``None``.
  """
  if layouts is None:
    return []
  if isinstance(layouts, QKLayout):
    return [("*", layouts)]
  if isinstance(layouts, Mapping):
    items = list(layouts.items())
    for pattern, layout in items:
      if not isinstance(layout, QKLayout):
        raise TypeError(f"qk_clip: layouts[{pattern!r}]: expected a QKLayout, got "
                        f"{type(layout).__name__}")
    return items
  raise TypeError(f"qk_clip: layouts: expected a QKLayout, a mapping of patterns to "
                  f"QKLayouts, or None, got {type(layouts).__name__}")


def _module_paths(shapes: Mapping[Path, tuple[int, ...]]) -> list[Path]:
  mods = {p[:i] for p in shapes for i in range(len(p))}
  return sorted(mods, key=lambda m: (len(m), m))


def _required(layout: QKLayout, module: Path) -> list[Path] | None:
  try:
    return [join(module, s.path) for s in layout.params if not s.optional]
  except ValueError:
    return None


def find_attention_layers(shapes: Mapping[Path, tuple[int, ...]], layouts: LayoutsLike,
                          auto_detect: bool = True) -> dict[Path, Layer]:
  """Attention layers (module path -> resolved layout) in a parameter tree.

  ``layouts``: one :class:`QKLayout` (used at every module that has all of
  its required parameters) or ``{pattern: QKLayout}`` with ``fnmatch``
  patterns over ``'/'``-joined module paths (first match wins). Flax attention
  modules not claimed by a layout are detected when ``auto_detect``. A layout
  that matches no module raises ``ValueError``.
  """
  modules = _module_paths(shapes)
  items = layout_items(layouts)
  layers: dict[Path, Layer] = {}
  for pattern, layout in items:
    found = 0
    for m in modules:
      if m in layers or not fnmatch.fnmatchcase("/".join(m), pattern):
        continue
      req = _required(layout, m)
      if req is None or not all(r in shapes for r in req):
        continue
      layers[m] = resolve_layout(layout, m, shapes)
      found += 1
    if not found:
      needs = [s.path for s in layout.params if not s.optional]
      raise ValueError(f"qk_clip: layout {layout.name!r} for pattern {pattern!r} matches "
                       f"nothing: no module path matching {pattern!r} has the parameters "
                       f"{needs}")
  if auto_detect:
    for m in modules:
      if m in layers:
        continue
      layout = detect_flax_attention(m, shapes)
      if layout is not None:
        layers[m] = resolve_layout(layout, m, shapes)
  return layers


def no_layers_error(shapes: Mapping[Path, tuple[int, ...]], layouts: LayoutsLike,
                     auto_detect: bool) -> ValueError:
  paths = sorted(show_path(p) for p in shapes)
  some = ", ".join(repr(p) for p in paths[:6]) + (", ..." if len(paths) > 6 else "")
  given = ("no layouts given" if layouts is None else "the layouts given matched nothing")
  return ValueError(
      f"qk_clip: no attention layer found in the parameters ({len(paths)} leaves: "
      f"{some or 'none'}; {given}; auto_detect={auto_detect}). QK-Clip would do nothing. "
      f"{LAYOUT_HINT} If the model has no attention, use muonclip_jax.muon instead of "
      f"muonclip, or pass allow_no_attention=True.")


def empty_stats_error(max_logits: Any, layers: Mapping[Path, Layer]) -> ValueError:
  leaves, _ = leaves_with_paths(max_logits)
  seen = ", ".join(repr(show_path(p)) for p, _ in leaves[:6]) + (
      ", ..." if len(leaves) > 6 else "")
  what = (f"a {type(max_logits).__name__} with no leaf" if not leaves else
          f"leaves {seen}, none under a 'max_logits' key")
  known = ", ".join(repr(show_path(m)) for m in layers)
  return ValueError(
      f"qk_clip: the statistics passed as max_logits= hold no 'max_logits' entry ({what}); "
      f"the attention layers {known} would go unclipped. {PRODUCER_HINT}")


_QK_NORM_NAME = re.compile(r"^_*(q|query|k|key)_?(norm|ln|layernorm|rmsnorm|layer_norm)$")


def qk_norm_bypassed(layers: Mapping[Path, Layer],
                     shapes: Mapping[Path, tuple[int, ...]]) -> dict[str, list[str]]:
  """Layers whose layout scales projections while a QK-norm sits beside them.

  A norm of ``q``/``k`` after the projection cancels any scaling of ``W_q``,
  ``W_k``: such a clip would count heads as clipped and change no logit. Found
  by name (children called ``q_norm``, ``_query_norm``, ``key_ln``, ... holding
  parameters that the layout leaves alone); MLA layouts are exempt (DeepSeek's
  ``q_norm``/``kv_norm`` act on the latents, before the clipped up-projections).
  """
  out: dict[str, list[str]] = {}
  for m, layer in layers.items():
    if any(t.spec.role == "query_rope" for t in layer.targets):
      continue
    clipped = {t.param for t in layer.targets}
    norms = sorted({p[len(m)] for p in shapes
                    if len(p) > len(m) + 1 and p[:len(m)] == m
                    and _QK_NORM_NAME.match(p[len(m)].lower())})
    norms = [n for n in norms if not any(c[:len(m) + 1] == m + (n,) for c in clipped)]
    if norms:
      out[show_path(m)] = norms
  return out


def no_params_error(module: Path, layers: Mapping[Path, Layer], layouts: LayoutsLike,
                     shapes: Mapping[Path, tuple[int, ...]]) -> ValueError:
  hint = ""
  for pattern, layout in layout_items(layouts):
    if fnmatch.fnmatchcase("/".join(module), pattern):
      req = _required(layout, module) or []
      missing = [show_path(r) for r in req if r not in shapes]
      hint = (f" Layout {layout.name!r} (pattern {pattern!r}) matches the path but the "
              f"parameters {missing} do not exist.")
      break
  known = ", ".join(repr(show_path(m)) for m in layers) or "none"
  return ValueError(
      f"qk_clip: statistics at {show_path(module)!r} have no matching attention "
      f"parameters (attention layers found: {known}).{hint} Sow max_logits in the module "
      f"that owns the query/key parameters (or a parameter-less child of it), or "
      f"describe the parameters with layouts=. {LAYOUT_HINT}")
