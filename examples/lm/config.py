"""The command line of ``python -m examples.lm.train``: flags, checked when they are parsed.

Bad numbers (``--lr nan``, ``--seq-len 0``) and inconsistent multi-process
flags are refused here, before a model is built or a device is touched.
"""

from __future__ import annotations

import argparse

from .argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int

DESCRIPTION = "Train a small byte-level transformer with MuonClip, Muon or AdamW."


def parse_mesh(spec: str | None) -> tuple[int, int] | None:
  """``"4x2"`` -> ``(4, 2)`` (data, model); ``"4"`` -> ``(4, 1)``; empty -> ``None``."""
  if not spec:
    return None
  parts = spec.lower().split("x")
  if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 4x2, got {spec!r}")
  return int(parts[0]), int(parts[1]) if len(parts) == 2 else 1


def add_size_args(p: argparse.ArgumentParser, *, batch: int, seq_len: int,
                  steps: int | None = None, d_model: int | None = None,
                  layers: int | None = None, heads: int | None = None) -> None:
  """Adds the size flags that the trainers and the studies share, each an integer >= 1.

  ``--batch`` and ``--seq-len`` always; ``--steps``, ``--d-model``, ``--layers`` and
  ``--heads`` where a default is given.

  Args:
    p: the parser.
    batch, seq_len, steps, d_model, layers, heads: the defaults.
  """
  for flag, default in (("--steps", steps), ("--batch", batch), ("--seq-len", seq_len),
                        ("--d-model", d_model), ("--layers", layers), ("--heads", heads)):
    if default is not None:
      p.add_argument(flag, type=positive_int, default=default)


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(description=DESCRIPTION,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip")
  p.add_argument("--tau", type=positive_float, default=100.0,
                 help="QK-Clip threshold (muonclip)")
  p.add_argument("--lr", type=positive_float, default=None,
                 help="peak learning rate (default 0.01 for Muon/MuonClip, 3e-3 for AdamW)")
  p.add_argument("--adam-lr", type=positive_float, default=None,
                 help="learning rate of Muon's AdamW branch (default: --lr)")
  p.add_argument("--weight-decay", type=nonnegative_float, default=0.1)
  p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
  p.add_argument("--warmup", type=nonnegative_int, default=20)
  add_size_args(p, steps=300, batch=16, seq_len=128, d_model=128, layers=4, heads=4)
  p.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA); "
                 "default: --heads")
  p.add_argument("--text", type=str, default=None,
                 help="train on this file instead of the standard-library corpus")
  p.add_argument("--max-bytes", type=positive_int, default=1 << 20, help="corpus size cap")
  p.add_argument("--eval-every", type=positive_int, default=50)
  p.add_argument("--eval-batches", type=positive_int, default=8)
  p.add_argument("--mesh", type=parse_mesh, default=None,
                 help="DATAxMODEL device mesh, e.g. 4x2 (host devices on CPU)")
  p.add_argument("--ckpt-dir", type=str, default=None, help="save checkpoints here")
  p.add_argument("--ckpt-every", type=positive_int, default=100)
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --ckpt-dir")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--multihost", action="store_true",
                 help="several processes: jax.distributed.initialize() detects them (Cloud "
                 "TPU pods, SLURM, Open MPI)")
  p.add_argument("--coordinator", type=str, default=None,
                 help="several processes: HOST:PORT of process 0 (with --num-processes, "
                 "--process-id)")
  p.add_argument("--num-processes", type=positive_int, default=None)
  p.add_argument("--process-id", type=nonnegative_int, default=None)
  p.add_argument("--log-every", type=nonnegative_int, default=0,
                 help="print 'step N loss L' every N steps (0: no step lines)")
  p.add_argument("--out", type=str, default="runs/train_lm")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def check_distributed(args: argparse.Namespace) -> int:
  """Validates the multi-process flags; returns the number of processes (1 when none)."""
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise SystemExit("--coordinator, --num-processes and --process-id go together")
    if args.multihost:
      raise SystemExit("--multihost detects the processes; drop --coordinator and friends")
    if not 0 <= args.process_id < args.num_processes:
      raise SystemExit(f"--process-id must be in [0, {args.num_processes}), got "
                       f"{args.process_id}")
    return args.num_processes
  return 1
