"""Preemption: SIGKILL every process of a multi-process training run at random moments.

A pod slice loses all its hosts at once. This study runs the example
(``examples/lm/train.py``, MuonClip, a ``4x2`` mesh over 2 processes x 4 host
CPU devices, an asynchronous checkpoint every step) under
``examples/launch.py``, kills the whole job with SIGKILL at random moments
(one of them while Orbax is writing a step), restarts it with ``--resume``
each time, and compares the final parameters and optimizer state, and every
logged loss, with an uninterrupted run of the same command: they must be
bitwise equal.

Per kill it records the step last logged, whether a save was in flight, the
step the restart resumed from, and the seconds lost: from the kill until the
restarted job logs the step after the last one logged before the kill
(restart, restore, compilation from JAX's persistent cache, recomputed steps
and that one step).

``python -m benchmarks.preemption`` runs it and writes the figures to
``benchmarks/RESULTS.md``; tests/test_preemption.py runs it as a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
  sys.path.insert(0, str(EXAMPLES))
import launch  # noqa: E402  (examples/launch.py: stdlib only)

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary step directories
STEP_LINE = re.compile(r"^step (\d+) loss \S+ time ([\d.]+)", re.M)
# The example at a size where a step takes a fraction of a second on 2 cores.
TRAIN_ARGS = ("--batch", "8", "--seq-len", "16", "--d-model", "16",
              "--layers", "1", "--heads", "2", "--tau", "2", "--eval-every", "1000",
              "--eval-batches", "1", "--max-bytes", "65536", "--no-progress",
              "--ckpt-every", "1", "--log-every", "1")


@dataclasses.dataclass
class Kill:
  """One SIGKILL of the whole job.

  Attributes:
    launch: which launch of the job it ended (0-based).
    step: the last step process 0 logged before the kill.
    mid_save: an Orbax temporary step directory existed at the kill.
    resumed_from: the step the next launch restored (``None``: started afresh).
    seconds_lost: kill until a later launch logged step ``step + 1``.
  """

  launch: int
  step: int
  mid_save: bool
  at: float
  resumed_from: int | None = None
  seconds_lost: float | None = None


@dataclasses.dataclass
class Report:
  """What :func:`run_with_kills` saw."""

  kills: list[Kill]
  launches: int
  seconds: float
  step_seconds: float  # median interval between logged steps
  leftovers: list[str]  # temporary step directories at the end

  @property
  def survived(self) -> int:
    """Kills after which the next launch resumed from a committed step."""
    return sum(k.resumed_from is not None and k.seconds_lost is not None for k in self.kills)


def _steps(log: Path) -> list[tuple[int, float]]:
  """``(step, wall time)`` of the step lines process 0 logged."""
  try:
    text = log.read_text(errors="replace")
  except FileNotFoundError:
    return []
  return [(int(m.group(1)), float(m.group(2))) for m in STEP_LINE.finditer(text)]


def _in_flight(ckpt_dir: Path) -> bool:
  return ckpt_dir.exists() and any(p.name.endswith(TMP_SUFFIX) for p in ckpt_dir.iterdir())


def _resumed_from(log: Path) -> int | None:
  m = re.search(r"^resumed from step (\d+)", log.read_text(errors="replace"), re.M)
  return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class Job:
  """The job's shape: processes, host devices of each, and the example's ``--mesh``."""

  processes: int = 2
  devices_per_process: int = 4
  mesh: tuple[int, int] = (4, 2)


def command(ckpt_dir: Path, out_dir: Path, steps: int, job: Job) -> list[str]:
  """The example's command line (each process gets its rank appended by the launcher)."""
  return [sys.executable, "-m", "examples.lm.train", *TRAIN_ARGS,
          "--mesh", "x".join(map(str, job.mesh)), "--steps", str(steps),
          "--ckpt-dir", str(ckpt_dir), "--out", str(out_dir), "--resume"]


