"""Start N local processes of one command as a multi-controller JAX job on this machine.

Run::

  python examples/launch.py --num-processes 2 --devices-per-process 4 -- \\
      python -m examples.lm.train --mesh 4x2 --steps 50

Process ``i`` runs the command with ``--coordinator localhost:PORT --num-processes N
--process-id i`` appended (a free port is picked unless ``--port`` is given), with
``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count=<devices-per-process>``
in its environment, so that ``jax.distributed.initialize`` in the command sees N processes
of that many host devices each.

Supervision:

* Every process runs in its own session (process group); the launcher owns the group and
  ends it with ``SIGKILL``. ``SIGTERM`` is not enough: once ``jax.distributed`` is up,
  JAX's preemption notifier catches ``SIGTERM`` and the process runs on.
* Process 0's stdout and stderr are streamed to the launcher's as they come. Every
  process's output (stdout and stderr together) goes to ``<log-dir>/process_<i>.log``; the
  default log directory is a fresh temporary one, printed at start.
* As soon as one process exits non-zero, or ``--timeout`` seconds pass, every process
  still running is killed (its whole group), the cause and the end of the failing
  process's log are printed to stderr, and the launcher exits with that process's code
  (``128 + signal`` for a signal, 124 on timeout). A stuck peer would otherwise keep the
  others waiting in a collective, or in the ``jax.distributed`` shutdown barrier (300 s
  by default, then ``SIGABRT``).
* ``KeyboardInterrupt`` or ``SIGTERM`` sent to the launcher kill the processes too.
* Children get ``PYTHONUNBUFFERED=1`` (unless set), so a killed process's last lines are
  in its log rather than lost in a stdio buffer.

The same machinery is a small Python API (:func:`launch`, :func:`distributed_commands`,
:func:`cpu_env`), used by the multi-process test runner ``tests/support/distributed.py``. This
module uses only the standard library and does not import jax.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TIMEOUT_EXIT_CODE = 124
_POLL_S = 0.05
_TAIL_BYTES = 1 << 18


@dataclasses.dataclass
class ProcessResult:
  """How one launched process ended.

  Attributes:
    process_id: The process's index in the job (its position in the commands).
    returncode: Its exit status (negative: the signal that ended it), or ``None`` if the
      launcher killed it because another process failed or the timeout passed.
    log: The file holding its stdout and stderr.
    pid: Its process id (also its process-group id); reaped by the time this is returned.
  """

  process_id: int
  returncode: int | None
  log: pathlib.Path
  pid: int

  def tail(self, n: int = 40) -> str:
    """The last ``n`` lines of the process's log (empty if the log is missing)."""
    try:
      with open(self.log, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _TAIL_BYTES))
        data = f.read()
    except OSError:
      return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])

  def describe(self) -> str:
    """How the process ended, in words: ``exit code 1``, ``signal 6 (SIGABRT)``, ..."""
    if self.returncode is None:
      return "killed by the launcher"
    if self.returncode < 0:
      return f"signal {-self.returncode} ({_signal_name(-self.returncode)})"
    return f"exit code {self.returncode}"


