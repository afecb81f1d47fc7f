"""One process of a multi-process test job (the entry point of ``tests/support/distributed.py``).

Run as::

  python tests/support/distributed_worker.py --target MODULE:FUNCTION --args-file ARGS.pkl \\
      --result-file RESULT.pkl [--devices-per-process 4] \\
      --coordinator localhost:PORT --num-processes N --process-id I

It sets ``JAX_PLATFORMS=cpu`` and the host device-count flag before jax is imported,
joins the ``jax.distributed`` job (short timeouts: a test must fail, not hang), imports
``MODULE`` (from tests/ or the repository root), calls ``FUNCTION(**args)``, pickles the
return value to ``RESULT.pkl``, shuts ``jax.distributed`` down and exits 0 with
``os._exit`` once its output is flushed: Python's own teardown after jax takes about a
second per job on a 2-core machine, and there is nothing left for it to do.

On any exception it prints the traceback and leaves at once with ``os._exit(1)``, without
waiting in the shutdown barrier for the other processes: the launcher sees the exit code
and kills the rest of the job.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
EXAMPLES = ROOT / "examples"

INITIALIZATION_TIMEOUT_S = 20
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 10


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", required=True, help="MODULE:FUNCTION to call")
  parser.add_argument("--args-file", required=True, help="pickled dict of keyword arguments")
  parser.add_argument("--result-file", required=True, help="where the return value is pickled")
  parser.add_argument("--devices-per-process", type=int, default=None,
                      help="host CPU devices of this process (default: keep XLA_FLAGS)")
  parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> None:
  """Everything from the environment set-up to ``jax.distributed.shutdown``."""
  for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
      sys.path.insert(0, path)
  if args.devices_per_process is not None:
    sys.path.insert(0, str(EXAMPLES))
    import launch  # stdlib only; the one place that edits XLA_FLAGS

    os.environ.update(launch.cpu_env(args.devices_per_process))
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"

  import jax  # only now: XLA_FLAGS and JAX_PLATFORMS are final

  jax.distributed.initialize(
      coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=INITIALIZATION_TIMEOUT_S,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  module_name, _, function_name = args.target.partition(":")
  if not function_name:
    raise ValueError(f"--target must be MODULE:FUNCTION, got {args.target!r}")
  fn = getattr(importlib.import_module(module_name), function_name)
  with open(args.args_file, "rb") as f:
    kwargs = pickle.load(f)
  result = fn(**kwargs)
  tmp = f"{args.result_file}.tmp"
  with open(tmp, "wb") as f:
    pickle.dump(result, f)
  os.replace(tmp, args.result_file)
  jax.distributed.shutdown()


def _exit_now(code: int) -> None:
  """Flushes the output and ends the process at once (no atexit handlers, no teardown)."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs one process of the job, then exits: 0 on success, 1 on any exception."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    _run(args)
  except BaseException:  # anything, SystemExit included, fails the job now
    traceback.print_exc()
    _exit_now(1)
  _exit_now(0)


if __name__ == "__main__":
  main()
