"""Input pipeline: the embedded standard-library corpus and per-process, resumable batches.

:func:`default_corpus` gathers text from a fixed list of files of the Python
standard library on this machine (no download); :class:`ByteData` splits any
bytes into train/validation and samples windows deterministically from
``(seed, step)``, so a resumed run sees the same batches, and each process of a
multi-process run reads only its own rows of each batch (``rows=``).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

# Files of the standard library that make up the default corpus, in order.
# Missing ones (they differ between Python versions) are skipped.
STDLIB_FILES = (
    "textwrap.py", "functools.py", "heapq.py", "bisect.py", "random.py",
    "statistics.py", "fractions.py", "string.py", "dataclasses.py", "enum.py",
    "collections/__init__.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "contextlib.py", "abc.py", "copy.py", "pprint.py",
    "calendar.py", "csv.py", "argparse.py", "difflib.py", "shutil.py",
    "tempfile.py", "pathlib.py", "inspect.py", "typing.py", "doctest.py",
    "unittest/case.py", "logging/__init__.py", "threading.py", "zipfile.py",
    "subprocess.py", "tarfile.py", "_pydecimal.py",
)


# --------------------------------------------------------------------------
# Data.


def default_corpus(max_bytes: int = 1 << 20) -> bytes:
  """Text of a fixed list of standard-library files, concatenated, at most ``max_bytes``.

  The files come from ``sysconfig.get_paths()['stdlib']`` in the order of
  :data:`STDLIB_FILES`; each is preceded by a ``# file: NAME`` line. The result
  is the same on every run on one machine (it depends on the Python version).

  Raises:
    FileNotFoundError: none of the files exists (an unusual Python install;
      pass ``--text PATH`` instead).
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  parts: list[bytes] = []
  total = 0
  for name in STDLIB_FILES:
    path = root / name
    if not path.is_file():
      continue
    chunk = f"# file: {name}\n".encode() + path.read_bytes() + b"\n"
    parts.append(chunk)
    total += len(chunk)
    if total >= max_bytes:
      break
  if not parts:
    raise FileNotFoundError(f"no standard-library source found under {root}; use --text PATH")
  return b"".join(parts)[:max_bytes]


def load_text(path: str | os.PathLike[str] | None = None, max_bytes: int = 1 << 20) -> bytes:
  """The bytes of ``path``, or :func:`default_corpus` when ``path`` is ``None``."""
  if path is None:
    return default_corpus(max_bytes)
  data = Path(path).read_bytes()
  return data[:max_bytes] if max_bytes else data


class ByteData:
  """Bytes split into a training head and a validation tail, sampled in windows.

  Args:
    data: the corpus.
    seq_len: tokens per example; windows have ``seq_len + 1`` bytes (inputs
      and shifted targets).
    val_fraction: share of the corpus (at its end) held out for validation.
  """

  def __init__(self, data: bytes, seq_len: int, val_fraction: float = 0.1) -> None:
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    arr = np.frombuffer(data, dtype=np.uint8)
    n_val = int(len(arr) * val_fraction)
    self.seq_len = seq_len
    self.train = arr[: len(arr) - n_val]
    self.val = arr[len(arr) - n_val:]
    for name, part in (("training", self.train), ("validation", self.val)):
      if len(part) < seq_len + 2:
        raise ValueError(f"the {name} split has {len(part)} bytes, fewer than seq_len + 2 = "
                         f"{seq_len + 2}; use a longer text or a shorter --seq-len")

  def _windows(self, part: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-byte targets of the windows starting at ``starts``."""
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    w = part[idx].astype(np.int32)
    return w[:, :-1], w[:, 1:]

  def train_batch(self, seed: int, step: int, batch: int, rows: slice = slice(None)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets ``(batch, seq_len)`` for training step ``step``.

    A pure function of ``(seed, step)``: resuming at ``step`` replays the batches.
    ``rows`` selects rows of that global batch (a process's share of it): only
    their windows are read.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=batch)
    return self._windows(self.train, starts[rows])

  def val_batches(self, batch: int, num_batches: int, rows: slice = slice(None)
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``num_batches`` fixed validation batches of evenly spaced windows.

    ``rows`` selects rows of each batch, as in :meth:`train_batch`.
    """
    n_windows = (len(self.val) - 1) // self.seq_len
    n = max(1, min(num_batches, n_windows // batch))
    count = min(n * batch, n_windows)
    starts = np.linspace(0, len(self.val) - self.seq_len - 1, count).astype(np.int64)
    starts = np.resize(starts, n * batch)
    return [self._windows(self.val, starts[i * batch:(i + 1) * batch][rows]) for i in range(n)]