def environment(cache_dir: Path, devices_per_process: int = 4) -> dict[str, str]:
  """Host CPU devices, and JAX's persistent compilation cache shared by every launch."""
  env = launch.cpu_env(devices_per_process)
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def run(workdir: Path, steps: int, env: dict[str, str], job: Job, *, timeout: float = 300.0,
        stop: Any = None, tag: str = "run") -> Path:
  """One launch of the job; returns the log directory. Raises ``launch.LaunchError``."""
  logs = workdir / "logs" / tag
  launch.launch(launch.distributed_commands(
      command(workdir / "ckpt", workdir / "out", steps, job), job.processes,
      launch.free_port()),
      env=env, timeout=timeout, log_dir=logs, stream_process=None, stop=stop, cwd=ROOT)
  return logs


def run_with_kills(workdir: Path, *, kills: int = 5, steps: int = 30, seed: int = 0,
                   job: Job = Job(), mid_save_kill: int = 2, env: dict[str, str] | None = None,
                   timeout: float = 300.0) -> Report:
  """Runs the example to ``steps``, SIGKILLing the whole job ``kills`` times.

  Kill ``i`` comes once the launch has logged 1-3 more steps (random) and then
  a random 0-0.5 s; kill ``mid_save_kill`` waits instead until Orbax's
  temporary directory of a step in flight exists. Each restart resumes from
  the newest valid checkpoint.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  env = env or environment(workdir / "compile_cache", job.devices_per_process)
  ckpt = workdir / "ckpt"
  rng = random.Random(seed)
  record: list[Kill] = []
  t0 = time.time()
  for i in range(kills + 1):
    tag = f"launch_{i}"
    log = workdir / "logs" / tag / "process_0.log"
    stop = None
    if i < kills:
      advance, delay = rng.randint(1, 3), rng.uniform(0.0, 0.5)
      state: dict[str, float] = {}

      def stop(i=i, advance=advance, delay=delay, state=state, log=log) -> str | None:
        seen = _steps(log)
        if not seen or seen[-1][0] < seen[0][0] + advance - 1:
          return None
        if i == mid_save_kill:
          return "mid-save" if _in_flight(ckpt) else None
        state.setdefault("ready", time.monotonic())
        return "random" if time.monotonic() >= state["ready"] + delay else None
    try:
      run(workdir, steps, env, job, timeout=timeout, stop=stop, tag=tag)
    except launch.LaunchError as err:
      if not err.stopped:
        raise
      seen = _steps(log)
      record.append(Kill(i, seen[-1][0], _in_flight(ckpt), time.time()))
      continue
    if i < kills:
      raise RuntimeError(f"the run finished before kill {i}; raise steps above {steps}")
  logs = [workdir / "logs" / f"launch_{i}" / "process_0.log" for i in range(kills + 1)]
  for k in record:
    k.resumed_from = _resumed_from(logs[k.launch + 1])
    # The next launch may itself be killed before it gets past k.step: look further on.
    after = [t for log in logs[k.launch + 1:] for s, t in _steps(log) if s == k.step + 1]
    k.seconds_lost = after[0] - k.at if after else None
  last = _steps(workdir / "logs" / f"launch_{kills}" / "process_0.log")
  intervals = [b[1] - a[1] for a, b in zip(last, last[1:])]
  leftovers = sorted(p.name for p in ckpt.iterdir() if p.name.endswith(TMP_SUFFIX))
  return Report(record, kills + 1, time.time() - t0,
                statistics.median(intervals) if intervals else float("nan"), leftovers)


def final_losses(workdir: Path) -> list[float]:
  """Every logged training loss of the finished run (``metrics.json``)."""
  return json.loads((workdir / "out" / "metrics.json").read_text())["metrics"]["loss"]


def final_states(workdirs: Sequence[Path], steps: int, mesh: tuple[int, int]) -> list[Any]:
  """Parameters and optimizer state of each run's last checkpoint, as NumPy (needs 8 devices)."""
  import jax
  import numpy as np

  import muonclip_jax as mc
  from examples import lm
  args = dict(zip(TRAIN_ARGS[::2], TRAIN_ARGS[1::2], strict=False))
  cfg = lm.RunConfig(
      model=lm.ModelConfig(d_model=int(args["--d-model"]), num_layers=int(args["--layers"]),
                           num_heads=int(args["--heads"])),
      optim=lm.OptimConfig(tau=float(args["--tau"]), total_steps=steps), steps=steps,
      batch=int(args["--batch"]), seq_len=int(args["--seq-len"]), mesh=mesh)
  trainer = lm.Trainer(cfg, lm.ByteData(lm.default_corpus(1 << 16), cfg.seq_len))
  out = []
  for workdir in workdirs:  # the trainer's arrays are the restore targets
    manager = mc.make_checkpoint_manager(workdir / "ckpt")
    try:
      state = mc.restore_checkpoint(manager, trainer.params, trainer.opt_state, step=steps)
    finally:
      manager.close()
    out.append(jax.tree.map(np.asarray, state))
  return out


