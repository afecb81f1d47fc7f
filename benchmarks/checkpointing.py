"""Checkpointing cost: train-step time with an async save in flight, and seconds per save/restore.

A GPT-2-small-shaped parameter tree (12 layers, d_model 768, 12 heads, MLP 3072,
vocab 50257, context 1024: token and position embeddings, per layer the fused
QKV, attention-out, MLP-in and MLP-out kernels (``benchmarks/muon_step``'s
shapes) with their biases and two LayerNorms, and the final LayerNorm; 124.4M
parameters, f32) is laid out FSDP-style on a mesh of every device of the job
(one ``'fsdp'`` axis): the first axis of each matrix over ``'fsdp'`` when it
divides, else the last axis (the 50257-row token embedding), vectors
replicated. Its :func:`muonclip_jax.muon` state (``mesh=``; Muon momentum for
the 48 hidden matrices, AdamW moments for embeddings, biases and norms) comes
from ``jax.jit(tx.init)`` under ``jax.set_mesh`` (scalars replicated).

The "train step" is one jitted ``mc.muon`` update plus ``optax.apply_updates``
with a fixed synthetic gradient tree (params and state donated): an optimizer
step standing in for a training step. A real GPT-2-small forward and backward
pass on this 2-core CPU would take minutes per step and make the benchmark
hours long, while the optimizer step already reads and writes every array the
checkpoint holds; the question is what a save in flight costs the step that
overlaps it, and that is the step's compute competing with Orbax's writer and
the manifest's hashing for the same cores (on an accelerator the step would run
on the device instead).

Measured in each job, every figure a median over ``--rounds`` rounds, each
round's value the slowest process's (times gathered across processes; CPU
seconds, user + system of all threads, summed over them):

* **step, no save**: a step with nothing in flight (and its CPU seconds);
  **step, save in flight**: the step taken right after
  :func:`muonclip_jax.save_checkpoint` returned (interleaved with the former,
  round by round; the ratio is the median of per-round ratios); **save
  blocks**: how long ``save_checkpoint`` itself held the caller (device-to-host
  copy); when, after it returned, the manifest was written (its mtime: every
  shard written and merged) and the save was done (the manager's in-flight
  flag, polled from a thread); whether the save was still in flight when the
  step ended, and the ``wait_until_finished`` after it; the **loop cost of a
  save**: from the call of ``save_checkpoint`` to the return of that wait,
  minus the step without a save, against the save's end-to-end time below.
* **save**: ``save_checkpoint`` + ``wait_until_finished`` with nothing else
  running: the files, the manifest (SHA-256 of every file) and the commit (and
  its CPU seconds).
* **restore**: :func:`muonclip_jax.restore_checkpoint` of the whole tree and
  state onto the same shardings, with verification (each process hashes its
  share of the files), until the arrays are ready; **of which verify**:
  :func:`muonclip_jax.verify_checkpoint` alone. Every restore is checked to
  equal the saved arrays bit for bit (the benchmark fails otherwise), outside
  the timed region. The files were written seconds earlier, so they are read
  from the page cache: a cold read from disk is slower.
* **size**: the bytes of the step directory on disk (and its file count).

Jobs: 1 process x 8 host CPU devices, and 2 processes x 4 (the same 8-device
mesh), both started through ``examples/launch.py``; this module is the
worker (``--worker``, which joins ``jax.distributed`` before touching a
device), and process 0 writes the figures to a JSON file the parent reads.
Checkpoints go to a temporary directory that is deleted at the end. The 8
devices share the machine's cores, so absolute times are indicative; the
ratios come from the same processes in the same minutes.

Run: ``python -m benchmarks.checkpointing [--rounds 3] [--no-write]``, which
prints a table and writes its section of ``benchmarks/RESULTS.md``;
``--quick``: a tiny tree, one round, 1 and 2 processes, nothing written.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
  sys.path.insert(0, str(EXAMPLES))
import launch  # noqa: E402  (examples/launch.py: stdlib only)

SECTION = "checkpointing"
JOBS = ((1, 8), (2, 4))  # (processes, host devices per process)
INITIALIZATION_TIMEOUT_S = 120  # two processes importing jax on a loaded 2-core machine
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Shape:
  """A GPT-2-style decoder's dimensions (the parameter tree only; no model is run)."""

  layers: int
  d_model: int
  heads: int
  mlp: int
  vocab: int
  context: int


