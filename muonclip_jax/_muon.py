"""Muon: momentum -> orthogonalise -> scale -> decay -> learning rate.

``scale_by_muon`` is the gradient transformation (momentum, Newton–Schulz,
shape scaling); ``muon`` is the optimizer of Moonlight (arXiv 2502.16982) and
Kimi K2 (arXiv 2507.20534): Muon on hidden matrices, AdamW on the rest, both
with decoupled weight decay

.. math::
  W \\leftarrow W - \\eta (O + \\lambda W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from muonclip_jax._coefficients import CoeffsLike
from muonclip_jax._dimensions import (
  DimensionNumbersLike,
  DimensionRule,
  check_matrix_rank,
  dimension_rules_fn,
  fan_in_out,
  matrix_view,
)
from muonclip_jax._layer_axis import LayerAxisLike, check_layer_axis, check_layer_axis_used
from muonclip_jax._momentum import momentum_step
from muonclip_jax._newton_schulz import (
  LocalOrthogonalizer,
  NewtonSchulz,
  Orthogonalizer,
  newton_schulz_options,
)
from muonclip_jax._paths import path_str
from muonclip_jax._routing import ADAMW, MUON, resolve_labels
from muonclip_jax._shape_scaling import check_shape_scaling, shape_scale
from muonclip_jax._sharding import mesh_orthogonalizer


class ScaleByMuonState(NamedTuple):
  """State of :func:`scale_by_muon`: the momentum buffer ``M``."""

  mu: optax.Updates


class LeafMatrix(NamedTuple):
  """One leaf as Muon sees it: its matrix view, the way back, and its fans.

  (Not a "plan": in this package that word means the mesh plan,
  :mod:`muonclip_jax._mesh_placement` and :mod:`muonclip_jax._mesh_plan`.)
  """

  path: str
  to_matrix: Callable[[jax.Array], jax.Array]
  from_matrix: Callable[[jax.Array], jax.Array]
  matrix_shape: tuple[int, int, int]  # (batch, fan_in, fan_out)
  fan_in: int
  fan_out: int


def leaf_matrices(tree: Any, dims_fn: Callable[[str, tuple[int, ...]], MuonDimensionNumbers]
                  ) -> list[LeafMatrix]:
  """One :class:`LeafMatrix` per leaf of ``tree`` (in flattening order)."""
  views = []
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = path_str(p)
    shape = tuple(x.shape)
    check_matrix_rank(path, shape)
    dims = dims_fn(path, shape)
    to_m, from_m, flat = matrix_view(path, shape, dims)
    fi, fo = fan_in_out(path, shape, dims)
    views.append(LeafMatrix(path, to_m, from_m, flat, fi, fo))
  return views



def check_orientations(tree: Any, rules_fn: Callable[[str, tuple[int, ...]], DimensionRule],
                       scaling: str) -> None:
  """Refuses a leaf whose fan-in/fan-out could be swapped where the scaling would differ.

  Only ``"keller"`` scaling (``sqrt(max(1, fan_out / fan_in))``) depends on
  which side is fan-in; Newton–Schulz and ``"rms"`` do not.

  Raises:
    ValueError: naming the path, the two readings and the fix.
  """
  if scaling != "keller":
    return
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path, shape = path_str(p), tuple(x.shape)
    rule = rules_fn(path, shape)
    if rule.orientation_known:
      continue
    fi, fo = fan_in_out(path, shape, rule.dims)
    if fi != fo:
      raise ValueError(
          f"{path}: shape_scaling='keller' depends on which side is fan-in, and the "
          f"orientation of shape {shape} cannot be told from its name ({rule.ambiguity}); "
          f"declare it with dimension_numbers={{...: MuonDimensionNumbers(reduction_axis=..., "
          f"output_axis=...)}} for this path, or use shape_scaling='rms'")


def scale_by_muon(
    beta: jax.typing.ArrayLike = 0.95,
    *,
    nesterov: bool = True,
    newton_schulz: NewtonSchulz | None = None,
    coeffs: CoeffsLike = "keller",
    steps: int | None = None,
    ns_dtype: jax.typing.DTypeLike | None = None,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    eps: float = 1e-7,
    shape_scaling: str | None = "rms",
    rms_scale: jax.typing.ArrayLike = 0.2,
    mu_dtype: jax.typing.DTypeLike | None = None,
    dimension_numbers: DimensionNumbersLike = None,
    layer_axis: LayerAxisLike = None,
    per_head: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformation:
  r"""Momentum, Newton–Schulz orthogonalisation and shape scaling.

  .. math::
    M_t = \beta M_{t-1} + G_t, \quad
    O_t = s(A, B) \cdot \mathrm{NS}(G_t + \beta M_t),

  with ``s = rms_scale * sqrt(max(A, B))`` for ``shape_scaling="rms"``
  (Moonlight, arXiv 2502.16982) or ``sqrt(max(1, B/A))`` for ``"keller"``, where
  ``A``/``B`` are the fan-in/fan-out of the matrix view of each leaf.

  Args:
    beta: momentum coefficient ``beta`` (0.95); ``M`` (state ``mu``) is the buffer.
    nesterov: feed ``G_t + beta M_t`` (True) or ``M_t`` to Newton–Schulz.
    newton_schulz: the Newton–Schulz options as one
      :class:`muonclip_jax.NewtonSchulz`; the five keywords below are the same
      options one by one (kept for backward compatibility; a field set in
      both places, the keyword not at its default, is refused).
    coeffs: Newton–Schulz preset or coefficients (see :func:`orthogonalize`).
    steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: compute dtype of Newton–Schulz (default: the update's dtype).
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    restarts: Gram-path restarts (see :func:`orthogonalize`).
    eps: added to the Frobenius norm.
    shape_scaling: ``"rms"``, ``"keller"`` or ``None``.
    rms_scale: target update RMS for ``"rms"`` (0.2).
    mu_dtype: dtype of the momentum buffer (default: the parameter's).
    dimension_numbers: fan-in/fan-out axes per leaf: one
      :class:`MuonDimensionNumbers` for all, a tree of them (``None`` leaves
      take the default), or a callable ``(path, shape) -> dims | None``.
      Default: :func:`muonclip_jax.default_dimension_numbers`.
    layer_axis: where scanned stacks keep their layer axis, a batch axis of
      every matrix: ``None`` (leading, Flax's default), an int for the leaves
      under MaxText's scanned containers (``layers``, ``dense_layers``,
      ``moe_layers``, ...; MaxText: ``config.param_scan_axis``), or a mapping
      ``{path_prefix: axis}``. Used by the default dimension numbers; refused
      if it applies to no leaf.
    per_head: orthogonalise head-factored attention kernels (Gemma's einsums,
      ``DenseGeneral`` q/k/v/out) one head at a time instead of as the whole
      projection (the default, as in Moonlight and Kimi K2).
    mesh: a :class:`jax.sharding.Mesh`; Newton–Schulz then runs device-local
      (see :mod:`muonclip_jax._sharding`). It may span the devices of several
      JAX processes (``jax.distributed``): every process builds the same
      transformation with the same mesh, and each computes the matrices its
      own devices are assigned.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByMuonState`.

  Raises:
    ValueError: an unknown preset, method or shape scaling, a malformed
      ``layer_axis``; at ``init``, a parameter of rank < 2, a ``layer_axis``
      that applies to no parameter, or (``"keller"`` scaling) a non-square
      leaf whose orientation cannot be told from its name (naming its path).

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025 (§2.2, the ``"rms"`` scaling).
  """
  ns = newton_schulz_options(newton_schulz, coeffs=coeffs, steps=steps, ns_dtype=ns_dtype,
                            method=method, restarts=restarts, eps=eps)
  scaling = check_shape_scaling(shape_scaling)
  layer_axis = check_layer_axis(layer_axis)
  rules_fn = dimension_rules_fn(dimension_numbers, layer_axis=layer_axis, per_head=per_head)
  dims_fn = lambda path, shape: rules_fn(path, shape).dims
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  on_mesh = None if mesh is None else mesh_orthogonalizer(mesh)
  orthogonalizer: Orthogonalizer = LocalOrthogonalizer() if on_mesh is None else on_mesh

  def init_fn(params):
    leaf_matrices(params, dims_fn)  # Fail early, naming the path, on bad shapes.
    check_layer_axis_used(
        (path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]), layer_axis)
    check_orientations(params, rules_fn, scaling)
    if on_mesh is not None:
      on_mesh.record(params)  # Output shardings for AxisType.Auto meshes.
    return ScaleByMuonState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None, view_specs=None):
    del params
    leaves = leaf_matrices(updates, dims_fn)
    grads, treedef = jax.tree.flatten(updates)
    stepped = [momentum_step(g, m, beta, nesterov)
               for g, m in zip(grads, treedef.flatten_up_to(state.mu), strict=True)]
    mats = [leaf.to_matrix(d) for leaf, (_, d) in zip(leaves, stepped, strict=True)]
    orth = orthogonalizer(mats, ns, view_specs)
    out = []
    for leaf, o, g in zip(leaves, orth, grads, strict=True):
      scale = shape_scale(leaf.fan_in, leaf.fan_out, scaling, rms_scale)
      out.append((leaf.from_matrix(o) * scale).astype(g.dtype))
    new_mu = jax.tree.unflatten(treedef, [m for m, _ in stepped])
    return jax.tree.unflatten(treedef, out), ScaleByMuonState(mu=new_mu)

  if on_mesh is None:
    return optax.GradientTransformation(init_fn, update_fn)
  # On a mesh: view shardings in, every output in its parameter's sharding.
  return optax.GradientTransformation(init_fn, on_mesh.wrap_update(update_fn, dims_fn))


def _check_nonnegative(name: str, value: Any) -> None:
  """Rejects a negative Python/NumPy scalar; schedules and traced arrays pass."""
  if callable(value):
    return
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not v >= 0:  # Also rejects NaN.
    raise ValueError(f"{name}: must be a non-negative number or a schedule, got {value!r}")


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: jax.typing.ArrayLike = 0.1,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    nesterov: bool = True,
    newton_schulz: NewtonSchulz | None = None,
    coeffs: CoeffsLike = "keller",
    steps: int | None = None,
    ns_dtype: jax.typing.DTypeLike | None = None,
    method: str = "auto",
    restarts: Sequence[int] | None = None,
    eps: float = 1e-7,
    shape_scaling: str | None = "rms",
    rms_scale: jax.typing.ArrayLike = 0.2,
    mu_dtype: jax.typing.DTypeLike | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.95,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    param_labels: Any | Callable[[optax.Params], Any] | None = None,
    dimension_numbers: DimensionNumbersLike = None,
    layer_axis: LayerAxisLike = None,
    per_head: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformation:
  r"""Muon for hidden matrices, AdamW for the rest (Moonlight / Kimi K2).

  Muon branch: :func:`scale_by_muon`, then decoupled weight decay and the
  learning rate, ``W <- W - lr (O + weight_decay W)``. AdamW branch: plain
  AdamW (``b1=0.9``, ``b2=0.95``, no Nesterov) with the same decay form and
  ``adam_learning_rate`` (default: ``learning_rate``).

  Routing: :func:`muonclip_jax.default_param_labels` sends embeddings, the LM
  head, norms, biases and every parameter of rank < 2 to AdamW, everything
  else to Muon. ``param_labels`` overrides it: a tree of ``"muon"``/``"adamw"``
  strings with the parameters' structure, or a callable ``params -> tree``.
  :func:`muonclip_jax.muon_routing` prints what goes where, the matrix view of
  each Muon leaf and the rule that chose it; call it with the same
  ``param_labels``, ``dimension_numbers``, ``layer_axis`` and ``per_head``.

  Works under ``optax.inject_hyperparams`` (for instance
  ``inject_hyperparams(muon)(learning_rate=sched, weight_decay=0.1)``); pass
  ``static_args=("steps",)`` there if you set ``steps`` as a keyword (not
  needed inside ``newton_schulz=NewtonSchulz(steps=...)``, which is static),
  and ``("layer_axis",)`` if you set an int ``layer_axis``.

  Args:
    learning_rate: scalar or schedule for the Muon branch.
    weight_decay: decoupled decay ``lambda`` for both branches (K2: 0.1).
    weight_decay_mask: optional mask (tree or callable, as in
      ``optax.add_decayed_weights``) of parameters that decay.
    beta: momentum coefficient (see :func:`scale_by_muon`).
    nesterov: Nesterov momentum (see :func:`scale_by_muon`).
    newton_schulz: the Newton–Schulz options in one object (see :func:`scale_by_muon`).
    coeffs: Newton–Schulz preset or coefficients (see :func:`orthogonalize`).
    steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: Newton–Schulz compute dtype (default: the update's).
    method: ``"auto"``, ``"standard"`` or ``"gram"`` (see :func:`orthogonalize`).
    restarts: Gram-path restarts (see :func:`orthogonalize`).
    eps: added to the Frobenius norm.
    shape_scaling: ``"rms"``, ``"keller"`` or ``None`` (see :func:`scale_by_muon`).
    rms_scale: target update RMS for ``"rms"`` (0.2, AdamW's).
    mu_dtype: dtype of both branches' first-moment buffers.
    adam_learning_rate: the AdamW branch's learning rate (default: ``learning_rate``).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps: AdamW's epsilon.
    param_labels: routing override (see above).
    dimension_numbers: fan-in/fan-out axes per leaf (see :func:`scale_by_muon`).
    layer_axis: the layer axis of scanned stacks (see :func:`scale_by_muon`);
      a stacked vector counts as a vector for the routing.
    per_head: per-head orthogonalisation of attention kernels (see
      :func:`scale_by_muon`).
    mesh: run Newton–Schulz device-local on this mesh (see :func:`scale_by_muon`).

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.partition``). Its
    ``update`` accepts and ignores ``max_logits=``, so one train step serves
    ``muon``, ``muonclip`` and ``optax.adamw``.

  Raises:
    ValueError: negative learning rate or weight decay, and the errors of
      :func:`scale_by_muon` and of the routing (naming the parameter path).

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025 (§2.2: update RMS matched to
    AdamW's, decoupled weight decay).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import muonclip_jax as mc
    >>> params = {"mlp": {"kernel": jnp.ones((16, 32))}, "norm": {"scale": jnp.ones(16)}}
    >>> tx = mc.muon(learning_rate=0.02)
    >>> state = tx.init(params)
    >>> grads = {"mlp": {"kernel": jnp.eye(16, 32)}, "norm": {"scale": jnp.ones(16)}}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["mlp"]["kernel"].shape
    (16, 32)
  """
  _check_nonnegative("learning_rate", learning_rate)
  _check_nonnegative("weight_decay", weight_decay)
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  _check_nonnegative("adam_learning_rate", adam_learning_rate)
  muon_tx = optax.chain(
      scale_by_muon(beta, nesterov=nesterov, newton_schulz=newton_schulz, coeffs=coeffs,
                    steps=steps, ns_dtype=ns_dtype, method=method, restarts=restarts,
                    eps=eps, shape_scaling=shape_scaling, rms_scale=rms_scale, mu_dtype=mu_dtype,
                    dimension_numbers=dimension_numbers, layer_axis=layer_axis,
                    per_head=per_head, mesh=mesh),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  adam_tx = optax.adamw(adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                        weight_decay=weight_decay, mask=weight_decay_mask, mu_dtype=mu_dtype)
  return optax.partition(
      {MUON: muon_tx, ADAMW: adam_tx},
      lambda params: resolve_labels(params, param_labels, layer_axis=layer_axis),
  )