def trees_equal(a: Any, b: Any) -> bool:
  """Bitwise equality of two NumPy trees."""
  import jax
  import numpy as np
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(la, lb)))


def study(workdir: Path, kills: int, steps: int, seed: int, job: Job = Job()
          ) -> tuple[Report, bool, bool, float]:
  """Uninterrupted run, run with kills; returns (report, state equal, losses equal, seconds)."""
  env = environment(workdir / "compile_cache", job.devices_per_process)
  t0 = time.time()
  run(workdir / "reference", steps, env, job, tag="reference")
  reference_seconds = time.time() - t0
  report = run_with_kills(workdir / "killed", kills=kills, steps=steps, seed=seed, job=job,
                          env=env)
  same_state = trees_equal(*final_states([workdir / "reference", workdir / "killed"], steps,
                                         job.mesh))
  same_losses = final_losses(workdir / "reference") == final_losses(workdir / "killed")
  return report, same_state, same_losses, reference_seconds


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=8)
  p.add_argument("--steps", type=int, default=45)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flag = f"{launch.DEVICE_COUNT_FLAG}=8"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  from importlib import metadata

  from benchmarks._common import machine, table, write_section

  with tempfile.TemporaryDirectory(prefix="preemption-") as tmp:
    report, same_state, same_losses, ref_s = study(Path(tmp), args.kills, args.steps,
                                                   args.seed)
  lost = [k.seconds_lost for k in report.kills if k.seconds_lost is not None]
  rows = table(["kill", "step logged", "save in flight", "resumed from", "seconds lost"],
               [[k.launch + 1, k.step, "yes" if k.mid_save else "no", k.resumed_from,
                 f"{k.seconds_lost:.1f}"] for k in report.kills])
  load = os.getloadavg()[0]
  body = (
      f"Machine: {machine()}; load average {load:.1f}.\n\n"
      f"`python -m benchmarks.preemption --kills {args.kills} --steps {args.steps} --seed "
      f"{args.seed}`: the example (MuonClip, mesh 4x2 over 2 processes x 4 host CPU devices, "
      f"an async checkpoint every step, {args.steps} steps) SIGKILLed as a whole "
      f"{args.kills} times at random moments and resumed each time, against an "
      "uninterrupted run of the same command.\n\n"
      f"- **Kills survived / kills tried: {report.survived} / {len(report.kills)}** "
      f"({sum(k.mid_save for k in report.kills)} with a save in flight).\n"
      f"- Final parameters and optimizer state bitwise equal to the uninterrupted run: "
      f"**{'yes' if same_state else 'NO'}**; every logged loss equal: "
      f"**{'yes' if same_losses else 'NO'}**.\n"
      f"- Seconds lost per kill (kill until the restarted job logs the step after the last "
      f"one logged before the kill): median **{statistics.median(lost):.1f} s**, max "
      f"{max(lost):.1f} s; one step takes {report.step_seconds:.2f} s, the uninterrupted "
      f"run {ref_s:.0f} s start to end, the run with kills {report.seconds:.0f} s.\n"
      f"- Temporary step directories left at the end: {len(report.leftovers)}.\n\n"
      + rows + f"\n\norbax-checkpoint {metadata.version('orbax-checkpoint')}.\n")
  print(body)
  write_section("preemption", body)


if __name__ == "__main__":
  main()
