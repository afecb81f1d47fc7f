"""Sharded, verified, preemption-safe checkpoints of parameters and optimizer state (Orbax).

One :class:`orbax.checkpoint.CheckpointManager` step holds two items, saved
with Orbax's own ``StandardSave`` (``args.Composite``): ``params`` and
``opt_state`` (optax NamedTuples, ``MaskedNode``, partition and QK-Clip
states). Every array is written from its shards and read back into the
sharding of the target it is restored onto: the same mesh gives the same
arrays bit for bit (resuming runs the same compiled program on the same
values), and another mesh or process count reshards on read.

Life of a step (:func:`save_checkpoint`, every process, shared storage):

1. Orbax copies the arrays to host memory and returns; the train loop goes on
   while each process writes its own shards in the background
   (``enable_async_checkpointing=True``, the default).
2. Once every process has written, the primary process (0) merges the shards
   (Orbax ``finalize``) and then, still inside the step's temporary
   directory, writes the manifest: size and SHA-256 of every file of both
   items (:data:`MANIFEST`). This runs in Orbax's own finalisation thread, as
   its ``AsyncOptions.post_finalization_callback``.
3. Orbax commits the step (atomic rename, or its commit file on object
   stores), and only then deletes steps beyond ``max_to_keep``.

So a step is visible only with its manifest, a job killed at any moment
leaves either the previous steps or the new one complete, and the step it was
writing stays a temporary directory, which the next manager deletes
(``cleanup_tmp_directories``).

Restoring (:func:`restore_checkpoint`, :func:`restore_latest_valid`) checks a
step against its manifest first: each process checks its share of the files
and the verdicts are gathered, so every process reports the same file and
every process falls back to the same step. Orbax fails deep in TensorStore on
damaged files, sometimes without naming the step, or (a damaged chunk without
a checksum) not at all; the manifest names the step and the file. Only what
the manifest proves damaged is ever deleted; the targets are compared with
the saved arrays (paths, shapes, dtypes) before anything is read; transient
I/O errors are retried, and a step that verifies but still cannot be read
raises, naming it, rather than being skipped.

All file access goes through :mod:`etils.epath`: local paths and ``gs://``
(tested against a GCS emulator, tests/test_checkpoint_gcs.py). Other URL
schemes are refused (Orbax 0.12 cannot write them).

Multi-process rules (``jax.distributed``): every function here is called by
every process with the same arguments (they contain collectives and Orbax
barriers), and the directory must be storage that every process reads and
writes (a shared file system or a bucket). Arrays must be global
``jax.Array``s on the mesh: scalars of the state too (replicate them,
``NamedSharding(mesh, P())``), as a single-device array is not one value
across processes.

Usage::

  manager = make_checkpoint_manager("gs://bucket/run/ckpt", max_to_keep=3)
  step, params, opt_state = restore_latest_valid(manager, params, opt_state)  # resume
  for step in range(step + 1, steps + 1):
    params, opt_state = train_step(params, opt_state, batch(step))
    save_checkpoint(manager, step, params, opt_state)  # returns while Orbax writes
  manager.close()  # waits for the last save
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "MuonClipCheckpointManager",
    "make_checkpoint_manager",
    "restore_checkpoint",
    "restore_latest_valid",
    "save_checkpoint",
    "verify_checkpoint",
]

MANIFEST = "muonclip_manifest.json"
ITEMS = ("params", "opt_state")
_CHUNK = 1 << 20
# Verdicts of one file, gathered across processes (the largest wins).
_OK, _MISSING, _SIZE, _HASH = 0, 1, 2, 3


# TensorStore reports storage faults as ValueError with a status-code prefix;
# these codes are the ones worth retrying (the request may succeed next time).
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")


class CheckpointError(RuntimeError):
  """A checkpoint step that is missing, incomplete or damaged, or cannot be read.

  Attributes:
    step: the step (``None`` when no step is concerned).
    path: the step directory or the offending file.
    reason: what is wrong.
    damaged: the step's manifest proves it damaged: a file it lists is
      missing, of another size or (hashes checked) of other contents. Only
      such steps are ever deleted (:func:`restore_latest_valid`). ``False``
      for everything that proves nothing about the saved data: no or an
      unreadable manifest, or Orbax failing on a step whose files verified.
  """

  def __init__(self, step: int | None, path: Any, reason: str, *, damaged: bool = False):
    self.step, self.path, self.reason, self.damaged = step, str(path), reason, damaged
    where = f"checkpoint step {step} at {path}" if step is not None else f"checkpoints at {path}"
    super().__init__(f"{where}: {reason}")


class MuonClipCheckpointManager(ocp.CheckpointManager):
  """An Orbax ``CheckpointManager`` whose every saved step carries a manifest.

  Build it with :func:`make_checkpoint_manager`. It is an ordinary Orbax
  manager (``save``, ``restore``, ``all_steps``, ``wait_until_finished``,
  ``close``); what it adds runs in Orbax's finalisation thread on the primary
  process, after the shards are merged and before the step is committed: the
  manifest of the step's files (module docstring).

  Attributes:
    blocking: ``save`` waits until the step is committed (the manager was
      made with ``enable_async_checkpointing=False``).
  """

  def __init__(self, directory: epath.PathLike, *, options: ocp.CheckpointManagerOptions,
               blocking: bool = False):
    async_options = ocp.AsyncOptions(post_finalization_callback=self._write_manifest)
    options = ocp.CheckpointManagerOptions(**{
        **{f: getattr(options, f) for f in options.__dataclass_fields__},
        "enable_async_checkpointing": True, "async_options": async_options})
    self.blocking = blocking
    self._name_format = ocp.step.standard_name_format(
        step_prefix=options.step_prefix,
        step_format_fixed_length=options.step_format_fixed_length)
    self._saving: int | None = None  # the step whose finalisation is pending
    super().__init__(epath.Path(directory), options=options, item_names=ITEMS)

  def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
    """Orbax's ``save``; the step gets its manifest when it is finalised."""
    self.wait_until_finished()  # one step in flight: the callback's step is this one
    self._saving = int(step)
    saved = super().save(int(step), *args, **kwargs)
    if saved and self.blocking:
      self.wait_until_finished()
    return saved

  def step_path(self, step: int) -> epath.Path:
    """The directory of a committed ``step``."""
    return ocp.step.build_step_path(self.directory, self._name_format, int(step))

  def _write_manifest(self) -> None:
    """Orbax's post-finalisation callback: the manifest, before the commit."""
    step = self._saving
    if step is None:
      raise RuntimeError("a step was finalised that this manager did not save")
    final = self.step_path(step)
    tmp = final.parent / (final.name + ocp.step.TMP_DIR_SUFFIX)
    write_manifest(step, tmp if tmp.exists() else final)


