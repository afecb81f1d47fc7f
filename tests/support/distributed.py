"""Run a test function in every process of a real ``jax.distributed`` job (CPU, one machine).

:func:`run_distributed` starts ``num_processes`` Python processes
(``tests/support/distributed_worker.py``)
with ``devices_per_process`` host CPU devices each, joins them into one multi-controller
job, calls ``fn(**args)`` in every process and returns what each returned::

  from support.distributed import run_distributed

  def test_global_sum(tmp_path):
    results = run_distributed("support.workers_basic:topology_and_global_sum",
                              tmp_path=tmp_path)

The processes are started and supervised by ``examples/launch.py`` (:func:`launch.launch`):
the first failure (an exception, a non-zero exit) or the timeout SIGKILLs every process
with its process group, and the test fails with the end of every process's log. A test
cannot hang on a stuck peer, and leaves no process behind.

Rules for target functions:

* ``target`` is ``"module:function"``; the module is imported from ``tests/`` or the
  repository root, in every process, right after ``jax.distributed.initialize``.
* Target modules must not touch jax devices at import time (no ``jnp`` arrays, no
  ``jax.devices()`` at module level): importing them must work whether or not the backend
  is up, including in the pytest process, which has its own devices.
* ``args`` and the return values are pickled: return numpy arrays or Python values,
  not jax arrays that span processes.
* Every process must make the same collective calls in the same order, as in any
  multi-controller program; a process that skips one leaves the others waiting until the
  timeout.
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "distributed_worker.py"
sys.path.insert(0, str(ROOT / "examples"))

import launch  # noqa: E402  (examples/launch.py: stdlib only, no jax)


class DistributedRunError(AssertionError):
  """A distributed test run failed; all of its processes are dead and reaped.

  Attributes:
    reason: What went wrong (which process failed, or the timeout).
    results: One :class:`launch.ProcessResult` per process (return code, log, pid).
  """

  def __init__(self, message: str, reason: str, results: list[launch.ProcessResult]) -> None:
    super().__init__(message)
    self.reason = reason
    self.results = results


def run_distributed(target: str, *, num_processes: int = 2, devices_per_process: int = 4,
                    timeout: float = 60.0, args: Mapping[str, Any] | None = None,
                    tmp_path: Path) -> list[Any]:
  """Runs ``target`` in every process of a fresh ``jax.distributed`` job.

  Args:
    target: ``"module:function"``, importable from ``tests/`` or the repository root. The
      function is called as ``fn(**args)`` after ``jax.distributed.initialize``.
    num_processes: Processes in the job.
    devices_per_process: Host CPU devices of each process
      (``--xla_force_host_platform_device_count``).
    timeout: Seconds for the whole job, start-up included, before it is killed.
    args: Keyword arguments of the function (pickled); none if ``None``.
    tmp_path: A directory (pytest's ``tmp_path``; created if missing) for the arguments,
      the return values and the per-process logs; each call uses a fresh subdirectory.

  Returns:
    Each process's return value, in process order.

  Raises:
    DistributedRunError: (an ``AssertionError``) a process raised or exited non-zero, the
      timeout passed, or a result is missing. Its message holds the end of every
      process's log; every process was SIGKILLed (with its process group) and reaped.
  """
  Path(tmp_path).mkdir(parents=True, exist_ok=True)
  run_dir = Path(tempfile.mkdtemp(prefix="distributed-", dir=tmp_path))
  args_file = run_dir / "args.pkl"
  with open(args_file, "wb") as f:
    pickle.dump(dict(args or {}), f)
  base = [sys.executable, str(WORKER), "--target", target, "--args-file", str(args_file),
          "--devices-per-process", str(devices_per_process)]
  result_files = [run_dir / f"result_{i}.pkl" for i in range(num_processes)]
  commands = [[*command, "--result-file", str(result_files[i])]
              for i, command in enumerate(launch.distributed_commands(base, num_processes))]
  start = time.monotonic()
  try:
    results = launch.launch(commands, env=launch.cpu_env(devices_per_process),
                            timeout=timeout, log_dir=run_dir / "logs", stream_process=None,
                            cwd=ROOT)
  except launch.LaunchError as err:
    elapsed = time.monotonic() - start
    raise DistributedRunError(
        f"distributed run of {target} failed after {elapsed:.1f} s: {err}", err.reason,
        err.results) from None
  values = []
  for i, path in enumerate(result_files):
    if not path.exists():
      tails = "\n".join(f"--- process {r.process_id} log ---\n{r.tail()}" for r in results)
      raise DistributedRunError(f"process {i} exited 0 but wrote no result\n{tails}",
                                f"process {i} wrote no result", results)
    with open(path, "rb") as f:
      values.append(pickle.load(f))
  return values
