"""Sharded checkpoints of parameters and the whole optimizer state, with Orbax.

One :class:`orbax.checkpoint.CheckpointManager` step holds two items, saved
with Orbax's own ``StandardSave`` (``args.Composite``): ``params`` and
``opt_state`` (optax NamedTuples, ``MaskedNode``, partition and QK-Clip
states). Every array is written from its shards and read back into the
sharding of the target it is restored onto, so restoring onto the same mesh
gives the same arrays, bit for bit, on the same devices: continuing from a
restored step runs the same compiled program on the same values as never
stopping.

Integrity. Orbax finalises a step atomically (a crash mid-save leaves a
temporary directory that ``all_steps`` ignores), but a finalised step can
still lose or damage files afterwards (a full disk, a partial copy, a deleted
shard), and Orbax then fails deep in TensorStore, sometimes without naming
the step, or (for a damaged chunk without a checksum) not at all.
:func:`save_checkpoint` therefore writes a manifest (size and SHA-256 of every
file of the step) once the step is final; :func:`restore_checkpoint` checks it
first and raises :class:`CheckpointError` naming the step and the file.
:func:`restore_latest_valid` walks back from the newest step to the newest
one that verifies and restores, so an earlier checkpoint stays usable (keep
``max_to_keep >= 2``). To save a step number again after falling back,
``manager.delete(step)`` the damaged one first.

Usage::

  manager = make_checkpoint_manager("/ckpt", max_to_keep=3)
  save_checkpoint(manager, step, params, opt_state)
  ...
  step, params, opt_state = restore_latest_valid(manager, params, opt_state)

``params_like``/``opt_state_like`` are live arrays or ``jax.ShapeDtypeStruct``
with ``sharding`` (for instance from ``jax.eval_shape`` of the initialiser
with the shardings attached); scalars of the state (AdamW's ``count``) should
sit on the mesh like the step function's outputs (initialise under
``jax.set_mesh(mesh)`` and ``jax.jit``) so the restored state compiles to the
same program. Single-process: the manifest covers the files this process sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "make_checkpoint_manager",
    "restore_checkpoint",
    "restore_latest_valid",
    "save_checkpoint",
    "verify_checkpoint",
]

MANIFEST = "muonclip_manifest.json"
ITEMS = ("params", "opt_state")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
  """A checkpoint step that is missing, incomplete or damaged.

  Attributes:
    step: the step (``None`` when no step is concerned).
    path: the step directory or the offending file.
    reason: what is wrong.
  """

  def __init__(self, step: int | None, path: Any, reason: str):
    self.step, self.path, self.reason = step, str(path), reason
    where = f"checkpoint step {step} at {path}" if step is not None else f"checkpoints at {path}"
    super().__init__(f"{where}: {reason}")


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            save_interval_steps: int = 1,
                            enable_async_checkpointing: bool = False) -> ocp.CheckpointManager:
  """A :class:`orbax.checkpoint.CheckpointManager` for ``params`` and ``opt_state``.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: steps kept (older ones are deleted); keep at least 2 so a
      damaged newest step leaves one to fall back on. ``None`` keeps all.
    save_interval_steps: :func:`save_checkpoint` saves only steps that are a
      multiple of this (unless ``force``).
    enable_async_checkpointing: write in the background; :func:`save_checkpoint`
      still waits for the step to be final to write its manifest.

  Returns:
    The manager (close it with ``manager.close()``).
  """
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"max_to_keep: expected None or >= 1, got {max_to_keep}")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
      enable_async_checkpointing=enable_async_checkpointing)
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=ITEMS)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  opts = manager._options  # The manager's own naming of step directories.
  name_format = opts.step_name_format or ocp.step.standard_name_format(
      step_prefix=opts.step_prefix, step_format_fixed_length=opts.step_format_fixed_length)
  try:
    return ocp.step.find_step_path(manager.directory, name_format, step=step)
  except ValueError as e:
    raise CheckpointError(step, manager.directory, "no finalised step directory") from e


def _files(root: epath.Path) -> Iterable[tuple[str, epath.Path]]:
  for dirpath, _, names in os.walk(os.fspath(root)):
    for name in names:
      full = epath.Path(dirpath) / name
      rel = os.path.relpath(os.fspath(full), os.fspath(root))
      if rel != MANIFEST:
        yield rel, full


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with open(os.fspath(path), "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _write_manifest(step: int, root: epath.Path) -> None:
  files = {rel: {"size": os.path.getsize(os.fspath(p)), "sha256": _sha256(p)}
           for rel, p in sorted(_files(root))}
  tmp = root / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
  os.replace(os.fspath(tmp), os.fspath(root / MANIFEST))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
                    *, force: bool = False) -> bool:
  """Saves ``params`` and ``opt_state`` (sharded) as ``step``, then its manifest.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    step: the training step.
    params: the parameters (sharded ``jax.Array`` leaves).
    opt_state: the whole optimizer state.
    force: save even if ``step`` is not on the manager's save interval.

  Returns:
    Whether a checkpoint was written.
  """
  saved = manager.save(int(step), args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
      force=force)
  if saved:
    manager.wait_until_finished()
    if jax.process_index() == 0:
      _write_manifest(int(step), _step_dir(manager, int(step)))
  return saved


def verify_checkpoint(manager: ocp.CheckpointManager, step: int, *,
                      check_hashes: bool = True) -> None:
  """Checks ``step`` against its manifest.

  Raises:
    CheckpointError: naming the step and the file, for a missing step,
      manifest or file, a file of the wrong size (truncated) or, with
      ``check_hashes``, with changed contents.
  """
  root = _step_dir(manager, step)
  path = root / MANIFEST
  if not path.exists():
    raise CheckpointError(step, path, "no manifest: the save did not finish, or the step "
                          "was not written by save_checkpoint")
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(step, path, f"unreadable manifest ({e})") from e
  for item in ITEMS:
    if not any(rel.split(os.sep)[0] == item for rel in files):
      raise CheckpointError(step, root / item, f"item {item!r} is not in the manifest")
  for rel, meta in files.items():
    full = root / rel
    if not full.exists():
      raise CheckpointError(step, full, "file is missing")
    size = os.path.getsize(os.fspath(full))
    if size != meta["size"]:
      raise CheckpointError(step, full, f"file has {size} bytes, the save wrote "
                            f"{meta['size']} (truncated or overwritten)")
    if check_hashes and _sha256(full) != meta["sha256"]:
      raise CheckpointError(step, full, "file contents changed since the save (SHA-256)")


def _abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` with sharding for every array leaf of ``tree``."""
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)