class LaunchError(RuntimeError):
  """A launched job failed: a process exited non-zero, the timeout passed, or SIGTERM came.

  Every process that was still running had been killed (with its process group) and
  reaped when this is raised.

  Attributes:
    reason: What went wrong, e.g. ``"process 1 exited with exit code 1"``.
    results: One :class:`ProcessResult` per process, in process order.
    failed: The index of the process whose exit ended the job, or ``None`` (timeout,
      SIGTERM, stop).
    stopped: The caller's ``stop`` predicate asked for the kill (:func:`launch`).
  """

  def __init__(self, reason: str, results: list[ProcessResult], failed: int | None = None,
               tail_lines: int = 40, stopped: bool = False) -> None:
    self.reason = reason
    self.results = results
    self.failed = failed
    self.stopped = stopped
    parts = [reason]
    for r in results:
      parts.append(f"--- process {r.process_id} (pid {r.pid}, {r.describe()}); "
                   f"last {tail_lines} lines of {r.log} ---")
      parts.append(r.tail(tail_lines) or "(empty log)")
    super().__init__("\n".join(parts))

  @property
  def exit_code(self) -> int:
    """The exit status for a launcher that failed this way (shell conventions)."""
    if self.failed is None:
      return TIMEOUT_EXIT_CODE
    rc = self.results[self.failed].returncode
    if rc is None or rc == 0:
      return 1
    return 128 - rc if rc < 0 else rc


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago (bind to port 0, read, close).

  Another program may take it before the coordinator binds it; the window is short.
  """
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return int(s.getsockname()[1])


def distributed_commands(command: Sequence[str], num_processes: int,
                         port: int | None = None) -> list[list[str]]:
  """The per-process commands of a ``jax.distributed`` job on this machine.

  Args:
    command: The program and its arguments, shared by every process.
    num_processes: How many processes the job has.
    port: The coordinator's port on localhost; a free one (:func:`free_port`) if ``None``.

  Returns:
    ``num_processes`` commands: ``command`` followed by ``--coordinator localhost:PORT
    --num-processes N --process-id i``.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be at least 1, got {num_processes}")
  port = free_port() if port is None else port
  return [[*command, "--coordinator", f"localhost:{port}", "--num-processes",
           str(num_processes), "--process-id", str(i)] for i in range(num_processes)]


def cpu_env(devices_per_process: int, base: Mapping[str, str] | None = None, *,
            platform: str = "cpu") -> dict[str, str]:
  """An environment for a JAX process with ``devices_per_process`` host devices.

  Args:
    devices_per_process: The value of ``--xla_force_host_platform_device_count``; any such
      flag already in ``XLA_FLAGS`` is replaced, the other flags are kept.
    base: The environment to start from; ``os.environ`` if ``None``.
    platform: The value of ``JAX_PLATFORMS``.

  Returns:
    A new dict; ``base`` is not modified.
  """
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process must be at least 1, got {devices_per_process}")
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if f != DEVICE_COUNT_FLAG and not f.startswith(DEVICE_COUNT_FLAG + "=")]
  flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = platform
  return env


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return "unknown signal"


class _Terminated(BaseException):
  """Raised in the main thread by the launcher's SIGTERM handler."""