def make_checkpoint_manager(directory: str | os.PathLike[str], *, max_to_keep: int | None = 3,
                            save_interval_steps: int = 1,
                            enable_async_checkpointing: bool = True
                            ) -> MuonClipCheckpointManager:
  """A checkpoint manager for ``params`` and ``opt_state`` (module docstring).

  Args:
    directory: where step directories go (created if missing), shared by
      every process: a local path (made absolute; a network file system for
      several hosts) or ``gs://BUCKET/PATH``.
    max_to_keep: steps kept (older ones are deleted once a newer step is
      committed); keep at least 2 so a damaged newest step leaves one to fall
      back on. ``None`` keeps all.
    save_interval_steps: :func:`save_checkpoint` saves only steps that are a
      multiple of this (unless ``force``).
    enable_async_checkpointing: :func:`save_checkpoint` returns once the
      arrays are copied to host memory and writes in the background; with
      ``False`` it returns once the step is committed.

  Returns:
    The manager. Temporary directories left by a job killed mid-save are
    deleted in the background from its construction on. Close it with
    ``manager.close()``, which waits for a save in flight.

  Raises:
    ValueError: ``directory`` is empty, an existing file, or a URL of
      another scheme than ``gs://`` (``s3://`` and the like: Orbax 0.12
      cannot write them); ``max_to_keep`` or ``save_interval_steps`` below 1.
  """
  directory = _checked_directory(directory)
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"max_to_keep: expected None or >= 1, got {max_to_keep}")
  if save_interval_steps < 1:
    raise ValueError(f"save_interval_steps: expected >= 1, got {save_interval_steps}")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
      cleanup_tmp_directories=True)
  return MuonClipCheckpointManager(directory, options=options,
                                   blocking=not enable_async_checkpointing)


