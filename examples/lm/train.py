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

``--mesh DATAxMODEL`` asks JAX for that many host devices on a CPU machine
(:func:`use_host_devices`), shards the batch over ``data`` and the matrices
FSDP-style (``examples/lm/sharding.py``), and builds ``muonclip(mesh=...)``, whose
Newton–Schulz then runs device-locally.

The pieces: ``config.py`` (these flags), ``input_pipeline.py`` (the corpus and
per-process batches), ``model.py``, ``optim.py``, ``sharding.py``,
``trainer.py`` (the jitted step and asynchronous checkpoints) and
``metrics.py`` (files and plots). This file starts the processes and runs the loop.

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
import time
from collections.abc import Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from . import config, input_pipeline, metrics, optim
from . import model as model_lib
from . import trainer as trainer_lib


def use_host_devices(count: int) -> None:
  """Asks JAX for ``count`` CPU devices in this process: a mesh of host devices on a CPU machine.

  It takes effect only before JAX starts a backend (the first computation). When
  ``main`` runs in a process that has already computed, the devices stay as they
  are, and :func:`examples.lm.sharding.make_mesh` says so if they are too few.
  Accelerators are not affected.
  """
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # a backend is already running: its device count is fixed
    pass


def init_distributed(args: argparse.Namespace) -> None:
  """Starts JAX's multi-controller runtime when the flags ask for it (before any computation)."""
  if args.coordinator is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.multihost:
    jax.distributed.initialize()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the example; returns a summary (final losses, max logit, paths, seconds)."""
  args = config.build_parser().parse_args(argv)
  if args.resume and not args.ckpt_dir:
    raise SystemExit("--resume needs --ckpt-dir")
  processes = config.check_distributed(args)
  n = args.mesh[0] * args.mesh[1] if args.mesh is not None else processes
  if n % processes:
    raise SystemExit(f"--mesh {args.mesh[0]}x{args.mesh[1]} has {n} devices, not a "
                     f"multiple of the {processes} processes")
  if args.mesh is not None:
    use_host_devices(n // processes)
  init_distributed(args)

  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)

  lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.01)
  cfg = trainer_lib.RunConfig(
      model=model_lib.ModelConfig(d_model=args.d_model, num_layers=args.layers,
                           num_heads=args.heads, num_kv_heads=args.kv_heads),
      optim=optim.OptimConfig(name=args.optimizer, lr=lr, adam_lr=args.adam_lr, tau=args.tau,
                           weight_decay=args.weight_decay, warmup=args.warmup,
                           schedule=args.schedule, total_steps=args.steps),
      steps=args.steps, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
      eval_every=args.eval_every, eval_batches=args.eval_batches, mesh=args.mesh)
  data = input_pipeline.ByteData(input_pipeline.load_text(args.text, args.max_bytes), args.seq_len)
  t0 = time.perf_counter()
  trainer = trainer_lib.Trainer(cfg, data)
  n_params = model_lib.count_params(trainer.params)
  say(f"{args.optimizer}: {n_params:,} parameters, {len(data.train):,} training bytes, "
        f"{len(data.val):,} validation bytes, {len(jax.devices())} device(s)"
        + (f", mesh {args.mesh[0]}x{args.mesh[1]}" if args.mesh else "")
        + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""),
        flush=True)

  ckpt = None
  if args.ckpt_dir:
    ckpt = trainer_lib.Checkpointer(args.ckpt_dir)
    if args.resume:
      step = ckpt.restore_latest(trainer)
      say(f"resumed from step {step}" if step is not None else
            f"no checkpoint in {args.ckpt_dir}; starting from scratch", flush=True)

  def on_step(tr: trainer_lib.Trainer) -> None:
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
  telemetry = optim.clip_telemetry(trainer.opt_state)
  if telemetry:
    summary["clipped_heads_total"] = telemetry["clipped_total"]
  if lead:  # one process writes the files
    json_path, csv_path = metrics.save_metrics(m, cfg, args.out, extra={"summary": summary})
    title = f"{args.optimizer}" + (f" (tau={args.tau:g})" if args.optimizer == "muonclip"
                                   else "")
    plots = metrics.plot_run(m, args.out, title=title,
                        tau=args.tau if args.optimizer == "muonclip" else None)
    summary["files"] = [str(p) for p in (json_path, csv_path, *plots)]
  say(json.dumps(summary, indent=1), flush=True)
  say(optim.qk_clip_report(args.optimizer, args.tau, summary["max_logit"],
                            telemetry.get("clipped_total"), diverged_at=bad_step, lr=lr,
                            plot="max_logit.png"), flush=True)
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


if __name__ == "__main__":
  main()
