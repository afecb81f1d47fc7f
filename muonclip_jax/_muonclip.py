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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from muonclip_jax._coefficients import CoeffsLike
from muonclip_jax._dimensions import DimensionNumbersLike
from muonclip_jax._layer_axis import LayerAxisLike
from muonclip_jax._muon import muon
from muonclip_jax._newton_schulz import NewtonSchulz
from muonclip_jax._qk_clip import LayoutsLike, Schedule, qk_clip
from muonclip_jax._qk_layouts import GQASharing


def muonclip(
    learning_rate: optax.ScalarOrSchedule,
    *,
    tau: jax.typing.ArrayLike = 100.0,
    weight_decay: jax.typing.ArrayLike = 0.1,
    layouts: LayoutsLike = None,
    gqa_sharing: GQASharing = "query",
    gqa_alpha: float = 0.5,
    auto_detect: bool = True,
    strict: bool = True,
    every_k_schedule: Schedule | None = None,
    allow_no_attention: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    nesterov: bool = True,
    newton_schulz: NewtonSchulz | None = None,
    coeffs: CoeffsLike = "keller",
    steps: int | None = None,
    ns_dtype: jax.typing.DTypeLike | None = None,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    eps: float = 1e-7,
    shape_scaling: str | None = "rms",
    rms_scale: jax.typing.ArrayLike = 0.2,
    mu_dtype: jax.typing.DTypeLike | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.95,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    param_labels: Any | Callable[[optax.Params], Any] | None = None,
    dimension_numbers: DimensionNumbersLike = None,
    layer_axis: LayerAxisLike = None,
    per_head: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MuonClip (Kimi K2, arXiv 2507.20534): ``chain(muon(...), qk_clip(...))``.

  ``update(grads, state, params, max_logits=stats)`` needs the statistics
  sown by the attention layers in this step's forward pass (see
  :func:`muonclip_jax.dot_product_attention` and :func:`muonclip_jax.qk_clip`)::

    tx = muonclip(3e-4, tau=100.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads, max_logits=stats)

  Every argument is a keyword of its own, so ``optax.inject_hyperparams``
  can schedule any numeric one (``learning_rate``, ``tau``,
  ``weight_decay``, ...).

  Args:
    learning_rate: learning rate or schedule (both Muon and AdamW branches
      unless ``adam_learning_rate`` is given).
    tau: the QK-Clip logit bound (K2: 100).
    weight_decay: decoupled weight decay for both branches (K2: 0.1).
    layouts: where attention layers keep their query/key weights (see
      :func:`muonclip_jax.qk_clip`).
    gqa_sharing: how a shared key head is clipped (see :func:`muonclip_jax.qk_clip`).
    gqa_alpha: the query/key split of the factor (see :func:`muonclip_jax.qk_clip`).
    auto_detect: find Flax attention modules without ``layouts``.
    strict: raise on statistics that match no attention parameters.
    every_k_schedule: gradient accumulation: wrap Muon in
      ``optax.MultiSteps(muon, every_k_schedule)`` and clip once per emitted
      update with the max of the micro-batches' statistics (never their sum).
    allow_no_attention: accept a model with no attention layer (QK-Clip then
      does nothing; see :func:`muonclip_jax.qk_clip`).
    weight_decay_mask: see :func:`muonclip_jax.muon`.
    beta: Muon's momentum coefficient (see :func:`muonclip_jax.scale_by_muon`).
    nesterov: Nesterov momentum (see :func:`muonclip_jax.scale_by_muon`).
    newton_schulz: the Newton–Schulz options in one object (see
      :func:`muonclip_jax.scale_by_muon`).
    coeffs: Newton–Schulz preset or coefficients.
    steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: Newton–Schulz compute dtype.
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    restarts: Gram-path restarts.
    eps: added to the Frobenius norm.
    shape_scaling: ``"rms"``, ``"keller"`` or ``None``.
    rms_scale: target update RMS for ``"rms"``.
    mu_dtype: dtype of the momentum buffers.
    adam_learning_rate: the AdamW branch's learning rate (default: ``learning_rate``).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps: AdamW's epsilon.
    param_labels: routing override (see :func:`muonclip_jax.muon`).
    dimension_numbers: fan-in/fan-out axes per leaf (see :func:`muonclip_jax.scale_by_muon`).
    layer_axis: the layer axis of scanned stacks, for Muon's routing (see
      :func:`muonclip_jax.scale_by_muon`; MaxText: ``config.param_scan_axis``).
    per_head: per-head orthogonalisation of attention kernels (see
      :func:`muonclip_jax.scale_by_muon`).
    mesh: device-local Newton–Schulz on this mesh (see :func:`muonclip_jax.scale_by_muon`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: the errors of :func:`muonclip_jax.muon` and
      :func:`muonclip_jax.qk_clip` (naming the parameter path).

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (Algorithm 1, §2.1).

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  inner: optax.GradientTransformation = muon(
      learning_rate, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask, beta=beta,
      nesterov=nesterov, newton_schulz=newton_schulz, coeffs=coeffs, steps=steps,
      ns_dtype=ns_dtype, method=method, restarts=restarts, eps=eps,
      shape_scaling=shape_scaling, rms_scale=rms_scale,
      mu_dtype=mu_dtype, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1,
      adam_b2=adam_b2, adam_eps=adam_eps, param_labels=param_labels,
      dimension_numbers=dimension_numbers, layer_axis=layer_axis, per_head=per_head, mesh=mesh)
  if every_k_schedule is not None:
    inner = optax.MultiSteps(inner, every_k_schedule).gradient_transformation()
  return optax.chain(
      inner,
      qk_clip(tau, layouts=layouts, gqa_sharing=gqa_sharing, gqa_alpha=gqa_alpha,
              auto_detect=auto_detect, strict=strict, every_k_schedule=every_k_schedule,
              allow_no_attention=allow_no_attention),
  )
