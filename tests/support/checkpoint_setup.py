"""A small MuonClip state on a mesh, shared by the checkpoint tests of one and of several processes.

Import-safe for the multi-process workers: nothing here touches a device at
import time (``jax.distributed.initialize`` must come first).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import muonclip_jax as mc

# Shapes and layouts: every axis sharded over 'model' is a multiple of 4.
SHAPES = {"embed": {"embedding": ((48, 32), P("model", None))},
          "h0": {"attn": {"query": {"kernel": ((32, 4, 8), P(None, "model", None))},
                          "key": {"kernel": ((32, 4, 8), P(None, "model", None))},
                          "value": {"kernel": ((32, 4, 8), P(None, "model", None))},
                          "out": {"kernel": ((4, 8, 32), P("model", None, None))}},
                 "mlp": {"kernel": ((32, 128), P("data", "model"))},
                 "norm": {"scale": ((32,), P("model"))}}}
MAX_LOGITS = [50.0, 150.0, 90.0, 300.0]  # two of four heads above tau = 100


def make_params(mesh: Mesh, seed: int = 0) -> Any:
  """Random parameters laid out on ``mesh`` (the same values on every process)."""
  rng = np.random.default_rng(seed)
  is_leaf = lambda x: isinstance(x, tuple) and isinstance(x[1], P)

  def put(s: tuple[tuple[int, ...], P]) -> jax.Array:
    host = (rng.standard_normal(s[0]) * 0.1).astype(np.float32)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, s[1]),
                                        lambda index: host[index])
  return jax.tree.map(put, SHAPES, is_leaf=is_leaf)


def setup(mesh_shape: tuple[int, int] = (2, 4), devices: Any = None) -> tuple[Any, ...]:
  """``(mesh, tx, params, state, train_step)``: MuonClip with ``mesh=``, a bf16 momentum.

  The state holds Muon, AdamW and QK-Clip states and MaskedNode leaves; the
  jitted step clips heads 1 and 3.
  """
  mesh = jax.make_mesh(mesh_shape, ("data", "model"), devices=devices)
  tx = mc.muonclip(0.02, tau=100.0, mesh=mesh, mu_dtype=jnp.bfloat16)
  params = make_params(mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)

  @jax.jit
  def train_step(params, state):
    stats = {"h0": {"attn": {"max_logits": jnp.asarray(MAX_LOGITS)}}}
    grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(p)))(params)
    updates, state = tx.update(grads, state, params, max_logits=stats)
    return optax.apply_updates(params, updates), state

  return mesh, tx, params, state, train_step


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` with the sharding of every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