GPT2_SMALL = Shape(layers=12, d_model=768, heads=12, mlp=3072, vocab=50257, context=1024)
# Quick mode: a prime vocabulary keeps the token embedding on the fallback (last-axis) layout.
TINY = Shape(layers=2, d_model=64, heads=4, mlp=256, vocab=509, context=64)


def param_shapes(shape: Shape) -> dict[str, Any]:
  """The parameter tree's shapes, named so that the default routing sends them right.

  ``wte``/``wpe`` (embeddings), ``ln_*`` (norms) and every ``bias`` go to
  AdamW; the four kernels of each layer go to Muon.
  """
  d, m = shape.d_model, shape.mlp
  norm = lambda: {"scale": (d,), "bias": (d,)}
  dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}
  layer = lambda: {"ln_1": norm(),
                   "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
                   "ln_2": norm(),
                   "mlp": {"c_fc": dense(d, m), "c_proj": dense(m, d)}}
  return {"wte": {"embedding": (shape.vocab, d)}, "wpe": {"embedding": (shape.context, d)},
          **{f"h{i}": layer() for i in range(shape.layers)}, "ln_f": norm()}


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def count_params(shape: Shape) -> int:
  """Number of parameters of the tree."""
  return sum(math.prod(s) for s in _flatten_shapes(param_shapes(shape)))


def _flatten_shapes(tree: Any) -> list[tuple[int, ...]]:
  if _is_shape(tree):
    return [tree]
  return [s for v in tree.values() for s in _flatten_shapes(v)]


def fsdp_spec(dims: tuple[int, ...], n: int) -> Any:
  """FSDP layout on a mesh axis ``'fsdp'`` of ``n`` devices (module docstring)."""
  from jax.sharding import PartitionSpec as P

  if len(dims) < 2:
    return P()
  if dims[0] % n == 0:
    return P("fsdp", *([None] * (len(dims) - 1)))
  if dims[-1] % n == 0:
    return P(*([None] * (len(dims) - 1)), "fsdp")
  return P()


# --------------------------------------------------------------------------
# The worker: one process of the job.


def _worker_setup(shape: Shape) -> dict[str, Any]:
  """Mesh, optimizer, sharded params and state, synthetic gradients, jitted step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import muonclip_jax as mc

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("fsdp",))
  shapes = param_shapes(shape)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, fsdp_spec(s, n)), shapes,
                           is_leaf=_is_shape)

  def random_tree(seed: int, scale: float) -> Any:
    """Normal values drawn on the host (the same on every process), each process
    placing its own shards. A jitted ``jax.random`` tree with these shardings
    takes over 10 s to compile on 8 host devices, even for the tiny tree."""
    rng = np.random.default_rng(seed)

    def leaf(dims: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
      host = rng.standard_normal(dims, np.float32)
      host *= np.float32(scale)
      return jax.make_array_from_callback(dims, sharding, lambda index: host[index])
    return jax.tree.map(leaf, shapes, shardings, is_leaf=_is_shape)

  params = random_tree(0, 0.02)
  grads = random_tree(1, 1e-3)
  tx = mc.muon(1e-3, mesh=mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
  replicated = NamedSharding(mesh, P())
  for leaf in jax.tree.leaves(state):
    sharding = leaf.sharding
    if not (isinstance(sharding, NamedSharding) and sharding.mesh == mesh):
      raise AssertionError(f"a state leaf is not on the mesh: {sharding}")
    if leaf.ndim == 0 and not sharding.is_equivalent_to(replicated, 0):
      raise AssertionError(f"a scalar of the state is not replicated: {sharding}")

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def equal(a: Any, b: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.array_equal(x, y)
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))

  return {"mesh": mesh, "params": params, "grads": grads, "state": state,
          "train_step": train_step, "equal": equal}


def _cpu_s() -> float:
  """CPU seconds (user + system) this process has used so far, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


