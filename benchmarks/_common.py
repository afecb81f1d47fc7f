"""Shared benchmark helpers: paired timing, machine description, RESULTS.md sections.

Machines are shared and noisy, so every figure is a median over interleaved
(paired) runs, and every ratio is taken between functions timed in the same
process, round by round.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

import jax

from examples.lm.argtypes import nonnegative_int, positive_int
from examples.lm.config import add_size_args

RESULTS = Path(__file__).with_name("RESULTS.md")


def block(x):
  return jax.block_until_ready(x)


def paired_times(fns: Sequence[Callable[[], object]], rounds: int = 7,
                 warmup: int = 1) -> list[list[float]]:
  """Times each zero-argument function once per round, interleaved; returns seconds."""
  for _ in range(warmup):
    for f in fns:
      block(f())
  out: list[list[float]] = [[] for _ in fns]
  for _ in range(rounds):
    for i, f in enumerate(fns):
      t0 = time.perf_counter()
      block(f())
      out[i].append(time.perf_counter() - t0)
  return out


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs)


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
  """Median over rounds of the per-round ratio ``num / den``."""
  return statistics.median(a / b for a, b in zip(num, den))


def machine() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.*)", f.read())
      if m:
        cpu = m.group(1).strip()
  except OSError:
    pass
  vers = ", ".join(f"{p} {metadata.version(p)}" for p in ("jax", "jaxlib", "optax", "flax"))
  return (f"{dev.platform.upper()} ({getattr(dev, 'device_kind', '')}), {cpu}, "
          f"{os.cpu_count()} cores visible, {len(jax.devices())} device(s); "
          f"Python {platform.python_version()}; {vers}; "
          f"{datetime.date.today().isoformat()}")


def write_section(name: str, markdown: str) -> None:
  """Replaces (or appends) the ``## name`` section of benchmarks/RESULTS.md."""
  text = RESULTS.read_text() if RESULTS.exists() else (
      "# Benchmark results\n\nEach section is written by the benchmark of the same name "
      "(`python -m benchmarks.<name>`). Ratios are medians of per-round ratios of "
      "interleaved runs in one process.\n")
  body = f"## {name}\n\n{markdown.strip()}\n"
  pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: body + "\n", text)
  else:
    text = text.rstrip("\n") + "\n\n" + body
  RESULTS.write_text(text.rstrip("\n") + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def add_study_args(p: argparse.ArgumentParser, *, steps: int, eval_every: int) -> None:
  """The model, data and evaluation flags the training studies share."""
  add_size_args(p, steps=steps, batch=16, seq_len=64, d_model=128, layers=2, heads=4)
  p.add_argument("--warmup", type=nonnegative_int, default=20)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--eval-every", type=positive_int, default=eval_every)
  p.add_argument("--eval-batches", type=positive_int, default=8)
  p.add_argument("--quick", action="store_true",
                 help="tiny smoke run; leaves RESULTS.md and the plots alone")


def steps_to_reach(steps: Iterable[int], losses: Iterable[float], target: float
                   ) -> float | None:
  """First step at which a loss curve reaches ``target``, linearly interpolated.

  ``None`` when it never does.
  """
  prev: tuple[int, float] | None = None
  for s, v in zip(steps, losses):
    if v <= target:
      if prev is None or not math.isfinite(prev[1]):
        return float(s)
      s0, v0 = prev
      return s0 + (v0 - target) / (v0 - v) * (s - s0) if v0 != v else float(s)
    prev = (s, v)
  return None
