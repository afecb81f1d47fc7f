"""Scaling the orthogonalised update by the matrix's shape.

An orthogonal ``A x B`` matrix has RMS ``1/sqrt(max(A, B))``. Two conventions:

* ``"rms"`` (Moonlight, arXiv 2502.16982; Kimi K2): multiply by
  ``rms_scale * sqrt(max(fan_in, fan_out))`` so the update's RMS matches
  AdamW's (``rms_scale = 0.2``); AdamW's learning rate and weight decay carry
  over.
* ``"keller"`` (Jordan's Muon): multiply by ``sqrt(max(1, fan_out / fan_in))``.
* ``None`` / ``"none"``: no scaling.
"""

from __future__ import annotations

import math

import jax

SHAPE_SCALINGS = ("rms", "keller", "none", None)


def check_shape_scaling(shape_scaling: str | None) -> str:
  if shape_scaling not in SHAPE_SCALINGS:
    raise ValueError(f"shape_scaling: expected 'rms', 'keller' or None, got {shape_scaling!r}")
  return "none" if shape_scaling is None else shape_scaling


def shape_scale(fan_in: int, fan_out: int, shape_scaling: str,
                rms_scale: jax.typing.ArrayLike = 0.2) -> jax.typing.ArrayLike:
  """The factor for a ``fan_in x fan_out`` matrix (a Python float, or an array
  when ``rms_scale`` is one, as under ``optax.inject_hyperparams``)."""
  if shape_scaling == "rms":
    return rms_scale * math.sqrt(max(fan_in, fan_out))
  if shape_scaling == "keller":
    return math.sqrt(max(1.0, fan_out / fan_in))
  return 1.0
