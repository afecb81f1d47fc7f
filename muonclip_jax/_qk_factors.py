"""The clip arithmetic: per-head factors ``gamma`` turned into per-entry multipliers.

Given a resolved attention layer (:class:`~muonclip_jax._qk_layouts.Layer`) and
the per-head factors ``gamma_h = min(1, tau / S_max^h)``, :func:`slot_factors`
applies the sharing rules of :mod:`muonclip_jax._qk_layouts` (paper's
``sqrt(gamma)`` split, GQA ``"query"``/``"group"``/``"split"``, QK-norm
gains, MLA's ``query_rope``) to give one factor per head slot of each target
parameter, and :func:`factor_array` broadcasts those onto the parameter's
entries. The layout vocabulary says *where* heads are; this module says *how
much* each entry is scaled.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from muonclip_jax._qk_layouts import GQASharing, Layer, Target

__all__ = ["factor_array", "group_min", "slot_factors"]


def group_min(gamma: jax.Array, slots: int) -> jax.Array:
  """``min`` of ``gamma`` (``[..., H]``) over ``slots`` contiguous equal groups."""
  h = gamma.shape[-1]
  if slots == h:
    return gamma
  return jnp.min(gamma.reshape(gamma.shape[:-1] + (slots, h // slots)), axis=-1)


def slot_factors(layer: Layer, gamma: jax.Array, gqa_sharing: GQASharing,
                 gqa_alpha: float) -> list[jax.Array]:
  """Per-target head-slot factors ``[lead..., slots]`` from per-head ``gamma``."""
  q_targets = [t for t in layer.targets if t.spec.role != "key"]
  k_targets = [t for t in layer.targets if t.spec.role == "key"]
  n_k = k_targets[0].slots if k_targets else None
  n_q = max((t.slots for t in layer.targets if t.spec.role == "query"), default=None)
  gamma_eff = gamma
  if not k_targets:
    e_q, e_k = 1.0, 0.0
  elif not q_targets:
    e_q, e_k = 0.0, 1.0
  elif n_q is not None and n_k < n_q:
    if gqa_sharing == "query":
      e_q, e_k = 1.0, 0.0
    elif gqa_sharing == "split":
      e_q, e_k = 0.5, 0.5
    else:  # group
      g = group_min(gamma, n_k)
      gamma_eff = jnp.repeat(g, layer.num_heads // n_k, axis=-1)
      e_q, e_k = gqa_alpha, 1.0 - gqa_alpha
  else:
    e_q, e_k = 0.5, 0.5
  out = []
  for t in layer.targets:
    if t.spec.role == "key":
      out.append(jnp.power(group_min(gamma, t.slots), e_k))
    elif t.spec.role == "query_rope":
      out.append(group_min(gamma_eff, t.slots))
    else:
      out.append(jnp.power(group_min(gamma_eff, t.slots), e_q))
  return out


def factor_array(target: Target, factors: jax.Array) -> jax.Array:
  """Expands head-slot ``factors`` (``[lead..., slots]``) to the parameter's shape.

  Entries outside the target's selection get factor 1.
  """
  lead, view = target.lead, target.view
  ranges, head_axes = target.ranges, target.head_axes
  f = factors.astype(jnp.float32)
  if head_axes:
    extents = tuple(ranges[a][1] - ranges[a][0] for a in head_axes)
    per_slot = math.prod(extents) // target.slots
    f = jnp.repeat(f, per_slot, axis=-1) if per_slot > 1 else f
    f = f.reshape(lead + extents)
    pads = [(0, 0)] * len(lead) + [(ranges[a][0], view[a] - ranges[a][1]) for a in head_axes]
    f = jnp.pad(f, pads, constant_values=1.0)
  bshape = lead + tuple(view[a] if a in head_axes else 1 for a in range(len(view)))
  f = f.reshape(bshape)
  other = [a for a in range(len(view)) if a not in head_axes and ranges[a] != (0, view[a])]
  if other:
    sel = None
    for a in other:
      idx = jnp.arange(view[a])
      ok = (idx >= ranges[a][0]) & (idx < ranges[a][1])
      ok = ok.reshape(tuple(view[a] if b == a else 1 for b in range(len(view))))
      sel = ok if sel is None else sel & ok
    f = jnp.where(sel, f, 1.0)
  f = jnp.broadcast_to(f, lead + view)
  if target.layer_axis is None:
    return f.reshape(target.shape)
  a = target.layer_axis
  f = f.reshape(lead + target.shape[:a] + target.shape[a + 1:])
  return jnp.moveaxis(f, 0, a)
