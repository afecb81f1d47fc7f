"""QK-Clip telemetry for loggers: a flat ``{name: scalar}`` dict from an optimizer state.

:class:`muonclip_jax.QKClipState` keeps, after every step, the statistics QK-Clip
acted on and its counters. :func:`qk_clip_metrics` finds that state anywhere in
an optimizer state (``optax.chain``, ``optax.partition``, ``inject_hyperparams``,
``MultiSteps``, ``apply_if_finite``, an ``nnx.Optimizer``'s ``opt_state``) and
flattens it into scalars that clu, TensorBoard or Weights & Biases writers take
as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from muonclip_jax._qk_clip import QKClipState

__all__ = ["qk_clip_metrics"]


def _array(x: Any) -> jax.Array:
  """The array inside an ``nnx.Variable`` (``nnx.Optimizer`` wraps its state), or ``x``."""
  return jnp.asarray(x.get_value() if hasattr(x, "get_value") else x)


def _max(x: jax.Array) -> jax.Array:
  """The max, leaving out NaN statistics (``-inf`` if there is nothing else)."""
  return jnp.max(jnp.where(jnp.isnan(x), -jnp.inf, x))


def qk_clip_metrics(opt_state: Any, *, prefix: str = "qk_clip") -> dict[str, jax.Array]:
  """QK-Clip's telemetry as a flat dict of scalars, for metric writers.

  Args:
    opt_state: an optimizer state holding one :class:`~muonclip_jax.QKClipState`
      (for instance the state of :func:`muonclip_jax.muonclip`, under any optax
      wrapper, or ``nnx.Optimizer(...).opt_state``).
    prefix: the first component of every name.

  Returns:
    ``{name: scalar array}``, all computed from the last clipping step:

    - ``{prefix}/max_logit``: the largest max logit over all layers and heads;
    - ``{prefix}/max_logit/{layer}``: per attention layer (``'/'``-joined
      module path), the largest over its heads;
    - ``{prefix}/heads_clipped`` and ``{prefix}/heads_clipped_total``: heads
      rescaled at the last step and since the start;
    - ``{prefix}/skipped`` and ``{prefix}/skipped_total``: non-finite or
      non-positive statistics left alone.

    NaN statistics (counted in ``skipped``) are left out of the maxima;
    before the first step the max logits are ``-inf``. The values are device
    arrays (replicated with several processes): ``float(v)`` reads one.

  Raises:
    ValueError: ``opt_state`` holds no ``QKClipState``, or more than one.

  Example:
    >>> import jax.numpy as jnp
    >>> import muonclip_jax as mc
    >>> params = {"attn": {n: {"kernel": jnp.ones((8, 2, 4))}
    ...                    for n in ("query", "key", "value")}}
    >>> params["attn"]["out"] = {"kernel": jnp.ones((2, 4, 8))}
    >>> tx = mc.muonclip(1e-3, tau=1.0)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params,
    ...                      max_logits={"attn": {"max_logits": (jnp.array([3.0, 0.5]),)}})
    >>> m = mc.qk_clip_metrics(state)
    >>> float(m["qk_clip/max_logit"]), int(m["qk_clip/heads_clipped"])
    (3.0, 1)
  """
  is_state = lambda x: isinstance(x, QKClipState)
  states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(states) != 1:
    raise ValueError(f"qk_clip_metrics: expected one QKClipState in opt_state, found "
                     f"{len(states)}; pass the state of muonclip or of a chain with qk_clip")
  (state,) = states
  per_layer = {f"{prefix}/max_logit/{name}": _max(_array(v))
               for name, v in state.max_logits.items()}
  overall = (jnp.max(jnp.stack(list(per_layer.values()))) if per_layer
             else jnp.asarray(-jnp.inf, jnp.float32))
  return {
      f"{prefix}/max_logit": overall,
      **per_layer,
      f"{prefix}/heads_clipped": _array(state.num_clipped),
      f"{prefix}/heads_clipped_total": _array(state.clipped_total),
      f"{prefix}/skipped": _array(state.num_skipped),
      f"{prefix}/skipped_total": _array(state.skipped_total),
  }