def _checked_directory(directory: str | os.PathLike[str]) -> epath.Path:
  """``directory`` as an absolute local path or a ``gs://`` path, or a clear error."""
  text = os.fspath(directory)
  text = text.decode() if isinstance(text, bytes) else text
  supported = ("a local directory (shared by every process: a network file system) or "
               "gs://BUCKET/PATH")
  if not text.strip():
    raise ValueError(f"directory: empty path {text!r}; give {supported}")
  scheme, sep, rest = text.partition("://")
  if sep:
    if scheme != "gs":
      raise ValueError(f"directory: {text!r} uses the scheme {scheme + '://'!r}, which "
                       f"Orbax {ocp.__version__} cannot write checkpoints to; give "
                       f"{supported} (for other object stores, mount them as a file system)")
    if not rest.split("/", 1)[0]:
      raise ValueError(f"directory: {text!r} names no bucket; give gs://BUCKET/PATH")
    return epath.Path(text)
  path = epath.Path(os.path.abspath(text))
  if path.exists() and not path.is_dir():
    raise ValueError(f"directory: {text!r} is an existing file, not a directory; give "
                     "a directory for the checkpoint steps (it is created if missing)")
  return path


def _require(manager: Any) -> MuonClipCheckpointManager:
  if not isinstance(manager, MuonClipCheckpointManager):
    raise TypeError("manager: expected the manager of muonclip_jax.make_checkpoint_manager "
                    f"(which writes the manifests), got {type(manager).__name__}")
  return manager


# --------------------------------------------------------------------------
# The manifest.


def _tree(directory: epath.Path, prefix: str) -> Iterator[tuple[str, epath.Path]]:
  """``(prefix + relative name, path)`` of every file under ``directory``, recursively.

  Lists with ``iterdir``, which keeps the ``epath.Path`` of each entry (its
  ``gs://`` scheme included): ``walk()`` on ``gs://`` yields folder names
  without the scheme, and ``rglob`` refuses ``gs://``.
  """
  for child in sorted(directory.iterdir(), key=lambda c: c.name):
    if child.is_dir():
      yield from _tree(child, f"{prefix}{child.name}/")
    else:
      yield prefix + child.name, child


