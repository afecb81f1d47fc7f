"""Functions that tests/test_multiprocess.py runs in every process of a 2 x 4-device job.

Import-safe: nothing touches a device at import (``jax.distributed.initialize``
runs first, in tests/support/distributed_worker.py). Each returns plain Python/NumPy values,
gathered over processes where they are global arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

import muonclip_jax as mc
from support.checkpoint_setup import abstract, setup


def lm_module() -> Any:
  """The LM trainer of ``examples/lm/``."""
  from examples import lm
  return lm


def example_config(mesh: tuple[int, int] | None) -> Any:
  """The example model's run for the equivalence test: MuonClip with QK-Clip active."""
  lm = lm_module()
  model = lm.ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2)
  optim = lm.OptimConfig(name="muonclip", lr=0.01, tau=2.0, warmup=2, total_steps=3)
  return lm.RunConfig(model=model, optim=optim, steps=3, batch=8, seq_len=16, seed=0,
                      eval_every=3, eval_batches=1, mesh=mesh)


def train(trainer: Any) -> Any:
  """``cfg.steps`` training steps (no evaluation: the equivalence is in the steps)."""
  for _ in range(trainer.cfg.steps):
    trainer.train_step()
  return trainer


def example_data() -> Any:
  lm = lm_module()
  return lm.ByteData(lm.default_corpus(1 << 16), seq_len=16)


def gather(tree: Any) -> Any:
  """The global value of every leaf, as NumPy, on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def train_example(meshes: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
  """Trains the example with MuonClip on each mesh; what every process saw of it."""
  lm = lm_module()
  data = example_data()
  out = {}
  for mesh in meshes:
    trainer = train(lm.Trainer(example_config(tuple(mesh)), data))
    m = trainer.metrics
    out[tuple(mesh)] = {
        "loss": m["loss"], "heads": m["head_max_logit"],
        "telemetry": lm.clip_telemetry(trainer.opt_state),
        "params": gather(trainer.params), "opt_state": gather(trainer.opt_state),
        "summary": mc.muon_sharding_summary(trainer.params, trainer.mesh),
        "compilations": trainer._train_step._cache_size(),
        "rows": (trainer._rows.start, trainer._rows.stop),
    }
  return out


def _process_file(step_dir: epath.Path, item: str, process: int) -> epath.Path:
  """The largest file process ``process`` wrote for ``item``."""
  files = [epath.Path(d) / f
           for d, _, names in (step_dir / item / f"ocdbt.process_{process}").walk()
           for f in names]
  return max(files, key=lambda p: p.stat().length)


def checkpoints(root: str, single_saved: str) -> dict[str, Any]:
  """Checkpoint round trips, damage and resharding with two processes.

  ``single_saved``: a checkpoint (step 3) that one process with 4 devices
  wrote; restored here onto the 8 devices of both processes.
  """
  root = epath.Path(root)
  _, _, params, state, train_step = setup((2, 4))
  out: dict[str, Any] = {}
  manager = mc.make_checkpoint_manager(root / "a", max_to_keep=3)
  saved = {}
  p, s = params, state
  for step in (1, 2, 3):
    p, s = train_step(p, s)
    assert mc.save_checkpoint(manager, step, p, s)  # asynchronous: returns while writing
    saved[step] = gather((p, s))
  # Restore at once after an asynchronous save: every process sees the committed step.
  out["restored"] = gather(mc.restore_checkpoint(manager, abstract(params), abstract(state)))
  out["saved"] = saved
  out["steps"] = manager.all_steps()

  # Damage what process 1 wrote: flip a byte of step 3, delete a file of step 2.
  if jax.process_index() == 0:
    flip = _process_file(manager.step_path(3), "opt_state", 1)
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flip.write_bytes(bytes(data))
    _process_file(manager.step_path(2), "params", 1).unlink()
  multihost_utils.sync_global_devices("damaged")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, rp, rs = mc.restore_latest_valid(manager, abstract(params), abstract(state))
  out["fallback_step"] = step
  out["fallback"] = gather((rp, rs))
  out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  out["steps_after"] = manager.all_steps()
  manager.close()

  # For the test to restore on one process with 4 devices.
  manager = mc.make_checkpoint_manager(root / "b")
  mc.save_checkpoint(manager, 3, p, s)
  manager.close()

  manager = mc.make_checkpoint_manager(single_saved)
  out["from_single"] = gather(mc.restore_checkpoint(manager, abstract(params), abstract(state)))
  manager.close()
  return out
