"""A process that saves two checkpoint steps and is killed while it saves the second.

Run by tests/test_checkpoint_gcs.py as ``python tests/support/gcs_save_child.py DIRECTORY MIB``
with the emulator's environment. It saves step 1 (small), prints ``saved 1``,
then prints ``saving 2`` and saves step 2 with a ``MIB`` MiB array (blocking),
printing ``saved 2`` if nobody killed it first. The values are a function of
the step, so the parent can check what it restores.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import muonclip_jax as mc  # noqa: E402


def trees(step: int, mib: int) -> tuple[dict, dict]:
  """The state saved at ``step``: ``big`` holds ``mib`` MiB of float32."""
  n = max(1, mib * (1 << 20) // 4)
  params = {"w": jnp.full((8, 8), float(step)), "big": jnp.arange(n, dtype=jnp.float32) + step}
  return params, {"count": jnp.asarray(step, jnp.int32)}


def main() -> None:
  directory, mib = sys.argv[1], int(sys.argv[2])
  manager = mc.make_checkpoint_manager(directory, enable_async_checkpointing=False)
  mc.save_checkpoint(manager, 1, *trees(1, 0))
  print("saved 1", flush=True)
  p, s = trees(2, mib)
  print("saving 2", flush=True)
  mc.save_checkpoint(manager, 2, p, s)
  print("saved 2", flush=True)
  manager.close()


if __name__ == "__main__":
  main()
