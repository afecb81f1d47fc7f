"""QK-Clip: per-head rescaling of query and key weights after the update.

Kimi K2 (arXiv 2507.20534, Algorithm 1) bounds attention logits with a
post-update rescaling. With ``S_max^h`` the largest pre-softmax logit of head
``h`` in the step's forward pass (over the batch and positions, after the
``1/sqrt(d)`` scale and the mask, before any soft-cap),

.. math::
  \\gamma_h = \\min\\left(1, \\frac{\\tau}{S_{\\max}^h}\\right), \\qquad
  W_q^h \\leftarrow \\sqrt{\\gamma_h}\\, W_q^h, \\quad
  W_k^h \\leftarrow \\sqrt{\\gamma_h}\\, W_k^h,

applied to the weights *after* the optimizer's update, so the head's logit on
the same inputs becomes ``min(S_max^h, tau)``. Only heads with
``S_max^h > tau`` are touched; values and output projections never are.
MLA, GQA/MQA, fused QKV, QK-norm and scanned stacks are described in
:mod:`muonclip_jax._qk_layouts`.

:func:`qk_clip` is an ``optax.GradientTransformationExtraArgs`` chained *after*
the optimizer; it turns the optimizer's update ``u`` of an affected entry into
``(p + u) * f - p``, so ``optax.apply_updates(params, updates)`` gives K2's
post-update weights ``(p + u) * f``; entries with ``f = 1`` keep ``u`` bit for bit.

Usage (linen)::

  tx = optax.chain(muon(lr), qk_clip(tau=100.0))   # or muonclip(lr, tau=100.0)
  def loss_fn(params, batch):
    logits, state = model.apply({'params': params}, batch,
                                mutable=['intermediates'])
    return loss(logits, batch), state['intermediates']
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params, max_logits=stats)
  params = optax.apply_updates(params, updates)

Usage (NNX)::

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  def loss_fn(model, batch):
    logits, stats = nnx.capture(model, nnx.Intermediate)(batch)
    return loss(logits, batch), stats
  (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  optimizer.update(model, grads, max_logits=stats)

The attention layers must sow ``max_logits`` (see
:func:`muonclip_jax.dot_product_attention`: ``attention_fn=dot_product_attention``
and ``sow_weights=True``, or the ``MaxLogit*`` modules).

Distributed and accumulated statistics must be reduced with ``max``, never
summed. Under ``jax.jit`` with a sharded batch the sown ``jnp.max`` is already
global. Inside ``shard_map``/``pmap`` call :func:`reduce_max_logits` (``lax.pmax``)
over the data (and context) parallel axes before ``update``.

Gradient accumulation with ``optax.MultiSteps``: MultiSteps calls the inner
update on every micro-step but keeps the inner state only on the last one,
so a ``qk_clip`` *inside* ``MultiSteps`` would see only the last micro-batch's
statistics. Either

* put ``qk_clip`` *outside* with the same schedule:
  ``optax.chain(optax.MultiSteps(muon(lr), k).gradient_transformation(),
  qk_clip(tau, every_k_schedule=k))`` (``muonclip(..., every_k_schedule=k)``
  builds this): it keeps a running ``max`` of the statistics in its state and
  clips once, when the accumulated update is applied; or
* keep a running max yourself with :func:`accumulate_max_logits` and pass it
  on every micro-step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from muonclip_jax._paths import leaves_with_paths, show_path
from muonclip_jax._qk_discovery import (  # noqa: F401  (LAYOUT_HINT: old import path)
  LAYOUT_HINT,
  PRODUCER_HINT,
  LayoutsLike,
  empty_stats_error,
  find_attention_layers,
  no_layers_error,
  no_params_error,
  qk_norm_bypassed,
)
from muonclip_jax._qk_factors import factor_array, slot_factors
from muonclip_jax._qk_layouts import GQA_SHARINGS, GQASharing, Layer, Path
from muonclip_jax._qk_statistics import (  # noqa: F401  (re-exported: old import path)
  accumulate_max_logits,
  collect_max_logits,
  param_prefix,
  reduce_max_logits,
)
from muonclip_jax._statistic import STATISTICS_CONTRACT

Schedule = int | Callable[[jax.Array], jax.Array]
_MISSING = object()

class QKClipState(NamedTuple):
  """State of :func:`qk_clip`: telemetry for logging and micro-step accumulation.

  Attributes:
    max_logits: per attention layer (keyed by its ``'/'``-joined module path),
      the statistics used at the last clipping step, ``[layers..., heads]``
      (``-inf`` before the first).
    num_clipped: heads clipped at the last clipping step (int32).
    clipped_total: heads clipped, summed over all steps (int32).
    num_skipped: non-finite or non-positive statistics at the last clipping
      step; those heads were left alone (int32).
    skipped_total: the same, summed over all steps (int32).
    acc_max_logits: running max over the current micro-steps
      (``every_k_schedule``; unused otherwise).
    mini_step: micro-step within the current accumulation (``every_k_schedule``).
    gradient_step: clipping steps taken.

  With several JAX processes every field is a global array with the same
  value on every process (the statistics are global maxima). The counters are
  scalars, so ``int(state.num_clipped)`` works on each process; read a
  ``max_logits`` vector that XLA left sharded over heads with
  ``jax.experimental.multihost_utils.process_allgather``.
  """

  max_logits: dict[str, jax.Array]
  num_clipped: jax.Array
  clipped_total: jax.Array
  num_skipped: jax.Array
  skipped_total: jax.Array
  acc_max_logits: dict[str, jax.Array]
  mini_step: jax.Array
  gradient_step: jax.Array


# --------------------------------------------------------------------------
# The transformation.


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _as_schedule(every_k_schedule: Schedule | None) -> Callable[[jax.Array], jax.Array] | None:
  if every_k_schedule is None:
    return None
  if callable(every_k_schedule):
    return every_k_schedule
  if _is_concrete(every_k_schedule) and int(every_k_schedule) < 1:
    raise ValueError(f"every_k_schedule must be >= 1, got {every_k_schedule}")
  return lambda step: every_k_schedule


class _Accumulated(NamedTuple):
  """The statistics a step acts on, after micro-step accumulation."""

  emit: jax.Array  # this step clips (always, without every_k_schedule)
  used: dict[str, jax.Array]  # per layer name, the statistic (max over micro-steps)
  acc_max_logits: dict[str, jax.Array]
  mini_step: jax.Array


def owning_layer(module: Path, layers: Mapping[Path, Layer],
                 shapes: Mapping[Path, tuple[int, ...]]) -> Path | None:
  """The attention layer a statistic sown at ``module`` belongs to, or ``None``.

  ``module`` itself when it is a layer. A statistic sown on a module that holds
  no parameter (MaxText's ``.../self_attention/attention_op``) belongs to its
  nearest ancestor that holds parameters, if that ancestor is a layer.
  """
  if module in layers:
    return module
  def holds_parameters(m: Path) -> bool:
    return any(len(p) > len(m) and p[:len(m)] == m for p in shapes)

  if holds_parameters(module):
    return None  # a module with parameters of its own that is no attention layer
  for i in range(len(module) - 1, -1, -1):
    if module[:i] in layers:
      return module[:i]
    if holds_parameters(module[:i]):
      return None  # the nearest ancestor with parameters is no attention layer
  return None


def head_statistic(s: jax.Array, layer: Layer, where: str) -> jax.Array:
  """``s`` as ``[layers..., heads]``: batch axes between the layer axes and heads max-reduced.

  The statistics contract: ``[layers..., batch..., heads]``. The layer axes
  (known from the parameters: ``layer.lead``) come first, as ``jax.lax.scan``,
  ``nn.scan`` and ``nnx.scan`` stack what a scanned body sows; any axes between
  them and the heads are batch axes (MaxText sows ``[batch, heads]``) and are
  max-reduced. Anything else is refused, never guessed.
  """
  shape, lead, heads = tuple(s.shape), layer.lead, layer.num_heads
  want = lead + (heads,)
  if shape == want:
    return s
  n = len(lead)
  if len(shape) > n + 1 and shape[:n] == lead and shape[-1] == heads:
    return jnp.max(s, axis=tuple(range(n, len(shape) - 1)))
  raise ValueError(
      f"qk_clip: statistics at {where} have shape {shape}, expected {want} for layout "
      f"{layer.layout.name!r} (statistics contract: {STATISTICS_CONTRACT}: the "
      f"layer (scan) axes {lead} of the parameters first, as a scan stacks them, then "
      f"any batch axes, which are max-reduced, then the {heads} query heads last; "
      f"parameters that keep their layer axis elsewhere than first, like MaxText's "
      f"param_scan_axis=1, declare it with scan_axis= on their layout)")


def _match_statistics(stats: dict[Path, jax.Array], layers: dict[Path, Layer], cut: int,
                      params: Any, layouts: Any, strict: bool) -> dict[Path, jax.Array]:
  """Step 1: every statistic belongs to an attention layer, as ``[layers..., heads]``.

  Statistics of one layer (its own and a parameter-less child's) are max-reduced.
  """
  leaves, _ = leaves_with_paths(params)
  shapes = {p[cut:]: tuple(jnp.shape(leaf)) for p, leaf in leaves}
  out: dict[Path, jax.Array] = {}
  for module, s in stats.items():
    owner = owning_layer(module, layers, shapes)
    if owner is None:
      raise no_params_error(module, layers, layouts, shapes)
    where = repr(show_path(module)) + (
        f" (for the attention layer {show_path(owner)!r})" if owner != module else "")
    v = head_statistic(s, layers[owner], where)
    out[owner] = jnp.maximum(out[owner], v) if owner in out else v
  if strict:
    missing = [show_path(m) for m in layers if m not in out]
    if missing:
      raise ValueError(
          f"qk_clip: no max_logits for attention layers {missing} (strict=True); "
          f"statistics came for {[show_path(m) for m in stats]}. Pass strict=False to "
          f"leave layers without statistics unclipped. {PRODUCER_HINT}")
  return out


def _accumulate(stats: dict[Path, jax.Array], state: QKClipState,
                schedule: Schedule | None) -> _Accumulated:
  """Step 2: the running max over micro-steps; clip only when the update is emitted."""
  if schedule is None:
    used = {show_path(m): s.astype(jnp.float32) for m, s in stats.items()}
    return _Accumulated(jnp.asarray(True), used, state.acc_max_logits, state.mini_step)
  emit = state.mini_step >= jnp.asarray(schedule(state.gradient_step)) - 1
  used, acc = {}, dict(state.acc_max_logits)
  for m, s in stats.items():
    name = show_path(m)
    used[name] = jnp.maximum(state.acc_max_logits[name], s.astype(jnp.float32))
    acc[name] = jnp.where(emit, -jnp.inf, used[name])
  mini_step = jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32)
  return _Accumulated(emit, used, acc, mini_step)


def _clip_factors(stats: dict[Path, jax.Array], layers: dict[Path, Layer], acc: _Accumulated,
                  tau: jax.Array, gqa_sharing: GQASharing, gqa_alpha: float
                  ) -> tuple[dict[Path, jax.Array], jax.Array, jax.Array]:
  r"""Step 3: per query/key parameter, the factor of each head slot.

  ``gamma_h = tau / S_max^h`` for every finite, positive statistic above
  ``tau`` (1 elsewhere; non-finite or non-positive ones are counted as skipped
  and never touch the weights), split between queries and keys by the layout.
  """
  factors: dict[Path, jax.Array] = {}
  num_clipped = jnp.zeros([], jnp.int32)
  num_skipped = jnp.zeros([], jnp.int32)
  for m in stats:
    layer = layers[m]
    s = acc.used[show_path(m)]
    valid = jnp.isfinite(s) & (s > 0)
    clip = valid & (s > tau) & (tau > 0) & acc.emit
    gamma = jnp.where(clip, tau / jnp.where(clip, s, 1.0), 1.0)
    num_clipped += jnp.sum(clip, dtype=jnp.int32)
    num_skipped += jnp.sum(~valid & acc.emit, dtype=jnp.int32)
    for target, f in zip(layer.targets, slot_factors(layer, gamma, gqa_sharing, gqa_alpha)):
      full = factor_array(target, f)
      factors[target.param] = factors[target.param] * full if target.param in factors else full
  return factors, num_clipped, num_skipped


def _offsets(layers: Mapping[Path, Layer]) -> dict[Path, float]:
  """Per parameter, the offset of its gain form (``1 + scale``: 1); 0 for plain factors."""
  out: dict[Path, float] = {}
  for layer in layers.values():
    for t in layer.targets:
      if out.setdefault(t.param, t.spec.offset) != t.spec.offset:
        raise ValueError(f"qk_clip: layout {layer.layout.name!r} gives "
                         f"{show_path(t.param)!r} two gain offsets, {out[t.param]} and "
                         f"{t.spec.offset}")
  return out


def _rescale_updates(updates: Any, params: Any, factors: dict[Path, jax.Array],
                     offsets: Mapping[Path, float], cut: int) -> Any:
  """Step 4: updates that land each clipped weight on ``factor * (W + u)``.

  A gain stored with an offset ``c`` (it acts as ``W + c``) lands on
  ``factor * (W + u + c) - c``.
  """
  u_leaves, treedef = leaves_with_paths(updates)
  p_by_path = {p[cut:]: leaf for p, leaf in leaves_with_paths(params)[0]}
  out = []
  for path, u in u_leaves:
    f = factors.get(path[cut:])
    if f is None:
      out.append(u)
      continue
    p = jnp.asarray(p_by_path[path[cut:]], jnp.float32)
    c = offsets.get(path[cut:], 0.0)
    if c:
      clipped = (p + u.astype(jnp.float32) + c) * f - c - p
    else:
      clipped = (p + u.astype(jnp.float32)) * f - p
    out.append(jnp.where(f != 1.0, clipped.astype(u.dtype), u))
  return jax.tree_util.tree_unflatten(treedef, out)


def _next_state(state: QKClipState, acc: _Accumulated, num_clipped: jax.Array,
                num_skipped: jax.Array) -> QKClipState:
  """The telemetry of an emitted step, the counters, and the accumulation."""
  keep = lambda new, old: jnp.where(acc.emit, new, old)
  telemetry = dict(state.max_logits)
  for name, s in acc.used.items():
    telemetry[name] = keep(s, state.max_logits[name])
  return QKClipState(
      max_logits=telemetry,
      num_clipped=keep(num_clipped, state.num_clipped),
      clipped_total=state.clipped_total + num_clipped,
      num_skipped=keep(num_skipped, state.num_skipped),
      skipped_total=state.skipped_total + num_skipped,
      acc_max_logits=acc.acc_max_logits,
      mini_step=acc.mini_step,
      gradient_step=(state.gradient_step + acc.emit.astype(jnp.int32)).astype(jnp.int32),
  )


def qk_clip(
    tau: float | jax.Array = 100.0,
    *,
    layouts: LayoutsLike = None,
    gqa_sharing: GQASharing = "query",
    gqa_alpha: float = 0.5,
    auto_detect: bool = True,
    strict: bool = True,
    every_k_schedule: Schedule | None = None,
    allow_no_attention: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """QK-Clip (Kimi K2, arXiv 2507.20534): rescale hot heads' q/k weights after the update.

  For every attention layer and head ``h`` with statistic ``S_max^h > tau``,
  ``gamma_h = tau / S_max^h`` and the head's query and key parameters are
  scaled so that its logit scales by ``gamma_h`` (``sqrt(gamma_h)`` each for
  MHA; see :mod:`muonclip_jax._qk_layouts` for GQA, MLA, QK-norm, fused QKV).
  The returned update for an affected entry is ``(p + u) * f - p``, so
  ``optax.apply_updates`` yields ``(p + u) * f``, K2's post-update weights;
  every other entry's update passes through unchanged (bitwise).

  Chain it *after* the optimizer and pass the step's statistics::

    tx = optax.chain(optimizer, qk_clip(tau))
    updates, state = tx.update(grads, state, params, max_logits=stats)

  ``stats`` is what Flax returns: linen's ``'intermediates'`` collection (from
  ``mutable=['intermediates']``) or NNX's ``State`` of ``nnx.Intermediate``
  (``nnx.capture`` / ``nnx.pop``), or a plain dict built by hand-written code;
  each ``max_logits`` entry is matched to the attention parameters at the same
  module path, or, when sown on a module that holds no parameters (MaxText's
  ``attention_op``), at its nearest ancestor that holds parameters. Its shape is
  ``[layers..., batch..., heads]``: the layer (scan) axes of the parameters
  first, then any batch axes (max-reduced), then the query heads.

  Args:
    tau: the logit bound (K2: 100; 30 in their small ablation). Must be
      positive; works under ``optax.inject_hyperparams`` (a traced ``tau <= 0``
      disables clipping).
    layouts: where the query/key parameters are, for modules other than
      Flax's attention: a :class:`QKLayout` or ``{fnmatch pattern over module
      paths: QKLayout}``.
    gqa_sharing: how ``gamma`` is shared when key heads are fewer than query
      heads: ``"query"`` (all on the query head; default), ``"group"`` or
      ``"split"``.
    gqa_alpha: the query's exponent for ``gqa_sharing="group"``.
    auto_detect: find Flax attention modules (``query``/``key``/``value``/``out``)
      by parameter names.
    strict: every attention layer found must receive statistics on every
      update (catches layers called without ``sow_weights=True``).
    every_k_schedule: for gradient accumulation, the ``optax.MultiSteps``
      schedule when this transform is chained *after* ``MultiSteps``: the
      statistics are max-reduced over the micro-steps in the state and the clip
      is applied once, on the micro-step where the accumulated update is
      emitted (an int, or a function of the clipping-step count). It counts
      micro-steps itself, so it must match ``MultiSteps``'s schedule, and
      ``MultiSteps(should_skip_update_fn=...)`` (skipped micro-steps) is not
      supported.
    allow_no_attention: accept parameters with no attention layer (``init``
      and ``update`` raise otherwise, since the transform would do nothing);
      with none found, ``update`` then passes updates through and accepts empty
      statistics.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``max_logits=`` (required).

  Raises:
    ValueError: ``tau <= 0``; unknown ``gqa_sharing``; a layout that matches
      nothing; no attention layer found (unless ``allow_no_attention``);
      statistics that are missing, empty (no ``max_logits`` entry), have no
      matching parameters or the wrong shape (at trace time, naming the path
      and how each framework produces them).

  References:
    Kimi Team, `Kimi K2: Open Agentic Intelligence
    <https://arxiv.org/abs/2507.20534>`_, 2025 (§2.1, QK-Clip; Algorithm 1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import muonclip_jax as mc
    >>> attn = {n: {"kernel": jnp.ones((8, 2, 4))} for n in ("query", "key", "value")}
    >>> attn["out"] = {"kernel": jnp.ones((2, 4, 8))}
    >>> params = {"attn": attn}
    >>> tx = mc.qk_clip(tau=2.0)
    >>> state = tx.init(params)
    >>> zero = jax.tree.map(jnp.zeros_like, params)
    >>> stats = {"attn": {"max_logits": (jnp.array([8.0, 1.0]),)}}  # head 0 is hot
    >>> updates, state = tx.update(zero, state, params, max_logits=stats)
    >>> new = optax.apply_updates(params, updates)
    >>> [float(new["attn"][n]["kernel"][0, 0, 0]) for n in ("query", "key")]  # sqrt(2/8)
    [0.5, 0.5]
    >>> float(new["attn"]["query"]["kernel"][0, 1, 0])  # head 1 untouched
    1.0
  """
  # numpy, not jnp: under jax.jit a jnp op on a Python float is already a tracer.
  if _is_concrete(tau) and not float(np.max(np.asarray(tau))) > 0:
    raise ValueError(f"qk_clip: tau must be positive, got {tau}")
  if gqa_sharing not in GQA_SHARINGS:
    raise ValueError(f"qk_clip: gqa_sharing must be one of {GQA_SHARINGS}, got "
                     f"{gqa_sharing!r}")
  if _is_concrete(gqa_alpha) and not 0.0 <= float(gqa_alpha) <= 1.0:
    raise ValueError(f"qk_clip: gqa_alpha must be in [0, 1], got {gqa_alpha}")
  schedule = _as_schedule(every_k_schedule)

  def _shapes(params: Any) -> dict[Path, tuple[int, ...]]:
    leaves, _ = leaves_with_paths(params)
    cut = param_prefix([p for p, _ in leaves])
    return {p[cut:]: tuple(jnp.shape(leaf)) for p, leaf in leaves}

  def find_layers(params: Any) -> tuple[dict[Path, Layer], int]:
    leaves, _ = leaves_with_paths(params)
    paths = [p for p, _ in leaves]
    cut = param_prefix(paths)
    shapes = {p[cut:]: tuple(jnp.shape(leaf)) for p, leaf in leaves}
    layers = find_attention_layers(shapes, layouts, auto_detect)
    if not layers and not allow_no_attention:
      raise no_layers_error(shapes, layouts, auto_detect)
    return layers, cut

  def init_fn(params: optax.Params) -> QKClipState:
    layers, _ = find_layers(params)
    bypassed = qk_norm_bypassed(layers, _shapes(params))
    if bypassed:
      warnings.warn(
          f"qk_clip: attention layers {bypassed} (layer: QK-norm modules) have a QK-norm "
          f"that their layout leaves alone, while it scales the projections: a norm after "
          f"the projection cancels that scaling, so heads would be counted clipped and no "
          f"logit would change. Clip the norm gains instead: layouts=muonclip_jax.qk_norm("
          f"'<query norm>', '<key norm>', num_heads=..., gain='scale' or 'one_plus'). Ignore "
          f"this if those norms act before the projections.", UserWarning, stacklevel=2)
    neg = {show_path(m): jnp.full(layer.lead + (layer.num_heads,), -jnp.inf, jnp.float32)
           for m, layer in layers.items()}
    zero = jnp.zeros([], jnp.int32)
    return QKClipState(max_logits=neg, num_clipped=zero, clipped_total=zero,
                       num_skipped=zero, skipped_total=zero,
                       acc_max_logits=dict(neg), mini_step=zero, gradient_step=zero)

  def update_fn(updates: optax.Updates, state: QKClipState,
                params: optax.Params | None = None, *, max_logits: Any = _MISSING,
                **extra_args: Any) -> tuple[optax.Updates, QKClipState]:
    del extra_args
    if params is None:
      raise ValueError("qk_clip: update needs params (it rescales post-update weights)")
    if max_logits is _MISSING or max_logits is None:
      raise ValueError(
          "qk_clip: update needs this step's attention statistics: "
          "tx.update(grads, state, params, max_logits=stats) "
          "(nnx.Optimizer.update(model, grads, max_logits=stats)), stats holding "
          f"'max_logits' entries. {PRODUCER_HINT}")
    layers, cut = find_layers(params)
    collected = collect_max_logits(max_logits)
    if not collected:
      if not layers:  # allow_no_attention: nothing to clip, nothing to check
        return updates, state
      raise empty_stats_error(max_logits, layers)
    stats = _match_statistics(collected, layers, cut, params, layouts, strict)
    acc = _accumulate(stats, state, schedule)
    factors, num_clipped, num_skipped = _clip_factors(
        stats, layers, acc, jnp.asarray(tau, jnp.float32), gqa_sharing, gqa_alpha)
    new_updates = _rescale_updates(updates, params, factors, _offsets(layers), cut)
    return new_updates, _next_state(state, acc, num_clipped, num_skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