def restore_checkpoint(manager: ocp.CheckpointManager, params_like: Any,
                       opt_state_like: Any, step: int | None = None, *,
                       verify: bool = True) -> tuple[Any, Any]:
  """Restores ``(params, opt_state)`` with the shapes, dtypes and shardings of the targets.

  Args:
    manager: from :func:`make_checkpoint_manager`.
    params_like, opt_state_like: arrays or ``jax.ShapeDtypeStruct`` (with
      ``sharding``) of the same tree structure as what was saved.
    step: the step; ``None`` for the newest.
    verify: check the step against its manifest first (:func:`verify_checkpoint`).

  Returns:
    ``(params, opt_state)``.

  Raises:
    CheckpointError: no checkpoint, or the step is incomplete or damaged (the
      message names the step and the file), or Orbax cannot read it.
  """
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(None, manager.directory, "no checkpoint to restore")
  step = int(step)
  root = _step_dir(manager, step)
  if verify:
    verify_checkpoint(manager, step)
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state_like))))
  except Exception as e:  # Orbax/TensorStore raise many types; name the step instead.
    raise CheckpointError(step, root, f"Orbax could not restore it: {type(e).__name__}: "
                          f"{e}") from e
  return out["params"], out["opt_state"]


def restore_latest_valid(manager: ocp.CheckpointManager, params_like: Any,
                         opt_state_like: Any) -> tuple[int, Any, Any]:
  """The newest step that verifies and restores, skipping damaged ones (with a warning).

  Returns:
    ``(step, params, opt_state)``.

  Raises:
    CheckpointError: when no step is usable (listing why each failed).
  """
  manager.reload()
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      params, opt_state = restore_checkpoint(manager, params_like, opt_state_like, step)
    except CheckpointError as e:
      warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=2)
      errors.append(str(e))
      continue
    return step, params, opt_state
  reason = "no usable checkpoint" + (": " + "; ".join(errors) if errors else "")
  raise CheckpointError(None, manager.directory, reason)
