"""The multi-process test runner (tests/support/distributed.py) and examples/launch.py
cannot hang the suite.

A real two-process ``jax.distributed`` job (4 host CPU devices each) returns what each
process computed; a process that raises, or hangs, fails the test quickly with its log,
and every process is SIGKILLed and reaped. The launcher's command line streams process
0, propagates exit codes, and kills its children when it is itself interrupted or
terminated. The jax-free tests use plain ``python -c`` children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.distributed import DistributedRunError, run_distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch.py"
sys.path.insert(0, str(ROOT / "examples"))

import launch  # noqa: E402

INIT_SNIPPET = """
import sys
import jax
argv = sys.argv
value = lambda flag: argv[argv.index(flag) + 1]
jax.distributed.initialize(
    coordinator_address=value("--coordinator"), num_processes=int(value("--num-processes")),
    process_id=int(value("--process-id")), initialization_timeout=20,
    heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
print(f"process {jax.process_index()} of {jax.process_count()}: "
      f"{len(jax.local_devices())} local, {len(jax.devices())} global devices", flush=True)
jax.distributed.shutdown()
"""

# Prints its pid, then sleeps; process 1 exits with code 3 if asked to.
SLEEPER = """
import os, sys, time
print("pid", os.getpid(), flush=True)
if sys.argv[-1] == "1" and "fail" in sys.argv:
  time.sleep(0.3)
  print("process 1 fails now", flush=True)
  sys.exit(3)
time.sleep(100)
"""


def assert_gone(pid: int) -> None:
  """The process and its whole process group no longer exist (killed and reaped)."""
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  with pytest.raises(ProcessLookupError):
    os.killpg(pid, 0)


def test_two_processes_see_one_job_and_a_global_array(tmp_path):
  results = run_distributed("support.workers_basic:topology_and_global_sum", tmp_path=tmp_path)
  # support.workers_basic.local_rows(i): arange(12).reshape(4, 3) + 100 i (not imported: jax).
  total = float(sum((np.arange(12.0) + 100.0 * i).sum() for i in range(2)))
  assert total == 1332.0
  assert results == [(0, 2, 8, 4, total), (1, 2, 8, 4, total)]


def test_exception_on_one_process_fails_fast_and_kills_all(tmp_path):
  start = time.monotonic()
  with pytest.raises(DistributedRunError) as info:
    run_distributed("support.workers_basic:raise_on", tmp_path=tmp_path,
                    args={"process_index": 1, "message": "boom from process 1"})
  elapsed = time.monotonic() - start
  err = info.value
  assert elapsed < 30, elapsed
  assert err.reason == "process 1 exited with code 1"
  assert "ValueError: boom from process 1" in str(err)
  assert [r.returncode for r in err.results] == [None, 1]  # process 0 waited; it was killed
  for r in err.results:
    assert_gone(r.pid)


def test_hung_process_is_killed_at_the_timeout(tmp_path):
  start = time.monotonic()
  with pytest.raises(DistributedRunError, match="timeout: 8 s passed") as info:
    run_distributed("support.workers_basic:hang_on", tmp_path=tmp_path, timeout=8,
                    args={"process_index": 1})
  elapsed = time.monotonic() - start
  assert 8 <= elapsed < 20, elapsed
  assert [r.returncode for r in info.value.results] == [None, None]
  for r in info.value.results:
    assert_gone(r.pid)


def test_cli_runs_a_jax_job_and_streams_process_0(tmp_path):
  logs = tmp_path / "logs"
  proc = subprocess.run(
      [sys.executable, str(LAUNCH), "--num-processes", "2", "--devices-per-process", "2",
       "--timeout", "60", "--log-dir", str(logs), "--", sys.executable, "-c", INIT_SNIPPET],
      capture_output=True, text=True, timeout=90, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "process 0 of 2: 2 local, 4 global devices" in proc.stdout
  assert "process 1 of 2" not in proc.stdout + proc.stderr  # only in its log
  assert "process 1 of 2: 2 local, 4 global devices" in (logs / "process_1.log").read_text()
  assert "process 0 of 2" in (logs / "process_0.log").read_text()
  assert f"logs in {logs}" in proc.stderr


def test_cli_returns_the_failing_process_code_with_its_log(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(LAUNCH), "--num-processes", "3", "--log-dir", str(tmp_path), "--",
       sys.executable, "-c", SLEEPER, "fail"],
      capture_output=True, text=True, timeout=30)
  assert proc.returncode == 3, proc.stderr
  assert "process 1 exited with code 3" in proc.stderr
  assert "process 1 fails now" in proc.stderr  # the tail of its log
  pids = [int((tmp_path / f"process_{i}.log").read_text().split()[1]) for i in range(3)]
  for pid in pids:
    assert_gone(pid)


def test_cli_timeout_exits_124(tmp_path):
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(LAUNCH), "--timeout", "1", "--log-dir", str(tmp_path), "--",
       sys.executable, "-c", SLEEPER],
      capture_output=True, text=True, timeout=30)
  assert proc.returncode == launch.TIMEOUT_EXIT_CODE, proc.stderr
  assert time.monotonic() - start < 10
  assert "timeout" in proc.stderr


@pytest.mark.parametrize(("signum", "returncode"), [(signal.SIGTERM, -signal.SIGTERM),
                                                    (signal.SIGINT, 130)])
def test_cli_kills_its_processes_when_interrupted(tmp_path, signum, returncode):
  # The launcher handles SIGINT only with Python's default handler (a Ctrl-C in a
  # terminal). A suite started in the background (nohup, `&`, some CI runners)
  # inherits SIGINT ignored, which the launcher then rightly keeps: so it runs under a
  # two-line wrapper that restores the default handler (no preexec_fn: forking a
  # multithreaded process to run Python code can deadlock).
  wrapper = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
             " sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
  launcher = subprocess.Popen(
      [sys.executable, "-c", wrapper, str(LAUNCH), "--log-dir", str(tmp_path), "--",
       sys.executable, "-c", SLEEPER],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  try:
    deadline = time.monotonic() + 20
    while not all(log.exists() and log.read_text().startswith("pid") for log in logs):
      assert time.monotonic() < deadline and launcher.poll() is None
      time.sleep(0.05)
    pids = [int(log.read_text().split()[1]) for log in logs]
    launcher.send_signal(signum)
    launcher.communicate(timeout=10)
  finally:
    if launcher.poll() is None:  # the test failed: do not leave the job behind
      launcher.kill()
      launcher.communicate()
  assert launcher.returncode == returncode
  for pid in pids:
    assert_gone(pid)


def test_launch_api_reports_every_process(tmp_path):
  results = launch.launch(
      [[sys.executable, "-c", f"print('hello from {i}')"] for i in range(3)],
      log_dir=tmp_path, stream_process=None)
  assert [(r.process_id, r.returncode) for r in results] == [(0, 0), (1, 0), (2, 0)]
  assert [r.tail() for r in results] == [f"hello from {i}" for i in range(3)]


def test_launch_stop_kills_the_whole_job_at_the_chosen_moment(tmp_path):
  """``stop`` (used to simulate preemption) SIGKILLs every process once it says why."""
  marker = tmp_path / "ready"
  code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(100)"
  start = time.monotonic()
  with pytest.raises(launch.LaunchError) as err:
    launch.launch([[sys.executable, "-c", code]] * 2, log_dir=tmp_path, stream_process=None,
                  stop=lambda: "preempted" if marker.exists() else None, timeout=60)
  assert time.monotonic() - start < 20
  assert err.value.stopped and err.value.reason == "stopped: preempted"
  assert [r.returncode for r in err.value.results] == [None, None]
  for r in err.value.results:
    assert_gone(r.pid)


def test_distributed_commands_and_cpu_env():
  commands = launch.distributed_commands(["python", "t.py"], 2, port=1234)
  assert commands == [
      ["python", "t.py", "--coordinator", "localhost:1234", "--num-processes", "2",
       "--process-id", str(i)] for i in range(2)]
  port = launch.free_port()
  assert 0 < port < 65536
  base = {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8 --b", "HOME": "/h"}
  env = launch.cpu_env(4, base)
  assert env == {"XLA_FLAGS": "--a=1 --b --xla_force_host_platform_device_count=4",
                 "HOME": "/h", "JAX_PLATFORMS": "cpu"}
  assert base["XLA_FLAGS"].endswith("=8 --b")  # not modified
  assert launch.cpu_env(2, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
