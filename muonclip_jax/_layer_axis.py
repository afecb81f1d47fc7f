"""Where a scanned stack of layers keeps its layer axis.

A model scanned over its layers (``flax.linen.scan``, ``nnx.scan``,
``nnx.vmap``, ``eqx.filter_vmap``) stores each layer's weights stacked along one
extra axis. Muon must treat that axis as a batch axis: every layer's matrix is
orthogonalised on its own. Flax's default puts it first, but MaxText inserts it
at ``param_scan_axis`` (1 by default), so a query kernel is
``(embed, layers, heads, head_dim)``. Shapes alone cannot tell where it is, so
it is declared with ``layer_axis``:

* ``None`` (the default): nothing is declared. Axes beyond a layout's own rank
  are read as leading batch axes (Flax's ``variable_axes={"params": 0}``), and
  :func:`muonclip_jax.muon_routing` flags such leaves.
* an ``int`` ``k``: the layer axis is axis ``k`` of every leaf under a scanned
  container: a path component named ``layers``, ``dense_layers``,
  ``moe_layers``, ``moe_layers_outside_pipeline`` or ``scanned_blocks`` (the
  names MaxText's decoders scan under) that is not followed by a list index
  (``layers/0/...`` is an unscanned list). Other leaves are unstacked. For
  MaxText: ``layer_axis=config.param_scan_axis``.
* a mapping ``{path_prefix: k}``: the layer axis is axis ``k`` of every leaf
  whose path starts with ``path_prefix`` (whole components, ``'/'``-joined, as
  :func:`muonclip_jax.muon_routing` prints them); other leaves are unstacked.
  The empty mapping ``{}`` declares that nothing is stacked, so every axis of
  a leaf belongs to its layout (for instance MaxText's unscanned fused
  ``mlp/wi`` kernel ``(embed, 2, mlp)``).

``k`` may be negative (counted from the end of the stacked shape).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["LayerAxisLike", "SCAN_CONTAINERS", "check_layer_axis", "check_layer_axis_used",
           "in_container", "stack_axis"]

LayerAxisLike = int | Mapping[str, int] | None

# The names MaxText scans its decoder layers under (linen ``nn.scan`` and
# ``nnx.scan`` alike: ``decoders.py`` / ``nnx_decoders.py``).
SCAN_CONTAINERS = frozenset(
    {"layers", "dense_layers", "moe_layers", "moe_layers_outside_pipeline", "scanned_blocks"})


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def check_layer_axis(layer_axis: Any) -> LayerAxisLike:
  """Validates ``layer_axis`` (see the module docstring); returns it as a plain value.

  Raises:
    ValueError: not ``None``, an int or a mapping of non-empty path strings to ints.
  """
  if layer_axis is None or _is_int(layer_axis):
    return layer_axis
  if isinstance(layer_axis, Mapping):
    out = {}
    for prefix, k in layer_axis.items():
      if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"layer_axis: keys must be non-empty parameter path prefixes such as "
                         f"'decoder/layers', got {prefix!r}")
      if not _is_int(k):
        raise ValueError(f"layer_axis[{prefix!r}]: expected the layer axis as an int, got {k!r}")
      out["/".join(c for c in prefix.split("/") if c)] = k
    return out
  hint = ""
  if hasattr(layer_axis, "dtype"):
    hint = ("; under optax.inject_hyperparams pass static_args=('layer_axis',), since the "
            "layer axis is part of the program, not a hyperparameter")
  raise ValueError(f"layer_axis: expected None, an int (MaxText: config.param_scan_axis) or a "
                   f"mapping of path prefix to int, got {layer_axis!r}{hint}")


def in_container(components: list[str]) -> bool:
  """Whether a path (as components) lies under one of :data:`SCAN_CONTAINERS`."""
  for i, c in enumerate(components[:-1]):
    if c.lower() in SCAN_CONTAINERS and not components[i + 1].isdigit():
      return True
  return False


def _prefix_of(path: str, layer_axis: Mapping[str, int]) -> str | None:
  comps = [c for c in path.split("/") if c]
  best = None
  for prefix in layer_axis:
    pc = prefix.split("/")
    if comps[:len(pc)] == pc and len(pc) < len(comps) and (best is None or len(pc) > len(best)):
      best = prefix
  return best


def stack_axis(path: str, shape: tuple[int, ...], layer_axis: LayerAxisLike) -> int | None:
  """The declared layer axis of the leaf at ``path`` (non-negative), or ``None``.

  Args:
    path: the ``'/'``-joined parameter path.
    shape: the leaf's shape.
    layer_axis: as validated by :func:`check_layer_axis`.

  Returns:
    ``None`` when nothing is declared for this leaf, else its layer axis.

  Raises:
    ValueError: the declared axis is out of range for the leaf, naming the path.
  """
  if layer_axis is None:
    return None
  if _is_int(layer_axis):
    if not in_container([c for c in path.split("/") if c]):
      return None
    k, source = layer_axis, f"layer_axis={layer_axis}"
  else:
    prefix = _prefix_of(path, layer_axis)
    if prefix is None:
      return None
    k, source = layer_axis[prefix], f"layer_axis[{prefix!r}]={layer_axis[prefix]}"
  n = len(shape)
  if not -n <= k < n:
    raise ValueError(f"{path}: {source} is out of range for shape {tuple(shape)}; declare the "
                     "layer axis of this stack correctly (or a prefix that excludes it)")
  return k % n


def check_layer_axis_used(paths: Iterable[str], layer_axis: LayerAxisLike) -> None:
  """Refuses a ``layer_axis`` declaration that applies to none of ``paths``.

  Raises:
    ValueError: an int with no leaf under a scanned container, or a mapping key
      that is the prefix of no leaf; the message says what to pass instead.
  """
  if layer_axis is None:
    return
  paths = list(paths)
  if _is_int(layer_axis):
    if not any(in_container([c for c in p.split("/") if c]) for p in paths):
      raise ValueError(
          f"layer_axis={layer_axis}: no parameter is under a scanned container "
          f"({', '.join(sorted(SCAN_CONTAINERS))}), so it would do nothing; pass a mapping "
          "{'path/to/scanned/stack': axis} naming your stack, or layer_axis=None if nothing "
          "is scanned")
    return
  used = {_prefix_of(p, layer_axis) for p in paths}
  for prefix in layer_axis:
    if prefix not in used:
      raise ValueError(f"layer_axis[{prefix!r}]: no Muon parameter lies under this path prefix, "
                       "so it would do nothing; check the spelling against "
                       "muonclip_jax.muon_routing(params) or remove it")
