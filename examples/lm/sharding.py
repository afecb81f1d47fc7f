"""The device mesh, FSDP-style parameter shardings, and this process's rows of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(shape: tuple[int, int]) -> Mesh:
  """A ``('data', 'model')`` mesh of the first ``data * model`` devices.

  With several processes (``jax.distributed``) the mesh must span all devices
  of all processes; ``jax.make_mesh`` orders them so that each process owns a
  contiguous block of the ``data`` axis (its rows of the batch).
  """
  data, model = shape
  n = data * model
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(f"mesh {data}x{model} needs {n} devices, found {len(devices)}; on CPU "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count before jax starts")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"mesh {data}x{model} must use all {len(devices)} devices of the "
                     f"{jax.process_count()} processes")
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:n])


def param_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """FSDP-style spec: a matrix's first axis over ``data``, its last over ``model``.

  An axis is sharded only when the mesh axis divides it; vectors are replicated.
  """
  if len(shape) < 2:
    return P()
  spec: list[str | None] = [None] * len(shape)
  if shape[0] % mesh.shape["data"] == 0 and mesh.shape["data"] > 1:
    spec[0] = "data"
  if shape[-1] % mesh.shape["model"] == 0 and mesh.shape["model"] > 1:
    spec[-1] = "model"
  while spec and spec[-1] is None:  # P('data') as XLA writes it, not P('data', None):
    spec.pop()                      # the same layout, but another jit cache key
  return P(*spec)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds in full.

  Each process copies only the shards of its own devices
  (``jax.make_array_from_callback``), so this works across processes.
  """
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, mesh: Mesh) -> Any:
  """``params`` (or the optimiser state) placed on ``mesh`` with :func:`param_spec`.

  Host values and single-device arrays must be the same on every process;
  arrays already on the mesh are resharded.
  """
  def put(x: Any) -> jax.Array:
    want = NamedSharding(mesh, param_spec(x.shape, mesh))
    if isinstance(getattr(x, "sharding", None), NamedSharding):
      return x if x.sharding == want else jax.device_put(x, want)
    return place(x, want)
  return jax.tree.map(put, params)


def constrain_to_mesh(tree: Any, mesh: Mesh) -> Any:
  """Inside ``jax.jit``: every leaf of ``tree`` laid out as :func:`shard_params` lays it out.

  The train step's outputs then have its inputs' shardings, so the next call
  runs the same compiled program (XLA would otherwise pick, for instance,
  ``P('model')`` for a replicated norm scale, and the second step recompiles).
  """
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, param_spec(x.shape, mesh))), tree)


def local_rows(sharding: NamedSharding, batch: int) -> slice:
  """The rows of a ``(batch, ...)`` array sharded as ``sharding`` that this process holds.

  Raises:
    ValueError: they are not one contiguous block (a mesh whose ``data`` axis
      interleaves processes), which per-process input does not support.
  """
  indices = sharding.addressable_devices_indices_map((batch, 1)).values()
  rows = sorted({r for idx in indices for r in range(*idx[0].indices(batch))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"this process holds rows {rows} of the batch, not a contiguous block")
  return slice(rows[0], rows[-1] + 1)