def _files(root: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  """``(path relative to root, path)`` of every file of the items, in order."""
  for item in ITEMS:
    base = root / item
    if base.exists():
      yield from _tree(base, item + "/")


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(step: int, root: epath.Path) -> None:
  """Writes :data:`MANIFEST` (size and SHA-256 of every item file) into ``root``."""
  files = {rel: {"size": p.stat().length, "sha256": _sha256(p)}
           for rel, p in sorted(_files(root))}
  for item in ITEMS:
    if not any(rel.startswith(item + "/") for rel in files):
      raise CheckpointError(step, root / item, f"item {item!r} has no files to record")
  (root / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _is_transient(error: BaseException) -> bool:
  """An I/O error that may not happen again: worth a retry (a missing file is not)."""
  if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
    return False  # the same call fails the same way next time
  if isinstance(error, OSError):  # ConnectionError, TimeoutError, EIO, ...
    return True
  return isinstance(error, ValueError) and str(error).startswith(_TRANSIENT_STATUS)


def _retrying(fn: Any, what: str, retries: int, backoff_s: float) -> Any:
  """``fn()``, retried up to ``retries`` times on transient I/O errors, with backoff."""
  for attempt in range(retries + 1):
    try:
      return fn()
    except Exception as e:  # only transient ones are retried, the rest re-raised
      if attempt == retries or not _is_transient(e):
        raise
      delay = backoff_s * 2 ** attempt
      warnings.warn(f"{what}: {type(e).__name__}: {e}; retrying in {delay:g} s "
                    f"({attempt + 1} of {retries})", RuntimeWarning, stacklevel=3)
      time.sleep(delay)
  raise AssertionError("unreachable")


def _invalidate_listings(path: epath.Path) -> None:
  """Drops the cached directory listings of ``path``'s file system (gcsfs caches them).

  A listing cached before a file was deleted says it exists, and reading it
  then raises ``FileNotFoundError``; verification must see the store as it is.
  """
  backend = getattr(path, "_backend", None)  # etils: fsspec for gs://, os for local
  fs = getattr(backend, "fs", None)
  if fs is None or "://" not in os.fspath(path):
    return
  try:
    fs(os.fspath(path)).invalidate_cache()
  except Exception as e:  # noqa: BLE001  (say so: a stale listing hides deleted files)
    warnings.warn(f"could not refresh the cached listings of {path} ({type(e).__name__}: "
                  f"{e}); files deleted since they were listed may look present",
                  RuntimeWarning, stacklevel=2)


def _check_file(full: epath.Path, meta: dict[str, Any], check_hashes: bool,
                retries: int = 2, backoff_s: float = 0.5) -> int:
  """The verdict of one file; a file that vanishes while it is read is missing."""
  def check() -> int:
    if not full.exists():
      return _MISSING
    if full.stat().length != meta["size"]:
      return _SIZE
    if check_hashes and _sha256(full) != meta["sha256"]:
      return _HASH
    return _OK
  try:
    return _retrying(check, f"reading {full}", retries, backoff_s)
  except FileNotFoundError:  # listed (a stale listing) but gone
    return _MISSING


def _gather_max(codes: np.ndarray) -> np.ndarray:
  """Elementwise max of ``codes`` over processes (the same result on every process)."""
  if jax.process_count() == 1:
    return codes
  return np.asarray(multihost_utils.process_allgather(codes)).max(axis=0)


def _read_manifest(step: int, path: epath.Path) -> tuple[dict[str, Any], bytes]:
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise CheckpointError(step, path, "no manifest: the save did not finish, or the step "
                          "was not written by save_checkpoint") from None
  try:
    files = json.loads(raw)["files"]
    if not isinstance(files, dict):
      raise TypeError("'files' is not a mapping")
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(step, path, f"unreadable manifest ({e})") from e
  return files, raw


def _agreed_manifest(step: int, path: epath.Path) -> dict[str, Any]:
  """The manifest every process read, or the same error on every process."""
  try:
    files, raw = _read_manifest(step, path)
    status = np.frombuffer(hashlib.sha256(raw).digest(), np.uint8).astype(np.int32)
  except CheckpointError as e:
    files, error = {}, e
    status = np.full(32, -1, np.int32)
  everyone = (np.asarray(multihost_utils.process_allgather(status))
              if jax.process_count() > 1 else status[None])
  if (everyone < 0).any():
    bad = int(np.argmax((everyone < 0).any(axis=1)))
    if bad == jax.process_index():
      raise error
    raise CheckpointError(step, path, f"process {bad} could not read the manifest")
  if (everyone != everyone[0]).any():
    raise CheckpointError(step, path, "processes read different manifests")
  return files


def verify_checkpoint(manager: MuonClipCheckpointManager, step: int, *,
                      check_hashes: bool = True) -> None:
  """Checks ``step`` against its manifest, on every process.

  Each process checks its share of the files (size, and with ``check_hashes``
  the SHA-256) and the verdicts are gathered, so the same error is raised on
  every process.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    step: a committed step.
    check_hashes: also compare contents (reads every file once, split over
      the processes); ``False`` checks presence and sizes only.

  Returns:
    ``None``: the step is intact (it raises otherwise).

  Raises:
    CheckpointError: naming the step and the file, for a missing step,
      manifest or file, a file of the wrong size (truncated) or, with
      ``check_hashes``, with changed contents. Its ``damaged`` is ``True``
      when the manifest proves the step damaged (a listed file missing, of
      another size or contents), ``False`` when there is no readable manifest.
  """
  manager = _require(manager)
  step = int(step)
  root = manager.step_path(step)
  _invalidate_listings(root)
  files = _agreed_manifest(step, root / MANIFEST)
  for item in ITEMS:
    if not any(rel.startswith(item + "/") for rel in files):
      raise CheckpointError(step, root / item, f"item {item!r} is not in the manifest")
  names = sorted(files)
  codes = np.zeros(len(names), np.int32)
  me, count = jax.process_index(), jax.process_count()
  for i in range(me, len(names), count):
    codes[i] = _check_file(root / names[i], files[names[i]], check_hashes)
  codes = _gather_max(codes)
  bad = np.flatnonzero(codes)
  if not bad.size:
    return
  i = int(bad[0])
  full, size = root / names[i], files[names[i]]["size"]
  reason = {_MISSING: "file is missing",
            _SIZE: f"file size differs from the {size} bytes the save wrote "
                   "(truncated or overwritten)",
            _HASH: "file contents changed since the save (SHA-256)"}[int(codes[i])]
  raise CheckpointError(step, full, reason, damaged=True)


# --------------------------------------------------------------------------
# Save and restore.


_TARGET_FIX = ("pass targets built as the run that saved it built them (the same model and "
               "optimizer flags: the same init functions, or jax.eval_shape of them)")


def _check_saveable(tree: Any, arg: str) -> None:
  """Refuses leaves that Orbax would save but could not restore onto a target."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
      raise TypeError(
          f"{arg}{jax.tree_util.keystr(path)}: a {type(x).__name__} leaf ({x!r:.40}) cannot "
          "be checkpointed, only arrays can (a restore needs its shape and dtype); make "
          "it an array, e.g. jnp.asarray(x), replicated on a mesh with "
          "jax.device_put(x, NamedSharding(mesh, PartitionSpec()))")


def save_checkpoint(manager: MuonClipCheckpointManager, step: int, params: Any,
                    opt_state: Any, *, force: bool = False) -> bool:
  """Saves ``params`` and ``opt_state`` (sharded) as ``step``; every process calls it.

  With an asynchronous manager (the default) it returns once the arrays are
  copied to host memory; the files, the manifest and the commit follow in the
  background, and the next save, restore or ``manager.close()`` waits for
  them. The donated buffers of a jitted train step may be reused at once.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    step: the training step.
    params: the parameters (global ``jax.Array`` leaves).
    opt_state: the whole optimizer state (array leaves; ``None`` and empty
      nodes such as optax's ``MaskedNode`` are fine).
    force: save even if ``step`` is not on the manager's save interval.

  Returns:
    Whether a save was started: ``False`` off the save interval, or for a
    step not newer than the newest committed one (Orbax's rule).

  Raises:
    TypeError: ``manager`` is not from :func:`make_checkpoint_manager`, or a
      leaf is not an array (a Python ``int``, ``float``, ``str``...): the
      message names the leaf's path. Nothing is written then.
  """
  manager = _require(manager)
  _check_saveable(params, "params")
  _check_saveable(opt_state, "opt_state")
  return manager.save(int(step), args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
      force=force)


def _abstract(tree: Any, arg: str) -> Any:
  """``jax.ShapeDtypeStruct`` with sharding for every array leaf of ``tree``."""
  def leaf(path, x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"{arg}{jax.tree_util.keystr(path)}: a {type(x).__name__} leaf is not "
                      f"an array or jax.ShapeDtypeStruct; {_TARGET_FIX}")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _orbax_name(path: tuple[Any, ...]) -> str:
  """The name Orbax stores a leaf under: its keys joined with dots."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _check_targets(manager: MuonClipCheckpointManager, step: int,
                   targets: dict[str, tuple[str, Any]], retries: int, backoff_s: float) -> None:
  """Raises before any restore if a target leaf differs from what ``step`` holds.

  Orbax casts a saved array to the target's dtype (float32 read into int32
  gives zeros) and fails deep inside TensorStore on another shape; this
  compares every leaf's path, shape and dtype with the step's own metadata.
  """
  for item, (arg, tree) in targets.items():
    directory = manager.step_path(step) / item
    try:
      meta = _retrying(lambda d=directory: ocp.StandardCheckpointHandler().metadata(d),
                       f"reading the metadata of checkpoint step {step}", retries, backoff_s)
    except (OSError, ValueError):  # unreadable: Orbax's restore reports it, retried
      continue
    saved = {m.name: m for m in jax.tree.leaves(meta) if hasattr(m, "name")}
    seen = set()
    for path, t in jax.tree_util.tree_flatten_with_path(tree)[0]:
      where = f"{arg}{jax.tree_util.keystr(path)}"
      name = _orbax_name(path)
      seen.add(name)
      if name not in saved:
        raise ValueError(f"{where}: checkpoint step {step} has no such leaf (its {item} holds "
                         f"{len(saved)} arrays); {_TARGET_FIX}")
      m = saved[name]
      s_shape, s_dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
      if s_shape is None or s_dtype is None:
        continue
      if tuple(s_shape) != tuple(t.shape) or np.dtype(s_dtype) != np.dtype(t.dtype):
        raise ValueError(
            f"{where}: checkpoint step {step} holds shape {tuple(s_shape)} "
            f"{np.dtype(s_dtype).name}, the target is shape {tuple(t.shape)} "
            f"{np.dtype(t.dtype).name}; {_TARGET_FIX}")
    missing = sorted(set(saved) - seen)
    if missing:
      raise ValueError(f"{arg}: checkpoint step {step} holds {item} leaf {missing[0]!r} "
                       f"(and {len(missing) - 1} more) that the target lacks; {_TARGET_FIX}")


def _check_retry_args(retries: int, backoff_s: float) -> None:
  if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
    raise ValueError(f"retries: expected an int >= 0, got {retries!r}")
  if not (isinstance(backoff_s, (int, float)) and 0 <= backoff_s < float("inf")):
    raise ValueError(f"backoff_s: expected a finite number of seconds >= 0, got {backoff_s!r}")


def _targets(params_like: Any, opt_state_like: Any, retries: int, backoff_s: float
             ) -> dict[str, tuple[str, Any]]:
  """``{item: (argument name, abstract target)}`` of a restore, its arguments checked."""
  _check_retry_args(retries, backoff_s)
  return {"params": ("params_like", _abstract(params_like, "params_like")),
          "opt_state": ("opt_state_like", _abstract(opt_state_like, "opt_state_like"))}


def _restore_step(manager: MuonClipCheckpointManager, step: int, targets: dict[str, Any],
                  verify: bool, retries: int, backoff_s: float) -> tuple[Any, Any]:
  """Orbax's restore of ``step`` onto the abstract targets, transient faults retried.

  A failure is checked against the manifest again (sizes, fresh listings):
  a file gone since the verification makes it a damaged step (``damaged``);
  otherwise the step is intact as far as anything shows, and the error says so.
  """
  args = ocp.args.Composite(**{item: ocp.args.StandardRestore(tree)
                               for item, (_, tree) in targets.items()})
  error: Exception | None = None
  try:
    out = _retrying(lambda: manager.restore(step, args=args),
                    f"restoring checkpoint step {step}", retries, backoff_s)
  except Exception as e:  # Orbax/TensorStore raise many types; name the step instead.
    error = e
  # Every process takes the same branch: the checks below gather over processes, so
  # one process failing alone must not leave the others waiting in them.
  if not _gather_max(np.array([error is not None], np.int32))[0]:
    return out["params"], out["opt_state"]
  if verify:
    verify_checkpoint(manager, step, check_hashes=False)  # raises (damaged) on a lost file
  if error is None:
    what = f"process {jax.process_index()} restored it, another process could not"
  else:
    tried = f" (tried {retries + 1} times)" if _is_transient(error) else ""
    what = f"Orbax could not restore it{tried}: {type(error).__name__}: {error}"
  kept = (" Its files match the manifest, so nothing proves it damaged: it was neither "
          "skipped nor deleted;" if verify else "")
  raise CheckpointError(
      step, manager.step_path(step),
      f"{what}.{kept} fix the storage access and try again, or restore an older step with "
      "restore_checkpoint(step=...)") from error


def restore_checkpoint(manager: MuonClipCheckpointManager, params_like: Any,
                       opt_state_like: Any, step: int | None = None, *,
                       verify: bool = True, retries: int = 2, backoff_s: float = 0.5
                       ) -> tuple[Any, Any]:
  """Restores ``(params, opt_state)`` with the shapes, dtypes and shardings of the targets.

  Every process calls it. Waits for a save in flight first. The targets may
  live on another mesh, or another number of processes, than the save's:
  Orbax reads each target shard from the saved ones. Before reading any array
  it compares the targets with what the step holds (each leaf's path, shape
  and dtype) and refuses a mismatch: Orbax would otherwise cast (a float32
  array read into an int32 target is zeros) or fail deep in TensorStore.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    params_like, opt_state_like: arrays or ``jax.ShapeDtypeStruct`` (with
      ``sharding``) of the same tree structure, shapes and dtypes as what was
      saved.
    step: the step; ``None`` for the newest.
    verify: check the step against its manifest first
      (:func:`verify_checkpoint`: every file present, of the saved size and
      SHA-256, which reads the whole step once). ``verify=False`` skips all of
      that: a truncated file, a deleted file or a missing manifest may
      still make Orbax fail, but changed contents (a flipped byte in a chunk
      without a checksum) are restored as they are, without any error, and a
      failure is never recognised as damage. The target check above still runs.
    retries: how many times a transient I/O error (``OSError`` other than
      ``FileNotFoundError``, or a TensorStore ``UNAVAILABLE`` /
      ``DEADLINE_EXCEEDED`` / ``ABORTED`` / ``RESOURCE_EXHAUSTED``) is retried.
    backoff_s: the wait before the first retry, doubled before each next one.

  Returns:
    ``(params, opt_state)``.

  Raises:
    CheckpointError: no checkpoint, or the step is incomplete or damaged (the
      message names the step and the file), or Orbax cannot read it (after
      the retries).
    ValueError: a target leaf's path, shape or dtype differs from the saved
      one (the message names the first such leaf, both shapes and dtypes), or
      bad ``retries``/``backoff_s``. Nothing is read then.
    TypeError: a target leaf is not an array or ``jax.ShapeDtypeStruct``.
  """
  manager = _require(manager)
  targets = _targets(params_like, opt_state_like, retries, backoff_s)
  manager.wait_until_finished()
  if step is None:
    manager.reload()
    steps = _agreed_steps(manager)
    if not steps:
      raise CheckpointError(None, manager.directory, "no checkpoint to restore")
    step = steps[-1]
  step = int(step)
  if verify:
    verify_checkpoint(manager, step)
  _check_targets(manager, step, targets, retries, backoff_s)
  return _restore_step(manager, step, targets, verify, retries, backoff_s)


def _agreed_steps(manager: MuonClipCheckpointManager) -> list[int]:
  """Process 0's list of committed steps, on every process (ascending)."""
  steps = sorted(int(s) for s in manager.all_steps())
  if jax.process_count() == 1:
    return steps
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  padded = np.zeros(n, np.int64)
  if jax.process_index() == 0:
    padded[:] = steps
  return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def restore_latest_valid(manager: MuonClipCheckpointManager, params_like: Any,
                         opt_state_like: Any, *, delete_invalid: bool = True,
                         retries: int = 2, backoff_s: float = 0.5
                         ) -> tuple[int, Any, Any]:
  """The newest step that verifies and restores, skipping damaged ones (with a warning).

  Every process calls it and every process gets the same step: the steps are
  process 0's listing, and each verdict is gathered from all processes.

  Newest first, each step is

  * **skipped and deleted** (``delete_invalid``) when its manifest proves it
    damaged: a file it lists is missing, of another size or of other
    contents. The warning names the step, the file and why.
  * **skipped but kept** when it has no readable manifest (a step not written
    by :func:`save_checkpoint`, or whose manifest was lost): nothing proves
    its data damaged, so it is never deleted, but it cannot be trusted
    either. The warning says so. Orbax saves only steps newer than the newest
    one on disk, so the resumed run's saves up to that step return ``False``
    until you delete it (``manager.delete(step)``) or move it away.
  * **restored** otherwise: the targets are first compared with what it
    holds (a mismatch raises ``ValueError``, before anything is deleted), and
    transient I/O errors of Orbax are retried. If Orbax still fails, and the
    files still match the manifest, it raises: an intact step is never
    skipped in silence, nor deleted.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    params_like, opt_state_like: as for :func:`restore_checkpoint`.
    delete_invalid: delete the steps newer than the restored one that the
      manifest proved damaged (after the warning), so the resumed run can
      save those step numbers again. Nothing else is ever deleted.
    retries, backoff_s: as for :func:`restore_checkpoint`.

  Returns:
    ``(step, params, opt_state)``.

  Raises:
    CheckpointError: when no step is usable (listing why each failed), or
      when Orbax cannot read a step whose files verified (naming the step).
    ValueError: the targets differ from what the step holds (as for
      :func:`restore_checkpoint`); nothing was deleted.
  """
  manager = _require(manager)
  targets = _targets(params_like, opt_state_like, retries, backoff_s)
  manager.wait_until_finished()
  manager.reload()
  errors: list[str] = []
  damaged: list[int] = []

  def skip(e: CheckpointError) -> None:
    errors.append(str(e))
    if e.damaged:
      damaged.append(int(e.step))
      then = " (it will be deleted)" if delete_invalid else ""
      warnings.warn(f"skipping {e}: its manifest proves it damaged{then}",
                    RuntimeWarning, stacklevel=3)
    else:
      warnings.warn(
          f"skipping {e}. It is KEPT, not deleted: nothing proves its data damaged, but it "
          "cannot be verified either. Orbax saves only steps newer than the newest one on "
          f"disk, so saves up to step {e.step} return False until you delete it "
          f"(manager.delete({e.step})) or move it away", RuntimeWarning, stacklevel=3)

  for step in reversed(_agreed_steps(manager)):
    try:
      verify_checkpoint(manager, step)
    except CheckpointError as e:
      skip(e)
      continue
    _check_targets(manager, step, targets, retries, backoff_s)
    try:
      params, opt_state = _restore_step(manager, step, targets, True, retries, backoff_s)
    except CheckpointError as e:
      if not e.damaged:
        raise
      skip(e)
      continue
    if delete_invalid:
      _delete(manager, damaged)
    return step, params, opt_state
  reason = "no usable checkpoint" + (": " + "; ".join(errors) if errors else "")
  raise CheckpointError(None, manager.directory, reason)


def _delete(manager: MuonClipCheckpointManager, steps: Sequence[int]) -> None:
  for step in steps:
    warnings.warn(f"deleting checkpoint step {step} at {manager.step_path(step)}: its "
                  "manifest proved it damaged (see the warning above), and the run can "
                  "save that step again", RuntimeWarning, stacklevel=3)
    manager.delete(step)
