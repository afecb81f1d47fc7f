"""Newton–Schulz coefficient presets.

Every step of the quintic Newton–Schulz iteration is

.. math::
  X \\leftarrow a X + b (X X^\\top) X + c (X X^\\top)^2 X,

which maps each singular value ``s`` of ``X`` through ``p(s) = a s + b s^3 + c s^5``.
A preset fixes the per-step triples ``(a, b, c)``, how the input is normalised
before the first step, and (for AOL) a row rescaling inside the first step.

Presets:
  * ``"keller"`` – Jordan's single triple ``(3.4445, -4.7750, 2.0315)``, 5 steps
    (Muon, Moonlight and Kimi K2).
  * ``"polar_express"`` – Amsel et al., arXiv 2505.16932: an 8-step list with a
    1.01 safety factor on all but the last triple and normalisation by
    ``1.01 ||X||_F``; extra steps repeat the last triple. Default 5 steps.
  * ``"dion"`` – the 5-step "quintic" list of Ahn et al., arXiv 2504.05295.
  * ``"aol"`` – Turbo-Muon, Boissin et al., arXiv 2512.04632: rows rescaled by
    ``(sum_j |X X^T|_ij)^(-1/2)`` inside the first step (no Frobenius
    normalisation), then 4 steps.

At condition number <= 100 the output's singular values lie in
:data:`BANDS`: keller [0.65, 1.25], polar_express (5 steps) [0.85, 1.15],
dion [0.95, 1.18], aol [0.7, 1.12]. Polar Express with 8 steps is within 3% of
1 at condition number 1e3.

Or a user triple ``(a, b, c)`` (repeated) or a per-step list of triples
(extra steps repeat the last triple).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

Triple = tuple[float, float, float]
CoeffsLike = str | Sequence[float] | Sequence[Sequence[float]]

KELLER: Triple = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01

DION: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

AOL: tuple[Triple, ...] = (
    (4.0098, -7.0585, 2.4635),
    (3.4585, -5.5479, 2.5959),
    (2.7573, -3.2939, 1.4254),
    (2.7215, -3.0494, 1.3169),
)


def _with_safety(raw: Sequence[Triple], safety: float) -> tuple[Triple, ...]:
  """Polar Express safety factor: (a/f, b/f^3, c/f^5) on all but the last."""
  out = [(a / safety, b / safety**3, c / safety**5) for a, b, c in raw[:-1]]
  return tuple(out) + (tuple(raw[-1]),)


POLAR_EXPRESS: tuple[Triple, ...] = _with_safety(_POLAR_EXPRESS_RAW, _PE_SAFETY)


class NSConfig(NamedTuple):
  """A resolved, hashable Newton–Schulz configuration.

  Attributes:
    triples: one ``(a, b, c)`` per step.
    norm_scale: the Frobenius norm is multiplied by this before dividing
      (1.01 for Polar Express, else 1).
    aol: rescale rows by ``(sum_j |XX^T|_ij)^(-1/2)`` in the first step instead
      of Frobenius normalisation.
  """

  triples: tuple[Triple, ...]
  norm_scale: float = 1.0
  aol: bool = False


# Documented output bands: every singular value of the result lies in
# [lo, hi] for inputs of condition number <= 100 (tested against the SVD).
BANDS: dict[str, tuple[float, float]] = {
    "keller": (0.65, 1.25),
    "polar_express": (0.85, 1.15),
    "dion": (0.95, 1.18),
    "aol": (0.7, 1.12),
}

# name -> (per-step list, default steps, norm_scale, aol)
PRESETS: dict[str, tuple[tuple[Triple, ...], int, float, bool]] = {
    "keller": ((KELLER,), 5, 1.0, False),
    "polar_express": (POLAR_EXPRESS, 5, _PE_SAFETY, False),
    "dion": (DION, 5, 1.0, False),
    "aol": (AOL, 4, 1.0, True),
}


def _as_triple(t: Sequence[float], where: str) -> Triple:
  try:
    vals = tuple(float(v) for v in t)
  except TypeError as e:
    raise ValueError(f"{where}: expected a triple of numbers (a, b, c), got {t!r}") from e
  if len(vals) != 3:
    raise ValueError(f"{where}: expected a triple (a, b, c), got {len(vals)} values: {t!r}")
  return vals  # type: ignore[return-value]


def resolve_coefficients(coeffs: CoeffsLike = "keller", steps: int | None = None,
                         *, name: str = "coeffs") -> NSConfig:
  """Turns a preset name, a triple or a per-step list into an :class:`NSConfig`.

  Args:
    coeffs: a preset name (``"keller"``, ``"polar_express"``, ``"dion"``,
      ``"aol"``), one triple ``(a, b, c)`` or a sequence of triples.
    steps: the number of steps; ``None`` takes the preset's default (5; 4 for
      ``"aol"``; the list's length for a user list). Fewer steps than a list
      holds take its first triples; more repeat its last.
    name: the argument's name, used in error messages.

  Returns:
    An :class:`NSConfig`: one ``(a, b, c)`` per step, the norm scale and
    whether the first step uses AOL scaling.

  Raises:
    ValueError: unknown preset, malformed coefficients, or ``steps < 1``.

  References:
    Jordan et al., `Muon <https://kellerjordan.github.io/posts/muon/>`_, 2024
    (``"keller"``); Amsel et al., `The Polar Express
    <https://arxiv.org/abs/2505.16932>`_, 2025 (``"polar_express"``); Ahn et al.,
    `Dion <https://arxiv.org/abs/2504.05295>`_, 2025 (``"dion"``); Boissin et
    al., arXiv 2512.04632, 2025 (``"aol"``).

  Example:
    >>> from muonclip_jax import resolve_coefficients
    >>> cfg = resolve_coefficients("keller")
    >>> len(cfg.triples), cfg.triples[0]
    (5, (3.4445, -4.775, 2.0315))
  """
  norm_scale, aol = 1.0, False
  if isinstance(coeffs, str):
    if coeffs not in PRESETS:
      raise ValueError(
          f"{name}: unknown Newton–Schulz preset {coeffs!r}; expected one of "
          f"{sorted(PRESETS)} or a triple / list of triples (a, b, c).")
    table, default_steps, norm_scale, aol = PRESETS[coeffs]
  else:
    seq = list(coeffs)
    if not seq:
      raise ValueError(f"{name}: empty coefficient list")
    if all(isinstance(v, (int, float)) for v in seq):
      table, default_steps = (_as_triple(seq, name),), 5
    else:
      table = tuple(_as_triple(t, f"{name}[{i}]") for i, t in enumerate(seq))
      default_steps = len(table)
  if steps is None:
    steps = default_steps
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps: the number of Newton–Schulz steps must be an integer >= 1, "
                     f"got {steps!r}")
  triples = tuple(table[min(i, len(table) - 1)] for i in range(steps))
  return NSConfig(triples=triples, norm_scale=norm_scale, aol=aol)
