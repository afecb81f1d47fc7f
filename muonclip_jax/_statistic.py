"""The QK-Clip statistic: its name and its contract, shared by producers and consumers.

Producers (the attention side: :mod:`muonclip_jax._attention`,
:mod:`muonclip_jax._flash_attention`, or a user's own forward pass) sow or
return, for every attention layer, the per-query-head maximum pre-softmax
logit of the step,

.. math::
  S_{\\max}^h = \\max_{b,\\, i,\\, j} \\; \\frac{q_{b,i}^h \\cdot k_{b,j}^h}{\\sqrt{d}},

signed, after the ``1/sqrt(d)`` scale and the mask, before any soft-cap
(Kimi K2, arXiv 2507.20534, Algorithm 1). Consumers (the optimizer side:
:mod:`muonclip_jax._qk_clip` and :mod:`muonclip_jax._qk_clip_metrics`) read
it. Both import the name from here, so neither depends on the other.

The contract:

* the leaf is named :data:`MAX_LOGITS` (``"max_logits"``), one per attention
  layer, at the path of the module that owns the query/key parameters or of a
  parameter-less child of it (MaxText's ``attention_op``);
* it is float32, ``stop_gradient``-ed, and max-reduced when the module runs
  more than once in a step;
* its shape is ``[layers..., batch..., heads]``: the scanned layer axes first
  (as a scan stacks them), then any batch axes (max-reduced by the consumer),
  then the query heads last (GQA/MQA: always per *query* head);
* a head whose every logit was masked carries ``-inf``, which QK-Clip skips.
"""

from __future__ import annotations

__all__ = ["MAX_LOGITS", "STATISTICS_CONTRACT"]

# The name under which attention modules sow the per-head statistic.
MAX_LOGITS = "max_logits"

# The shape contract, as quoted in error messages.
STATISTICS_CONTRACT = "[layers..., batch..., heads]"
