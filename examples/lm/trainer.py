"""The training loop: :class:`Trainer` (a jitted step on a mesh) and :class:`Checkpointer`.

:class:`Trainer` holds parameters as a plain dict, jits one train step (fixed
shapes, compiled once) with ``muonclip(mesh=...)``, feeds it this process's rows
of each batch, and records metrics; :class:`Checkpointer` saves and resumes it
asynchronously, on local disk or ``gs://``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import muonclip_jax

from .input_pipeline import ByteData
from .model import ModelConfig, head_max_logits, init_model, loss_fn
from .optim import OptimConfig, lr_schedule, make_optimizer
from .sharding import constrain_to_mesh, local_rows, make_mesh, shard_params


@dataclasses.dataclass
class RunConfig:
  """Everything that defines a training run.

  Attributes:
    model: model size.
    optim: optimiser.
    steps: training steps.
    batch: sequences per step.
    seq_len: bytes per sequence.
    seed: initialisation and data seed.
    eval_every: steps between validation evaluations (and the last step).
    eval_batches: validation batches per evaluation.
    mesh: ``(data, model)`` mesh shape, or ``None`` for one device.
  """

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  steps: int = 300
  batch: int = 16
  seq_len: int = 128
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  mesh: tuple[int, int] | None = None

  def to_dict(self) -> dict[str, Any]:
    """The configuration as plain JSON-serialisable values."""
    return dataclasses.asdict(self)


class Compiled(NamedTuple):
  """What every run of one (model, optimiser, mesh) shares: compiled steps included."""

  mesh: Mesh | None
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]


_COMPILED: dict[tuple[Any, ...], Compiled] = {}


def _compiled(model: ModelConfig, optim: OptimConfig, mesh_shape: tuple[int, int] | None
              ) -> Compiled:
  """The jitted train and eval steps for a configuration, built once per process.

  Runs that differ only in seed, data or step count (sweeps, resumes, tests)
  reuse one compilation. The train step donates parameters and optimiser state.
  """
  key = (model, optim, mesh_shape)
  if key in _COMPILED:
    return _COMPILED[key]
  mesh = make_mesh(mesh_shape) if mesh_shape else None
  graphdef, _ = init_model(model, 0)
  tx = make_optimizer(optim, mesh)
  num_layers = model.num_layers

  def train_step(params: dict[str, Any], opt_state: optax.OptState, x: jax.Array,
                 y: jax.Array) -> tuple[dict[str, Any], optax.OptState, jax.Array, jax.Array]:
    (loss, stats), grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, p, x, y), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=stats)
    params = optax.apply_updates(params, updates)
    heads = head_max_logits(stats, num_layers)
    if mesh is not None:  # the inputs' layout; metrics replicated, for every process to read
      params, opt_state = constrain_to_mesh((params, opt_state), mesh)
      heads = jax.lax.with_sharding_constraint(heads, NamedSharding(mesh, P()))
    return params, opt_state, loss, heads

  out = Compiled(mesh, graphdef, tx, jax.jit(train_step, donate_argnums=(0, 1)),
                 jax.jit(lambda p, x, y: loss_fn(graphdef, p, x, y)[0]))
  _COMPILED[key] = out
  return out


class Trainer:
  """Holds the parameters and optimiser state of one run; steps and evaluates.

  The train step is ``jax.jit``-compiled once per configuration and process
  (fixed shapes, parameters and state donated; see :func:`_compiled`); the step
  counter that the data sampler uses lives on the host.

  Args:
    cfg: the run.
    data: the corpus, split (its ``seq_len`` must equal ``cfg.seq_len``).
  """

  def __init__(self, cfg: RunConfig, data: ByteData) -> None:
    if data.seq_len != cfg.seq_len:
      raise ValueError(f"data.seq_len ({data.seq_len}) != cfg.seq_len ({cfg.seq_len})")
    if cfg.batch < 1 or cfg.steps < 0:
      raise ValueError("batch must be positive and steps non-negative")
    self.cfg = cfg
    self.data = data
    if cfg.mesh is not None and cfg.batch % cfg.mesh[0]:
      raise ValueError(f"batch ({cfg.batch}) must be a multiple of the mesh's data axis "
                       f"({cfg.mesh[0]})")
    compiled = _compiled(cfg.model, cfg.optim, cfg.mesh)
    self.mesh, self.graphdef, self.tx = compiled.mesh, compiled.graphdef, compiled.tx
    self._train_step, self._eval_step = compiled.train_step, compiled.eval_step
    _, params = init_model(cfg.model, cfg.seed)
    if self.mesh is not None:
      params = shard_params(params, self.mesh)
    self.params = params
    # Copies: optax may share one buffer between state leaves, which donation rejects.
    opt_state = jax.tree.map(jnp.copy, self.tx.init(params))
    if self.mesh is not None:  # the train step's layout (counters replicated)
      opt_state = shard_params(opt_state, self.mesh)
    self.opt_state = opt_state
    self.step = 0
    self.metrics: dict[str, list[Any]] = {
        "step": [], "loss": [], "max_logit": [], "head_max_logit": [], "lr": [],
        "val_step": [], "val_loss": [], "time": []}
    self._batch_sharding = (None if self.mesh is None
                            else NamedSharding(self.mesh, P("data", None)))
    self._rows = (slice(None) if self.mesh is None
                  else local_rows(self._batch_sharding, cfg.batch))
    self._val = [tuple(self._put(a) for a in b)
                 for b in data.val_batches(cfg.batch, cfg.eval_batches, self._rows)]
    self._lr = lr_schedule(cfg.optim.lr, cfg.optim)

  def _put(self, rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch: on the device, or the global batch sharded over ``data``."""
    if self.mesh is None:
      return jnp.asarray(rows)
    return jax.make_array_from_process_local_data(self._batch_sharding, rows,
                                                  (self.cfg.batch,) + rows.shape[1:])

  def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The training batch of ``step`` (deterministic in the seed and the step).

    Each process reads only its own rows of it (:func:`local_rows`).
    """
    x, y = self.data.train_batch(self.cfg.seed, step, self.cfg.batch, self._rows)
    return self._put(x), self._put(y)

  def train_step(self) -> tuple[float, np.ndarray]:
    """One optimiser step; returns the loss and the ``[layers, heads]`` max logits."""
    x, y = self.batch(self.step)
    self.params, self.opt_state, loss, heads = self._train_step(
        self.params, self.opt_state, x, y)
    loss_f, heads_np = float(loss), np.asarray(heads)
    m = self.metrics
    m["step"].append(self.step)
    m["loss"].append(loss_f)
    m["head_max_logit"].append(heads_np.tolist())
    m["max_logit"].append(heads_np.max(axis=1).tolist())
    m["lr"].append(float(self._lr(self.step)))
    m["time"].append(time.time())
    self.step += 1
    return loss_f, heads_np

  def evaluate(self) -> float:
    """Mean validation loss (nats per byte) over the fixed validation batches."""
    losses = [float(self._eval_step(self.params, x, y)) for x, y in self._val]
    val = float(np.mean(losses))
    self.metrics["val_step"].append(self.step)
    self.metrics["val_loss"].append(val)
    return val

  def run(self, steps: int | None = None, progress: Any = None,
          on_step: Callable[[Trainer], None] | None = None) -> dict[str, list[Any]]:
    """Trains until step ``steps`` (default ``cfg.steps``), evaluating every ``eval_every``.

    Args:
      steps: the step to stop at (absolute, so a resumed run continues).
      progress: optional tqdm-like bar (``update``, ``set_postfix``).
      on_step: called after each step (checkpointing, ...).

    Returns:
      The metrics dict (also ``self.metrics``).
    """
    end = self.cfg.steps if steps is None else steps
    every = max(1, self.cfg.eval_every)
    if self.step == 0 and not self.metrics["val_step"]:
      self.evaluate()
    while self.step < end:
      loss, heads = self.train_step()
      if self.step % every == 0 or self.step == end:
        self.evaluate()
      if progress is not None:
        progress.update(1)
        post = {"loss": f"{loss:.3f}", "max_logit": f"{heads.max():.1f}"}
        if self.metrics["val_loss"]:
          post["val"] = f"{self.metrics['val_loss'][-1]:.3f}"
        progress.set_postfix(post)
      if on_step is not None:
        on_step(self)
    return self.metrics

  # Checkpointing: the state is a plain pytree, saved with the package's orbax helpers.

  def state(self) -> dict[str, Any]:
    """The checkpointed state: parameters, optimiser state and step."""
    return {"params": self.params, "opt_state": self.opt_state,
            "step": jnp.asarray(self.step, jnp.int32)}

  def load_state(self, state: dict[str, Any], metrics: dict[str, list[Any]] | None = None
                 ) -> None:
    """Restores :meth:`state` (and, optionally, the metrics recorded so far)."""
    self.params = state["params"]
    self.opt_state = state["opt_state"]
    self.step = int(state["step"])
    if metrics is not None:
      self.metrics = {k: list(v) for k, v in metrics.items()}


class Checkpointer:
  """Saves and restores a :class:`Trainer` with the package's orbax helpers.

  Parameters and the whole optimiser state go through
  :func:`muonclip_jax.save_checkpoint`: sharded, asynchronous (training goes
  on while Orbax writes), committed together with a manifest.
  :meth:`restore_latest` uses :func:`muonclip_jax.restore_latest_valid`, which
  restores onto the trainer's current shardings (any mesh or process count)
  and skips damaged steps, on every process alike. Process 0 keeps the
  metrics recorded so far beside each step as ``metrics_<step>.json``. The
  data sampler is a function of ``(seed, step)``, so a resumed run sees
  exactly the batches an uninterrupted one would.

  Every process of a multi-process run builds one, with the same directory,
  on storage they all reach (a shared file system or a ``gs://`` bucket).

  Args:
    directory: checkpoint directory (created): a local path or ``gs://...``.
    max_to_keep: checkpoints kept (at least 2, so a damaged one has a fallback).
    async_save: return from :meth:`save` while Orbax writes.
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2,
               async_save: bool = True) -> None:
    path = epath.Path(directory)
    self.directory = path if "://" in str(directory) else epath.Path(path.resolve())
    self.manager = muonclip_jax.make_checkpoint_manager(
        self.directory, max_to_keep=max_to_keep, enable_async_checkpointing=async_save)

  def _metrics_path(self, step: int) -> epath.Path:
    """Where the metrics of ``step`` are kept."""
    return self.directory / f"metrics_{step}.json"

  def save(self, trainer: Trainer) -> None:
    """Starts saving the trainer's state at its current step (every process calls it)."""
    muonclip_jax.save_checkpoint(self.manager, trainer.step, trainer.params,
                                 trainer.opt_state, force=True)
    if jax.process_index() != 0:
      return
    path = self._metrics_path(trainer.step)  # written whole or not at all (preemption)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(trainer.metrics))
    tmp.replace(path)
    # Committed steps still kept, and the one being written.
    kept = {int(s) for s in self.manager.all_steps()} | {trainer.step}
    for old in self.directory.glob("metrics_*.json"):
      if int(old.stem.split("_")[1]) not in kept:
        old.unlink(missing_ok=True)

  def latest_step(self) -> int | None:
    """The latest committed step, or ``None``."""
    return self.manager.latest_step()

  def restore_latest(self, trainer: Trainer) -> int | None:
    """Loads the newest valid checkpoint into ``trainer``; returns its step (``None``: none)."""
    if not self.manager.all_steps():
      return None
    step, params, opt_state = muonclip_jax.restore_latest_valid(
        self.manager, trainer.params, trainer.opt_state)
    path = self._metrics_path(step)
    metrics = json.loads(path.read_text()) if path.exists() else None
    trainer.load_state({"params": params, "opt_state": opt_state, "step": step}, metrics)
    return step

  def close(self) -> None:
    """Waits for a save in flight to be committed and releases the manager."""
    self.manager.close()