class _SaveWatch:
  """Notes the wall-clock time at which the manager's save in flight is done.

  Polls ``is_saving_in_progress`` (a local flag that Orbax clears once the step is
  committed and old steps are deleted) from a daemon thread every few milliseconds.
  """

  def __init__(self, manager: Any, interval_s: float = 0.01):
    self._manager, self._interval_s = manager, interval_s
    self._done = math.nan
    self._thread = threading.Thread(target=self._poll, daemon=True, name="save-watch")
    self._thread.start()

  def _poll(self) -> None:
    while self._manager.is_saving_in_progress():
      time.sleep(self._interval_s)
    self._done = time.time()

  def join(self) -> float:
    """The time the save was done (``time.time()``); call after ``wait_until_finished``."""
    self._thread.join()
    return self._done


def _dir_size(path: Path) -> tuple[int, int]:
  """``(bytes, files)`` under ``path``."""
  total = files = 0
  for dirpath, _, names in os.walk(path):
    for name in names:
      total += os.path.getsize(os.path.join(dirpath, name))
      files += 1
  return total, files


def _worker(args: argparse.Namespace) -> None:
  """One process: joins the job, measures, and (process 0) writes the JSON report."""
  import jax

  jax.distributed.initialize(
      coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=INITIALIZATION_TIMEOUT_S,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  import numpy as np
  from jax.experimental import multihost_utils

  import muonclip_jax as mc
  from benchmarks._common import machine, median, median_ratio
  from muonclip_jax._checkpoint import MANIFEST

  lead = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if lead else (lambda *a: None)
  barrier = multihost_utils.sync_global_devices
  shape = TINY if args.quick else GPT2_SMALL
  rounds = args.rounds
  load_before = os.getloadavg()[0]

  t0 = time.perf_counter()
  s = _worker_setup(shape)
  params, state, grads = s["params"], s["state"], s["grads"]
  train_step, equal = s["train_step"], s["equal"]
  array_bytes = sum(x.nbytes for x in jax.tree.leaves((params, state)))
  params, state = jax.block_until_ready(train_step(params, state, grads))  # compile + warm
  say(f"{jax.process_count()} process(es) x {jax.local_device_count()} devices: "
      f"{count_params(shape):,} parameters, params + state {array_bytes / 2**20:.1f} MiB; "
      f"set-up and first step {time.perf_counter() - t0:.1f} s")

  manager = mc.make_checkpoint_manager(args.dir, max_to_keep=2)
  step_no = 0

  def timed(fn: Any, *fn_args: Any, **fn_kwargs: Any) -> tuple[Any, float]:
    """``fn(...)`` once its arrays are ready, and the seconds that took."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*fn_args, **fn_kwargs))
    return out, time.perf_counter() - t

  def manifest_time() -> float:
    """Wall-clock time at which the newest step's manifest was written."""
    return os.stat(os.path.join(str(manager.step_path(step_no)), MANIFEST)).st_mtime

  # Warm-up save and restore (Orbax's and TensorStore's first-call costs), untimed.
  step_no += 1
  mc.save_checkpoint(manager, step_no, params, state)
  manager.wait_until_finished()
  restored = mc.restore_checkpoint(manager, params, state, step=step_no)
  del restored

  m: dict[str, list[float]] = collections.defaultdict(list)
  # 1. Step time with and without a save in flight, interleaved round by round.
  for r in range(rounds):
    barrier(f"steps-{r}")
    m["load_1min"].append(os.getloadavg()[0])
    c = _cpu_s()
    (params, state), t = timed(train_step, params, state, grads)
    m["step_plain_s"].append(t)
    m["step_plain_cpu_s"].append(_cpu_s() - c)
    step_no += 1
    t, begin, c = time.perf_counter(), time.perf_counter(), _cpu_s()
    if not mc.save_checkpoint(manager, step_no, params, state):
      raise AssertionError(f"save of step {step_no} was not started")
    m["save_blocks_s"].append(time.perf_counter() - t)
    returned = time.time()
    watch = _SaveWatch(manager)
    (params, state), t = timed(train_step, params, state, grads)
    m["step_during_save_s"].append(t)
    m["save_in_flight_after_step"].append(float(manager.is_saving_in_progress()))
    t = time.perf_counter()
    manager.wait_until_finished()
    m["save_tail_s"].append(time.perf_counter() - t)
    m["loop_cost_of_save_s"].append(time.perf_counter() - begin - m["step_plain_s"][-1])
    m["step_with_save_cpu_s"].append(_cpu_s() - c)
    m["save_done_after_return_s"].append(watch.join() - returned)
    m["manifest_after_return_s"].append(manifest_time() - returned)
    say(f"round {r}: step {m['step_plain_s'][-1]:.2f} s, with a save in flight "
        f"{m['step_during_save_s'][-1]:.2f} s; save_checkpoint blocked "
        f"{m['save_blocks_s'][-1]:.2f} s; after it returned, the manifest was written at "
        f"{m['manifest_after_return_s'][-1]:.2f} s and the save done at "
        f"{m['save_done_after_return_s'][-1]:.2f} s; tail {m['save_tail_s'][-1]:.2f} s")

  # 2. Seconds per save, end to end, with nothing else running.
  for r in range(rounds):
    step_no += 1
    barrier(f"save-{r}")
    start, t, c = time.time(), time.perf_counter(), _cpu_s()
    mc.save_checkpoint(manager, step_no, params, state)
    manager.wait_until_finished()
    m["save_s"].append(time.perf_counter() - t)
    m["save_cpu_s"].append(_cpu_s() - c)
    m["save_manifest_at_s"].append(manifest_time() - start)
    say(f"save {r}: {m['save_s'][-1]:.2f} s (manifest written at "
        f"{m['save_manifest_at_s'][-1]:.2f} s), {m['save_cpu_s'][-1]:.1f} CPU s")
  size, files = _dir_size(Path(str(manager.step_path(step_no)))) if lead else (0, 0)

  # 3. Seconds per verification, and per verified restore; every restore must be exact.
  for r in range(rounds):
    barrier(f"verify-{r}")
    t = time.perf_counter()
    mc.verify_checkpoint(manager, step_no)
    m["verify_s"].append(time.perf_counter() - t)
    barrier(f"restore-{r}")
    restored, t = timed(mc.restore_checkpoint, manager, params, state, step=step_no)
    m["restore_s"].append(t)
    if jax.tree.structure(restored) != jax.tree.structure((params, state)):
      raise AssertionError("the restored tree's structure differs from the saved one")
    if not bool(equal(restored, (params, state))):
      raise AssertionError(f"restore {r} of step {step_no} differs from the saved arrays")
    del restored
    say(f"restore {r}: {m['restore_s'][-1]:.2f} s (verify alone {m['verify_s'][-1]:.2f} s), "
        "equal to the saved arrays")
  manager.close()

  # Per round, the slowest process's value; CPU seconds are summed over the processes.
  for key in sorted(m):
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(m[key], np.float64)))
    everyone = everyone.reshape(-1, rounds)
    m[key] = (everyone.sum(axis=0) if key.endswith("_cpu_s") else everyone.max(axis=0)).tolist()
  if lead:
    report = {
        "processes": jax.process_count(), "devices_per_process": jax.local_device_count(),
        "devices": jax.device_count(), "shape": dataclasses.asdict(shape),
        "params": count_params(shape), "array_bytes": array_bytes, "rounds": rounds, **m,
        "checkpoint_bytes": size, "checkpoint_files": files, "restored_equal": True,
        "step_ratio": median_ratio(m["step_during_save_s"], m["step_plain_s"]),
        "medians": {k: median(v) for k, v in m.items()},
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": machine(),
    }
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
  jax.distributed.shutdown()


