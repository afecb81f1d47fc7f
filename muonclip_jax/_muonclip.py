"""MuonClip: Muon followed by QK-Clip, the Kimi K2 recipe in one call.

Kimi K2 (arXiv 2507.20534, Algorithm 1): every step, Muon with decoupled
weight decay for hidden matrices (AdamW for embeddings, the LM head, norms and
biases; Moonlight, arXiv 2502.16982), then, on the updated weights, QK-Clip for
every attention head whose max logit ``S_max^h`` exceeded ``tau``:

.. math::
  W_t = W_{t-1} - \\eta (O_t + \\lambda W_{t-1}), \\qquad
  W_{q,k}^h \\leftarrow \\sqrt{\\gamma_h}\\, W_{q,k}^h, \\quad
  \\gamma_h = \\tau / S_{\\max}^h \\text{ if } S_{\\max}^h > \\tau.
"""

from __future__ import annotations

from typing import Any

import optax

from muonclip_jax._muon import muon
from muonclip_jax._qk_clip import LayoutsLike, Schedule, qk_clip
from muonclip_jax._qk_layouts import GQASharing


def muonclip(
    learning_rate: optax.ScalarOrSchedule,
    *,
    tau: float = 100.0,
    weight_decay: float = 0.1,
    layouts: LayoutsLike = None,
    gqa_sharing: GQASharing = "query",
    gqa_alpha: float = 0.5,
    auto_detect: bool = True,
    strict: bool = True,
    every_k_schedule: Schedule | None = None,
    **muon_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """MuonClip (Kimi K2, arXiv 2507.20534): ``chain(muon(...), qk_clip(...))``.

  ``update(grads, state, params, max_logits=stats)`` needs the statistics
  sown by the attention layers in this step's forward pass (see
  :func:`muonclip_jax.dot_product_attention` and :func:`muonclip_jax.qk_clip`)::

    tx = muonclip(3e-4, tau=100.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads, max_logits=stats)

  Args:
    learning_rate: learning rate or schedule (both Muon and AdamW branches
      unless ``adam_learning_rate`` is given in ``muon_kwargs``).
    tau: the QK-Clip logit bound (K2: 100).
    weight_decay: decoupled weight decay for both branches (K2: 0.1).
    layouts, gqa_sharing, gqa_alpha, auto_detect, strict: see
      :func:`muonclip_jax.qk_clip`.
    every_k_schedule: gradient accumulation: wrap Muon in
      ``optax.MultiSteps(muon, every_k_schedule)`` and clip once per emitted
      update with the max of the micro-batches' statistics (never their sum).
    **muon_kwargs: passed to :func:`muonclip_jax.muon` (``beta``, ``coeffs``,
      ``ns_dtype``, ``adam_learning_rate``, ``param_labels``, ``mesh``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  inner: optax.GradientTransformation = muon(learning_rate, weight_decay=weight_decay,
                                             **muon_kwargs)
  if every_k_schedule is not None:
    inner = optax.MultiSteps(inner, every_k_schedule).gradient_transformation()
  return optax.chain(
      inner,
      qk_clip(tau, layouts=layouts, gqa_sharing=gqa_sharing, gqa_alpha=gqa_alpha,
              auto_detect=auto_detect, strict=strict, every_k_schedule=every_k_schedule),
  )
