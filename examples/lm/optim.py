"""The optimisers (AdamW, Muon, MuonClip), their schedule, and what QK-Clip did in a run."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from jax.sharding import Mesh

import muonclip_jax

OPTIMIZERS = ("muonclip", "muon", "adamw")

@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser settings.

  Attributes:
    name: ``"muonclip"``, ``"muon"`` or ``"adamw"``.
    lr: peak learning rate (Muon branch; the AdamW optimiser for ``adamw``).
    adam_lr: peak learning rate of the AdamW branch of Muon/MuonClip
      (``None``: ``lr``, as in Moonlight, thanks to the 0.2 RMS match).
    tau: QK-Clip threshold (``muonclip`` only).
    weight_decay: decoupled weight decay for every parameter.
    warmup: linear warm-up steps (0: none).
    schedule: ``"cosine"`` (decay to ``final_lr_frac`` of the peak at
      ``total_steps``) or ``"constant"`` after warm-up.
    total_steps: steps of the run (cosine horizon).
    final_lr_frac: end of the cosine schedule, as a fraction of the peak.
  """

  name: str = "muonclip"
  lr: float = 0.01
  adam_lr: float | None = None
  tau: float = 100.0
  weight_decay: float = 0.1
  warmup: int = 20
  schedule: str = "cosine"
  total_steps: int = 300
  final_lr_frac: float = 0.1


def lr_schedule(peak: float, cfg: OptimConfig) -> optax.Schedule:
  """Linear warm-up to ``peak``, then cosine decay or constant (see :class:`OptimConfig`).

  ``cfg.warmup == 0`` starts at ``peak`` (no step at learning rate 0).
  """
  warmup = min(cfg.warmup, cfg.total_steps)
  if cfg.schedule == "constant":
    return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  if cfg.schedule == "cosine":
    if not warmup:
      return optax.cosine_decay_schedule(peak, max(cfg.total_steps, 1), cfg.final_lr_frac)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(cfg.total_steps, warmup + 1), peak * cfg.final_lr_frac)
  raise ValueError(f"schedule: expected 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg: OptimConfig, mesh: Mesh | None = None) -> optax.GradientTransformation:
  """The optimiser named by ``cfg.name``.

  * ``adamw``: ``optax.adamw`` (b1 0.9, b2 0.95), the same AdamW that Muon uses
    for its non-matrix parameters.
  * ``muon``: :func:`muonclip_jax.muon` (Muon on hidden matrices, AdamW on the
    embedding, LM head and norms).
  * ``muonclip``: :func:`muonclip_jax.muonclip`.

  All three take ``update(..., max_logits=stats)`` (Muon and AdamW ignore it),
  so one train step serves them all.

  ``mesh`` makes Muon's Newton–Schulz device-local (``muon(..., mesh=mesh)``).
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {cfg.name!r}")
  lr = lr_schedule(cfg.lr, cfg)
  adam_lr = lr if cfg.adam_lr is None else lr_schedule(cfg.adam_lr, cfg)
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=cfg.weight_decay)
  kwargs: dict[str, Any] = dict(weight_decay=cfg.weight_decay, adam_learning_rate=adam_lr)
  if mesh is not None:
    kwargs["mesh"] = mesh
  if cfg.name == "muon":
    return muonclip_jax.muon(lr, **kwargs)
  return muonclip_jax.muonclip(lr, tau=cfg.tau, **kwargs)


def clip_telemetry(opt_state: Any) -> dict[str, int]:
  """QK-Clip's counters from a MuonClip optimiser state (``{}`` for other optimisers).

  ``num_clipped``: heads clipped at the last step; ``clipped_total``: summed
  over all steps (from :func:`muonclip_jax.qk_clip_metrics`).
  """
  try:
    m = muonclip_jax.qk_clip_metrics(opt_state)
  except ValueError:  # no QK-Clip in this optimiser
    return {}
  return {"num_clipped": int(m["qk_clip/heads_clipped"]),
          "clipped_total": int(m["qk_clip/heads_clipped_total"])}


def qk_clip_report(optimizer: str, tau: float, max_logit: float | None,
                   clipped_total: int | None, *, diverged_at: int | None = None,
                   lr: float | None = None, plot: str | None = None) -> str:
  """One line on what QK-Clip did in this run, and how to see it act.

  A run that diverged (non-finite loss or logit) says so instead: its max
  logit means nothing, and "stayed below tau" would be false comfort.
  """
  if diverged_at is not None:
    at = f" (--lr {lr:g})" if lr is not None else ""
    return (f"Diverged: the loss or a max logit became non-finite (NaN/inf) at step "
            f"{diverged_at}; training stopped there and nothing was saved after it. "
            f"Lower the learning rate{at} or raise --warmup.")
  if max_logit is None:
    return "QK-Clip: no steps run."
  if clipped_total is None:
    return (f"QK-Clip: off ({optimizer}); the largest attention logit reached "
            f"{max_logit:.1f}. Run --optimizer muonclip to bound it.")
  if clipped_total == 0:
    hint = max(max_logit / 2, 1.0)
    return (f"QK-Clip: max logit {max_logit:.1f} stayed below tau = {tau:g}, no head "
            f"clipped. To see clipping, lower tau below it (e.g. --tau {hint:.0f}).")
  see = f"; see {plot}" if plot else ""
  return (f"QK-Clip: {clipped_total} head-steps clipped to tau = {tau:g} (largest logit "
          f"before clipping {max_logit:.1f}){see}.")
