"""Worker functions of tests/test_distributed_support.py, run in every process of a job.

Import-safe: nothing here touches jax devices at import time (see tests/support/distributed.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROWS_PER_PROCESS = 4
COLS = 3


def local_rows(process_index: int) -> np.ndarray:
  """The rows process ``process_index`` contributes to the global array."""
  return (np.arange(ROWS_PER_PROCESS * COLS, dtype=np.float32).reshape(ROWS_PER_PROCESS, COLS)
          + 100.0 * process_index)


def topology_and_global_sum() -> tuple[int, int, int, int, float]:
  """Process index/count, global/local device counts, and the sum of a global array.

  The array is ``(ROWS_PER_PROCESS * process_count, COLS)``, sharded by rows over a 1-D mesh
  of every device in the job; each process supplies :func:`local_rows` of its own index.
  """
  mesh = Mesh(np.asarray(jax.devices()), ("x",))
  sharding = NamedSharding(mesh, P("x"))
  x = jax.make_array_from_process_local_data(sharding, local_rows(jax.process_index()))
  assert x.shape == (ROWS_PER_PROCESS * jax.process_count(), COLS), x.shape
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  return (jax.process_index(), jax.process_count(), len(jax.devices()),
          len(jax.local_devices()), float(total))


def raise_on(process_index: int, message: str) -> int:
  """Raises ``ValueError(message)`` on one process; the others wait in a collective."""
  if jax.process_index() == process_index:
    raise ValueError(message)
  multihost_utils.sync_global_devices("raise_on")
  return jax.process_index()


def hang_on(process_index: int, seconds: float = 1000.0) -> int:
  """Sleeps ``seconds`` on one process before a collective the others are already in."""
  if jax.process_index() == process_index:
    print(f"process {process_index} sleeps {seconds} s", flush=True)
    time.sleep(seconds)
  multihost_utils.sync_global_devices("hang_on")
  return jax.process_index()