class _Signals:
  """The launcher's SIGTERM/SIGINT handling while children run (main thread only).

  While running, SIGTERM raises :class:`_Terminated` (SIGINT keeps raising
  ``KeyboardInterrupt``). While cleaning up, both are only recorded, so a second signal
  cannot interrupt the killing of the children; they are acted on afterwards.
  """

  def __init__(self) -> None:
    self.previous: dict[int, Any] = {}
    self.deferring = False
    self.pending: list[int] = []

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.deferring:
      self.pending.append(signum)
    elif signum == signal.SIGTERM:
      raise _Terminated()
    else:
      raise KeyboardInterrupt()

  def install(self) -> None:
    """Takes over SIGTERM (and SIGINT if it has Python's default handler)."""
    if threading.current_thread() is not threading.main_thread():
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      current = signal.getsignal(signum)
      if signum == signal.SIGTERM and current == signal.SIG_IGN:
        continue
      if signum == signal.SIGINT and current is not signal.default_int_handler:
        continue
      self.previous[signum] = current
      signal.signal(signum, self._handle)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Records instead of raising while the body runs."""
    self.deferring = True
    try:
      yield
    finally:
      self.deferring = False

  def restore(self) -> None:
    """Puts the previous handlers back."""
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
    self.previous.clear()


def _stream(pipe: IO[bytes], log: IO[bytes], lock: threading.Lock,
            out: Callable[[], IO[str] | None]) -> None:
  """Copies ``pipe`` to ``log`` and to the stream ``out()`` returns, as output arrives.

  Reads whatever the child has written (``read1``), so lines go through one by one as the
  child writes them, and so do ``\\r`` progress-bar updates.
  """
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
  with pipe:
    while chunk := pipe.read1(1 << 16):  # type: ignore[attr-defined]
      with lock:
        log.write(chunk)
        log.flush()
      stream = out()
      if stream is not None:
        try:
          stream.write(decoder.decode(chunk))
          stream.flush()
        except (OSError, ValueError):  # closed or broken stream: keep logging
          pass


def _kill_group(pid: int) -> None:
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(pid, signal.SIGKILL)


def launch(commands: Sequence[Sequence[str]], *,
           env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
           timeout: float | None = None, log_dir: str | os.PathLike[str] | None = None,
           stream_process: int | None = 0,
           cwd: str | os.PathLike[str] | None = None,
           stop: Callable[[], str | None] | None = None) -> list[ProcessResult]:
  """Runs one command per process, concurrently, and supervises them as one job.

  Each process runs in its own session (``start_new_session=True``). The launcher polls
  them; as soon as one exits non-zero or ``timeout`` passes, every process still running
  is sent ``SIGKILL`` with its whole process group, all are reaped, and
  :class:`LaunchError` is raised. When all exit 0, anything left in their process groups
  is killed too and the results are returned. ``KeyboardInterrupt`` and (when called from
  the main thread) ``SIGTERM`` also kill every process before they take effect.

  Args:
    commands: The command of each process, in process order.
    env: The environment of every process (a mapping), or one per process (a sequence);
      ``os.environ`` if ``None``. ``PYTHONUNBUFFERED=1`` is added unless set.
    timeout: Seconds after which the job is killed; no limit if ``None``.
    log_dir: Where ``process_<i>.log`` (stdout and stderr of process ``i``) is written;
      created if missing; a fresh temporary directory if ``None``.
    stream_process: The process whose stdout/stderr are also copied, as they come, to
      ``sys.stdout``/``sys.stderr``; ``None`` for none.
    cwd: The working directory of the processes; the launcher's if ``None``.
    stop: Polled while the processes run (every few tens of milliseconds); when it
      returns a string, every process is killed as on timeout, and :class:`LaunchError`
      is raised with ``stopped`` set and that string in its reason. For simulating a
      preemption at a chosen moment (the whole job SIGKILLed at once).

  Returns:
    One :class:`ProcessResult` per process, in process order, all with return code 0.

  Raises:
    LaunchError: A process exited non-zero (``failed`` says which), the timeout passed,
      or the launcher got ``SIGTERM`` and its previous handler returned.
    ValueError: Empty ``commands``, or ``env``/``stream_process`` do not fit them.
  """
  n = len(commands)
  if n == 0:
    raise ValueError("no commands to launch")
  if env is None or isinstance(env, Mapping):
    envs = [dict(os.environ if env is None else env) for _ in range(n)]
  else:
    envs = [dict(e) for e in env]
    if len(envs) != n:
      raise ValueError(f"{len(envs)} environments for {n} commands")
  for e in envs:
    e.setdefault("PYTHONUNBUFFERED", "1")
  if stream_process is not None and not 0 <= stream_process < n:
    raise ValueError(f"stream_process {stream_process} is not a process of {n}")
  logs_root = pathlib.Path(tempfile.mkdtemp(prefix="launch-") if log_dir is None else log_dir)
  logs_root.mkdir(parents=True, exist_ok=True)
  logs = [logs_root / f"process_{i}.log" for i in range(n)]

  procs: list[subprocess.Popen[bytes]] = []
  threads: list[threading.Thread] = []
  open_logs: list[IO[bytes]] = []
  killed: set[int] = set()
  failed: int | None = None
  reason = ""
  signals = _Signals()
  signals.install()
  terminated = stopped = False
  try:
    for i, command in enumerate(commands):
      log = open(logs[i], "wb")  # closed in the finally block
      open_logs.append(log)
      streamed = i == stream_process
      proc = subprocess.Popen(
          list(command), env=envs[i], cwd=cwd, stdin=subprocess.DEVNULL,
          stdout=subprocess.PIPE if streamed else log,
          stderr=subprocess.PIPE if streamed else subprocess.STDOUT,
          start_new_session=True)
      procs.append(proc)
      if streamed:
        assert proc.stdout is not None and proc.stderr is not None
        lock = threading.Lock()
        for pipe, out in ((proc.stdout, lambda: sys.stdout), (proc.stderr, lambda: sys.stderr)):
          thread = threading.Thread(target=_stream, args=(pipe, log, lock, out), daemon=True,
                                    name=f"launch-stream-{i}")
          thread.start()
          threads.append(thread)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      bad = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
      if bad:
        failed = bad[0]
        rc = codes[failed]
        assert rc is not None
        how = (f"was killed by signal {-rc} ({_signal_name(-rc)})" if rc < 0
               else f"exited with code {rc}")
        reason = f"process {failed} {how}"
        break
      if all(rc == 0 for rc in codes):
        break
      if deadline is not None and time.monotonic() >= deadline:
        running = [i for i, rc in enumerate(codes) if rc is None]
        reason = f"timeout: {timeout:g} s passed with processes {running} still running"
        break
      if stop is not None and (why := stop()):
        stopped, reason = True, f"stopped: {why}"
        break
      time.sleep(_POLL_S)
  except _Terminated:
    terminated = True
    reason = "the launcher got SIGTERM"
  finally:
    with signals.deferred():
      for i, p in enumerate(procs):
        if p.poll() is None:
          killed.add(i)
        _kill_group(p.pid)  # also whatever the process left behind in its group
      for p in procs:
        p.wait()
      for thread in threads:
        thread.join(timeout=5.0)
      for log in open_logs:
        log.close()
    signals.restore()
    for signum in signals.pending:
      signal.raise_signal(signum)  # the previous handler acts on it now
  results = [ProcessResult(i, None if i in killed else p.returncode, logs[i], p.pid)
             for i, p in enumerate(procs)]
  if terminated:
    signal.raise_signal(signal.SIGTERM)  # default handler: the launcher dies of SIGTERM
    raise LaunchError(reason, results)
  if failed is not None or killed:
    raise LaunchError(reason, results, failed, stopped=stopped)
  return results


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  if "--" not in argv:
    raise SystemExit("launch: give the command after '--', e.g. "
                     "launch.py --num-processes 2 -- python train.py")
  split = argv.index("--")
  command = argv[split + 1:]
  parser = argparse.ArgumentParser(
      prog="launch.py",
      description="Run N local processes of COMMAND as one jax.distributed job; each gets "
                  "--coordinator/--num-processes/--process-id appended.",
      usage="%(prog)s [options] -- COMMAND [ARG ...]")
  parser.add_argument("--num-processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--devices-per-process", type=int, default=1,
                      help="host devices per process (XLA_FLAGS device-count flag; default 1)")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS (default cpu)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="kill the job after this many seconds (exit 124; default: none)")
  parser.add_argument("--log-dir", default=None,
                      help="directory for process_<i>.log (default: a fresh temp dir)")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on localhost (default: a free one)")
  args = parser.parse_args(argv[:split])
  if not command:
    parser.error("no command after '--'")
  return args, command


def main(argv: Sequence[str] | None = None) -> int:
  """The command-line launcher (see the module docstring); returns the exit status."""
  args, command = _parse_args(sys.argv[1:] if argv is None else argv)
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="launch-")
  commands = distributed_commands(command, args.num_processes, args.port)
  coordinator = commands[0][commands[0].index("--coordinator") + 1]
  print(f"launch: {args.num_processes} processes x {args.devices_per_process} "
        f"{args.platform} devices, coordinator {coordinator}, logs in {log_dir}",
        file=sys.stderr, flush=True)
  env = cpu_env(args.devices_per_process, platform=args.platform)
  try:
    launch(commands, env=env, timeout=args.timeout, log_dir=log_dir, stream_process=0)
  except KeyboardInterrupt:
    print("launch: interrupted; all processes killed", file=sys.stderr, flush=True)
    return 130
  except OSError as err:  # the command could not be started; any started process is killed
    print(f"launch: cannot run {command[0]!r}: {err}", file=sys.stderr, flush=True)
    return 127
  except LaunchError as err:
    shown = ([err.results[err.failed]] if err.failed is not None
             else [r for r in err.results if r.returncode is None])
    print(f"launch: {err.reason}; every process still running was killed", file=sys.stderr)
    for r in shown:
      print(f"--- process {r.process_id} ({r.describe()}): last 40 lines of {r.log} ---",
            file=sys.stderr)
      print(r.tail(40) or "(empty log)", file=sys.stderr)
    print(f"launch: logs in {log_dir}", file=sys.stderr, flush=True)
    return err.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main())
