"""argparse types that refuse bad numbers when the command line is parsed.

Without them ``--lr nan`` trains to a NaN loss and exits 0, ``--seq-len 0``
fails deep inside with ``ZeroDivisionError``, and ``--ckpt-every 0`` fails
only after training has started. No jax import here: ``train_lm`` parses its
flags before jax starts (``--mesh`` sets ``XLA_FLAGS`` first).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["nonnegative_float", "nonnegative_int", "positive_float", "positive_int"]


def _int(text: str, least: int, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if value < least:
    raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
  return value


def _float(text: str, positive: bool, what: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if not math.isfinite(value) or value < 0 or (positive and value == 0):
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1 (a size, a step count, an interval)."""
  return _int(text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
  """An integer >= 0."""
  return _int(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
  """A finite number > 0 (a learning rate, a threshold)."""
  return _float(text, True, "a finite number > 0")


def nonnegative_float(text: str) -> float:
  """A finite number >= 0 (a weight decay)."""
  return _float(text, False, "a finite number >= 0")
