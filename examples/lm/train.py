"""Train a small byte-level transformer with MuonClip, Muon or AdamW.

The default run trains a 4-layer, d_model 128 decoder (RoPE, Flax NNX) on text
gathered from the Python standard library of this machine (no download) and
writes, under ``--out`` (default ``runs/train_lm``):

* ``metrics.json`` and ``metrics.csv``: per-step loss, learning rate, per-layer
  (and, in the JSON, per-head) max pre-softmax logit; validation loss;
* ``loss.png`` and ``max_logit.png``.

Examples::

  python -m examples.lm.train                                   # MuonClip, tau=100
  python -m examples.lm.train --optimizer adamw --lr 3e-3
  python -m examples.lm.train --tau 20                          # QK-Clip acts (logits reach ~25)
  python -m examples.lm.train --kv-heads 2                      # GQA
  python -m examples.lm.train --mesh 4x2 --batch 16             # 8 host devices
  python -m examples.lm.train --ckpt-dir /tmp/ck --steps 100    # then:
  python -m examples.lm.train --ckpt-dir /tmp/ck --steps 200 --resume
  python -m examples.lm.train --text my_corpus.txt

``--mesh DATAxMODEL`` asks XLA for that many host devices (it must be set
before jax starts, which this script does) and shards the batch over ``data``
and the matrices FSDP-style; Muon's Newton–Schulz then runs device-locally.

Several processes (one per host of a TPU pod slice or GPU cluster; JAX's
multi-controller runtime): run the same command on every host, with
``--multihost`` (``jax.distributed.initialize()`` detects the pod on Cloud TPU,
SLURM and Open MPI) or with ``--coordinator HOST:PORT --num-processes N
--process-id I``. The mesh then spans every process's devices, each process
reads only its own rows of each batch, ``--ckpt-dir`` must be storage that
every host reaches (``gs://...``), and process 0 alone prints and writes the
metrics and plots. On one machine, ``examples/launch.py`` starts N local
processes::

  python examples/launch.py --num-processes 2 --devices-per-process 4 -- \
      python -m examples.lm.train --mesh 4x2 --ckpt-dir /tmp/ck
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from examples.lm.argtypes import nonnegative_float, nonnegative_int, positive_float, positive_int


def parse_mesh(spec: str | None) -> tuple[int, int] | None:
  """``"4x2"`` -> ``(4, 2)`` (data, model); ``"4"`` -> ``(4, 1)``; empty -> ``None``."""
  if not spec:
    return None
  parts = spec.lower().split("x")
  if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 4x2, got {spec!r}")
  return int(parts[0]), int(parts[1]) if len(parts) == 2 else 1


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
  p.add_argument("--steps", type=positive_int, default=300)
  p.add_argument("--batch", type=positive_int, default=16)
  p.add_argument("--seq-len", type=positive_int, default=128)
  p.add_argument("--d-model", type=positive_int, default=128)
  p.add_argument("--layers", type=positive_int, default=4)
  p.add_argument("--heads", type=positive_int, default=4)
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


def init_distributed(args: argparse.Namespace) -> None:
  """Starts JAX's multi-controller runtime when the flags ask for it (before any computation)."""
  import jax
  if args.coordinator is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.multihost:
    jax.distributed.initialize()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the example; returns a summary (final losses, max logit, paths, seconds)."""
  args = build_parser().parse_args(argv)
  if args.resume and not args.ckpt_dir:
    raise SystemExit("--resume needs --ckpt-dir")
  processes = check_distributed(args)
  n = args.mesh[0] * args.mesh[1] if args.mesh is not None else processes
  if n % processes:
    raise SystemExit(f"--mesh {args.mesh[0]}x{args.mesh[1]} has {n} devices, not a "
                     f"multiple of the {processes} processes")
  if args.mesh is not None and "jax" not in sys.modules:
    # XLA reads the flag once, when jax starts; a mesh of host devices needs it first.
    flag = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{flag}={n // processes}"])

  init_distributed(args)
  import jax
  from tqdm.auto import tqdm

  from examples.lm import trainer as lm

  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)

  lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.01)
  cfg = lm.RunConfig(
      model=lm.ModelConfig(d_model=args.d_model, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads),
      optim=lm.OptimConfig(name=args.optimizer, lr=lr, adam_lr=args.adam_lr, tau=args.tau,
                           weight_decay=args.weight_decay, warmup=args.warmup,
                           schedule=args.schedule, total_steps=args.steps),
      steps=args.steps, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
      eval_every=args.eval_every, eval_batches=args.eval_batches, mesh=args.mesh)
  data = lm.ByteData(lm.load_text(args.text, args.max_bytes), args.seq_len)
  t0 = time.perf_counter()
  trainer = lm.Trainer(cfg, data)
  n_params = lm.count_params(trainer.params)
  say(f"{args.optimizer}: {n_params:,} parameters, {len(data.train):,} training bytes, "
        f"{len(data.val):,} validation bytes, {len(jax.devices())} device(s)"
        + (f", mesh {args.mesh[0]}x{args.mesh[1]}" if args.mesh else "")
        + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""),
        flush=True)

  ckpt = None
  if args.ckpt_dir:
    ckpt = lm.Checkpointer(args.ckpt_dir)
    if args.resume:
      step = ckpt.restore_latest(trainer)
      say(f"resumed from step {step}" if step is not None else
            f"no checkpoint in {args.ckpt_dir}; starting from scratch", flush=True)

  def on_step(tr: lm.Trainer) -> None:
    if diverged(tr.metrics) is not None:
      raise _Diverged  # stop here: no checkpoint of a NaN state replaces a good one
    if ckpt is not None and (tr.step % args.ckpt_every == 0 or tr.step == args.steps):
      ckpt.save(tr)
    if args.log_every and tr.step % args.log_every == 0:
      say(f"step {tr.step} loss {tr.metrics['loss'][-1]:.4f} time {time.time():.3f}",
          flush=True)

  bar = tqdm(total=args.steps, initial=trainer.step, disable=args.no_progress or not lead,
             desc=args.optimizer, unit="step")
  try:
    trainer.run(progress=bar, on_step=on_step)
  except _Diverged:
    pass
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.close()
  seconds = time.perf_counter() - t0

  m = trainer.metrics
  summary = {
      "optimizer": args.optimizer,
      "steps": trainer.step,
      "final_train_loss": m["loss"][-1] if m["loss"] else None,
      "final_val_loss": m["val_loss"][-1] if m["val_loss"] else None,
      "max_logit": max(max(x) for x in m["max_logit"]) if m["max_logit"] else None,
      "final_max_logit": max(m["max_logit"][-1]) if m["max_logit"] else None,
      "params": n_params,
      "seconds": seconds,
  }
  bad_step = diverged(m)
  if bad_step is not None:
    summary["diverged_at_step"] = bad_step
  telemetry = lm.clip_telemetry(trainer.opt_state)
  if telemetry:
    summary["clipped_heads_total"] = telemetry["clipped_total"]
  if lead:  # one process writes the files
    json_path, csv_path = lm.save_metrics(m, cfg, args.out, extra={"summary": summary})
    title = f"{args.optimizer}" + (f" (tau={args.tau:g})" if args.optimizer == "muonclip"
                                   else "")
    plots = lm.plot_run(m, args.out, title=title,
                        tau=args.tau if args.optimizer == "muonclip" else None)
    summary["files"] = [str(p) for p in (json_path, csv_path, *plots)]
  say(json.dumps(summary, indent=1), flush=True)
  say(qk_clip_report(args.optimizer, args.tau, summary["max_logit"],
                     telemetry.get("clipped_total"), diverged_at=bad_step, lr=lr), flush=True)
  if bad_step is not None:
    raise SystemExit(1)
  return summary


class _Diverged(Exception):
  """Raised from the step callback to stop a run whose loss went non-finite."""


def diverged(metrics: dict[str, list[Any]]) -> int | None:
  """The first step whose loss, or a layer's max logit, is NaN or infinite; else ``None``."""
  for step, loss, logits in zip(metrics["step"], metrics["loss"], metrics["max_logit"],
                                strict=True):
    if not (math.isfinite(loss) and all(math.isfinite(x) for x in logits)):
      return step
  return None


def qk_clip_report(optimizer: str, tau: float, max_logit: float | None,
                   clipped_total: int | None, *, diverged_at: int | None = None,
                   lr: float | None = None) -> str:
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
  return (f"QK-Clip: {clipped_total} head-steps clipped to tau = {tau:g} (largest logit "
          f"before clipping {max_logit:.1f}); see max_logit.png.")


if __name__ == "__main__":
  main()