def _exit_now(code: int) -> None:
  """Flushes and leaves without Python's teardown after jax (seconds on 2 cores)."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


# --------------------------------------------------------------------------
# The parent: launches the jobs and reports.


def run_job(processes: int, devices_per_process: int, workdir: Path, *, quick: bool,
            rounds: int, timeout: float) -> dict[str, Any]:
  """Runs one job of this module's workers; returns process 0's report."""
  out = workdir / f"report_{processes}x{devices_per_process}.json"
  command = [sys.executable, "-m", "benchmarks.checkpointing", "--worker",
             "--out", str(out), "--dir", str(workdir / f"ckpt_{processes}x{devices_per_process}"),
             "--rounds", str(rounds)] + (["--quick"] if quick else [])
  env = launch.cpu_env(devices_per_process)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  t = time.perf_counter()
  launch.launch(launch.distributed_commands(command, processes), env=env, timeout=timeout,
                log_dir=workdir / f"logs_{processes}x{devices_per_process}", cwd=ROOT)
  report = json.loads(out.read_text())
  report["job_s"] = time.perf_counter() - t
  return report


def _tables(reports: Sequence[dict[str, Any]]) -> tuple[str, str]:
  """The step table and the save/restore table, one row per job."""
  from benchmarks._common import table

  steps, io = [], []
  for r in reports:
    m, job = r["medians"], f"{r['processes']} x {r['devices_per_process']}"
    steps.append([
        job, f"{m['step_plain_s']:.2f}", f"{m['step_plain_cpu_s']:.1f}",
        f"{m['step_during_save_s']:.2f}", f"**{r['step_ratio']:.2f}**",
        f"{m['save_blocks_s']:.2f}", f"{m['manifest_after_return_s']:.2f}",
        f"{m['save_done_after_return_s']:.2f}",
        f"{int(sum(r['save_in_flight_after_step']))}/{r['rounds']}",
        f"{m['save_tail_s']:.2f}", f"**{m['loop_cost_of_save_s']:.2f}**",
        f"{1 - m['loop_cost_of_save_s'] / m['save_s']:.0%}",
        f"{m['step_with_save_cpu_s']:.1f} ({m['step_plain_cpu_s'] + m['save_cpu_s']:.1f})"])
    mb = r["checkpoint_bytes"] / 1e6
    io.append([
        job, f"**{m['save_s']:.2f}**", f"{m['save_manifest_at_s']:.2f}",
        f"{m['save_cpu_s']:.1f}", f"**{m['restore_s']:.2f}**", f"{m['verify_s']:.2f}",
        f"{mb:.0f} MB ({r['checkpoint_files']} files)", f"{mb / m['save_s']:.0f}",
        f"{mb / m['restore_s']:.0f}"])
  return (table(["processes x devices", "step, no save (s)", "its CPU s", "step, save in "
                 "flight (s)", "ratio", "save_checkpoint blocks (s)", "manifest written (s "
                 "after return)", "save done (s after return)", "rounds still saving after "
                 "the step", "wait after the step (s)", "loop cost of a save (s)",
                 "save hidden", "CPU s, save + step overlapped (apart)"], steps),
          table(["processes x devices", "save, end to end (s)", "of which until the manifest "
                 "(s)", "its CPU s", "restore, verified (s)", "of which verify (s)",
                 "checkpoint size", "save MB/s", "restore MB/s"], io))


def _markdown(reports: Sequence[dict[str, Any]], loads: Sequence[tuple[float, float]],
              minutes: float) -> str:
  first = reports[0]
  shape = Shape(**first["shape"])
  versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("orbax-checkpoint", "tensorstore"))
  load = "; ".join(f"{r['processes']} x {r['devices_per_process']}: {a:.1f} before, "
                   f"{b:.1f} after" for r, (a, b) in zip(reports, loads))
  step_table, io_table = _tables(reports)
  per_round = "; ".join(
      f"{r['processes']} x {r['devices_per_process']}: step "
      + ", ".join(f"{x:.1f}" for x in r["step_plain_s"]) + " / with a save "
      + ", ".join(f"{x:.1f}" for x in r["step_during_save_s"]) + " / loop cost "
      + ", ".join(f"{x:.1f}" for x in r["loop_cost_of_save_s"]) + " / save alone "
      + ", ".join(f"{x:.1f}" for x in r["save_s"]) + " / load "
      + ", ".join(f"{x:.1f}" for x in r["load_1min"]) for r in reports)
  return (
      f"Machine: {first['machine']}; {versions}\n\n"
      f"GPT-2-small-shaped tree ({shape.layers} layers, d_model {shape.d_model}, MLP "
      f"{shape.mlp}, vocab {shape.vocab}, context {shape.context}: {first['params'] / 1e6:.1f}M "
      f"parameters, f32) with its `mc.muon(mesh=)` state: "
      f"{first['array_bytes'] / 1e6:.0f} MB of arrays, FSDP-sharded on one 8-device mesh: "
      f"1 process x 8 host CPU devices, and 2 processes x 4 (`examples/launch.py`). The "
      f"step is one jitted Muon update + `optax.apply_updates` with fixed synthetic "
      f"gradients, an optimizer step standing in for a training step (a GPT-2-small "
      f"forward and backward pass would take minutes per step on 2 cores). Medians of "
      f"{first['rounds']} rounds; each round's value is the slowest process's (CPU seconds: "
      f"the sum over the processes, user + system, all threads). Local disk; restores read "
      f"files written seconds earlier (page cache).\n\n"
      f"Train step with an asynchronous save in flight:\n\n{step_table}\n\n"
      f"*Ratio*: median per-round ratio of the step taken right after `save_checkpoint` "
      f"returned to a step with no save in flight (interleaved). *Manifest written* and "
      f"*save done*: seconds after `save_checkpoint` returned at which the manifest file "
      f"was written (its mtime; all shards written and merged by then) and at which the "
      f"manager's save in flight ended (step committed, old steps deleted; polled every "
      f"10 ms). *Wait after the step*: `wait_until_finished` after that step. *Loop cost "
      f"of a save*: from the call of `save_checkpoint` to the return of the wait, minus "
      f"the step without a save: what one save added to the loop's wall time. *Save hidden*: "
      f"1 - loop cost / save end to end (below), the share of a save that overlapping "
      f"with the step took off the loop's wall time. The step and the save's background "
      f"work (TensorStore encoding and writing, the manifest's SHA-256) share the same 2 "
      f"cores here, with other jobs (compare the CPU seconds with 2 x the wall seconds), so "
      f"overlap can only hide the time either leaves a core idle; on an accelerator the "
      f"step would run on the device while the host writes (not measured here). *CPU s, "
      f"overlapped*: from the call of `save_checkpoint` to the return of the wait, against "
      f"a step's and a save's CPU seconds taken apart.\n\n"
      f"Per round (s), in order; *load* is the 1-minute load average at the round's start: "
      f"{per_round}.\n\n"
      f"Save and restore of the whole tree and state:\n\n{io_table}\n\n"
      f"*Save, end to end*: `save_checkpoint` + `wait_until_finished` with nothing else "
      f"running (files, SHA-256 manifest, commit). *Restore*: `restore_checkpoint` with "
      f"verification (every file hashed, split over the processes) until the arrays are "
      f"ready; each restore checked bit-equal to the saved arrays (outside the timing). "
      f"The 8 devices share the machine's 2 cores, so absolute times are indicative.\n\n"
      f"1-minute load average (2 CPUs; other jobs share the machine): {load}. "
      f"{minutes:.1f} min in all. Command: `python -m benchmarks.checkpointing`.")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=None,
                  help="rounds per measurement (default 3; 1 with --quick)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny tree, one round; leaves RESULTS.md alone")
  ap.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
  ap.add_argument("--timeout", type=float, default=None,
                  help="seconds per job (default 900; 120 with --quick)")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  ap.add_argument("--dir", help=argparse.SUPPRESS)
  ap.add_argument("--coordinator", help=argparse.SUPPRESS)
  ap.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.rounds is None:
    args.rounds = 1 if args.quick else 3
  if args.timeout is None:
    args.timeout = 120.0 if args.quick else 900.0
  return args


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, Any]]:
  """Runs both jobs, prints the table, writes RESULTS.md (not with ``--quick``/``--no-write``).

  Returns:
    Process 0's report of each job, keyed by its number of processes.
  """
  args = _parse_args(argv)
  if args.worker:
    try:
      _worker(args)
    except BaseException:  # fail the job now; the launcher kills the other processes
      traceback.print_exc()
      _exit_now(1)
    _exit_now(0)
  t0 = time.perf_counter()
  reports, loads = [], []
  with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
    for processes, devices in JOBS:
      load = os.getloadavg()[0]
      print(f"--- {processes} process(es) x {devices} devices ---", flush=True)
      reports.append(run_job(processes, devices, Path(tmp), quick=args.quick,
                             rounds=args.rounds, timeout=args.timeout))
      loads.append((load, os.getloadavg()[0]))
      shutil.rmtree(Path(tmp) / f"ckpt_{processes}x{devices}", ignore_errors=True)
  minutes = (time.perf_counter() - t0) / 60
  for t in _tables(reports):
    print(t, flush=True)
  for r, (a, b) in zip(reports, loads):
    print(f"{r['processes']} x {r['devices_per_process']}: load {a:.1f} -> {b:.1f}, "
          f"job {r['job_s']:.0f} s", flush=True)
  if not (args.quick or args.no_write):
    from benchmarks._common import write_section

    write_section(SECTION, _markdown(reports, loads, minutes))
  return {r["processes"]: r for r in reports}


if __name__ == "__main__":
  main()
