"""What tests/test_checkpoint_gcs.py runs in each process of a 2 x 4-device job on gs://.

Import-safe (nothing touches a device at import). The emulator's environment
comes from the parent test process.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonclip_jax as mc
from support.checkpoint_setup import abstract, make_params
from support.workers_training import gather


def round_trip(root: str) -> dict[str, Any]:
  """Two steps saved by both processes on gs://, then the newest restored.

  The parameters of tests/support/checkpoint_setup.py, sharded over both processes'
  8 devices, and a replicated step count (no optimizer: nothing to compile).
  """
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  replicated = NamedSharding(mesh, P())
  manager = mc.make_checkpoint_manager(root, max_to_keep=2)
  saved = {}
  for step in (1, 2):
    p = make_params(mesh, seed=step)
    s = {"count": jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), replicated)}
    assert mc.save_checkpoint(manager, step, p, s)
    saved[step] = gather((p, s))
  step, rp, rs = mc.restore_latest_valid(manager, abstract(p), abstract(s))
  out = {"step": step, "restored": gather((rp, rs)), "saved": saved[2],
         "steps": manager.all_steps()}
  manager.close()
  return out
