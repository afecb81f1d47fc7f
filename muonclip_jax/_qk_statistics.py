"""The step side of QK-Clip: gathering the sown statistics into one per-module dict.

What a training step does with the statistics before the optimizer sees them:
:func:`collect_max_logits` reads them from what Flax returns (a linen
collection or an NNX State) into ``{module path: max_logits}``;
:func:`accumulate_max_logits` keeps their running ``max`` over micro-batches;
:func:`reduce_max_logits` takes their ``max`` over data- or context-parallel
shards. The shape contract is that of :mod:`muonclip_jax._statistic`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from muonclip_jax._paths import leaves_with_paths, show_path
from muonclip_jax._qk_layouts import Path
from muonclip_jax._statistic import MAX_LOGITS

__all__ = ["accumulate_max_logits", "collect_max_logits", "param_prefix", "reduce_max_logits"]


def param_prefix(paths: list[Path]) -> int:
  """1 when every parameter sits under a top-level ``'params'`` (a linen variables dict)."""
  return 1 if paths and all(p and p[0] == "params" for p in paths) else 0


def collect_max_logits(max_logits: Any) -> dict[Path, jax.Array]:
  """Per-module statistics from what Flax returns (linen collection or NNX State).

  Every leaf under a ``max_logits`` key is attributed to the module path
  before it (a leading ``'intermediates'`` is dropped); several leaves of one
  module (Flax's default tuple ``sow``) are max-reduced.

  Args:
    max_logits: the linen ``'intermediates'`` collection, an NNX ``State`` of
      ``nnx.Intermediate``, or any tree with ``max_logits`` leaves.

  Returns:
    ``{module path components: [layers..., heads] float array}``.

  Raises:
    ValueError: leaves of one module with differing shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from muonclip_jax import collect_max_logits
    >>> stats = {"intermediates": {"block": {"attn": {"max_logits": (jnp.array([1.0, 5.0]),)}}}}
    >>> {"/".join(k): v.tolist() for k, v in collect_max_logits(stats).items()}
    {'block/attn': [1.0, 5.0]}
  """
  leaves, _ = leaves_with_paths(max_logits)
  grouped: dict[Path, list[jax.Array]] = {}
  for path, leaf in leaves:
    if MAX_LOGITS not in path:
      continue
    i = len(path) - 1 - path[::-1].index(MAX_LOGITS)
    module = path[:i]
    if module and module[0] == "intermediates":
      module = module[1:]
    grouped.setdefault(module, []).append(jnp.asarray(leaf))
  out = {}
  for module, values in grouped.items():
    shapes = {v.shape for v in values}
    if len(shapes) != 1:
      raise ValueError(f"qk_clip: statistics at {show_path(module)!r} have differing "
                       f"shapes {sorted(shapes)}")
    v = values[0]
    for w in values[1:]:
      v = jnp.maximum(v, w)
    out[module] = v
  return out


def accumulate_max_logits(acc: Any, max_logits: Any) -> Any:
  """Elementwise running ``max`` of two statistics trees (micro-batches, shards).

  Use it to combine micro-batches for gradient accumulation: the logit bound
  is a max, never a sum (Kimi K2, arXiv 2507.20534, §2.1: ``S_max`` is the
  largest logit of the step's forward passes).

  Args:
    acc: the running statistics so far, or ``None`` (the first micro-batch).
    max_logits: this micro-batch's statistics, with ``acc``'s structure.

  Returns:
    ``max_logits`` when ``acc`` is ``None``, else the elementwise maximum.

  Example:
    >>> import jax.numpy as jnp
    >>> from muonclip_jax import accumulate_max_logits
    >>> acc = accumulate_max_logits(None, {"max_logits": jnp.array([1.0, 7.0])})
    >>> accumulate_max_logits(acc, {"max_logits": jnp.array([3.0, 2.0])})["max_logits"].tolist()
    [3.0, 7.0]
  """
  if acc is None:
    return max_logits
  return jax.tree.map(jnp.maximum, acc, max_logits)


def reduce_max_logits(max_logits: Any, axis_name: Any) -> Any:
  """``lax.pmax`` of every statistic over ``axis_name`` (inside ``shard_map``/``pmap``).

  Data- or context-parallel shards each see part of the batch or sequence;
  the head's statistic is the max over all of them. Under plain ``jax.jit``
  with sharded arrays this is not needed: the sown ``jnp.max`` is global, over
  the rows of every device of every JAX process.

  Args:
    max_logits: the statistics tree (as sown, or from :func:`collect_max_logits`).
    axis_name: the mapped axis name(s) to reduce over (data, context).

  Returns:
    The tree with every leaf max-reduced over ``axis_name``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from muonclip_jax import reduce_max_logits
    >>> per_device = jnp.array([[1.0, 4.0], [3.0, 2.0]])  # 2 shards x 2 heads
    >>> jax.vmap(lambda s: reduce_max_logits(s, "data"), axis_name="data")(per_device).tolist()
    [[3.0, 4.0], [3.0, 4.0]]
  """
  return jax.tree.map(lambda x: jax.lax.pmax(x, axis_name), max_logits)
