"""MuonClip on real third-party models: Gemma (linen), Equinox, hand-written JAX.

One row per family (issue 16, §5), each with random weights and a tiny
config, through a real ``muonclip`` training step at learning rate 0 (so only
QK-Clip acts):

* lines of model code changed and lines of user glue, counted from this file's
  ``# model-line`` and ``# glue`` markers. Glue is what a family needs beyond
  the package's standard MuonClip step (which, for any model, returns the
  step's statistics from the loss and passes them as ``max_logits=``);
* the statistic the package collects versus a brute-force max over the model's
  own logits (recorded from the library's own attention code; pre-soft-cap);
* the clipped heads' distance from ``tau`` after the step, and the cool heads'
  change, both recomputed from the model's own logits on the *same* layer
  inputs (QK-Clip's guarantee is per head, on the step's inputs);
* Muon routing checked leaf by leaf against the view each parameter should
  get (:func:`muonclip_jax.muon_routing`).

MaxText (Python 3.12 only) is measured by ``benchmarks/maxtext_models.py``.

Usage: ``python -m benchmarks.real_models`` (writes its section of RESULTS.md;
``--quick`` prints only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import muonclip_jax as mc
from benchmarks import _common

B, T, D, H, LAYERS, VOCAB = 2, 8, 32, 4, 2, 64


class Row(NamedTuple):
  """One family's measurements."""

  family: str
  model_lines: int
  glue_lines: int
  stat_abs: float
  stat_rel: float
  clipped_rel: float
  n_clipped: int
  cool_rel: float
  n_cool: int
  routing_ok: int
  routing_total: int
  note: str = ""


def count_markers(fn: Callable[..., Any]) -> tuple[int, int]:
  """``(model lines, glue lines)``: ``fn``'s lines marked ``# model-line`` / ``# glue``."""
  src = inspect.getsource(fn)
  return (len(re.findall(r"#\s*model-line", src)), len(re.findall(r"#\s*glue\b", src)))


def clip_tau(stats: dict[str, np.ndarray], per_layer_one: bool = False) -> float:
  """A ``tau`` below the hottest heads and above the coolest ones.

  ``per_layer_one``: at most one head above ``tau`` per layer (shared QK-norm
  gains clip a whole layer by its hottest head's factor).
  """
  allv = np.sort(np.concatenate([v.ravel() for v in stats.values()]))
  if not per_layer_one:
    return float(allv[len(allv) // 2 - 1] + allv[len(allv) // 2]) / 2
  second = max(float(np.sort(v)[-2]) for v in stats.values())
  top = max(float(v.max()) for v in stats.values())
  return (second + top) / 2


def compare(before: dict[str, np.ndarray], after: dict[str, np.ndarray], tau: float,
            expected: Callable[[str, np.ndarray], np.ndarray] | None = None
            ) -> tuple[float, int, float, int]:
  """Clipped heads' relative distance from their target, cool heads' relative change.

  The target of a head above ``tau`` is ``tau``; ``expected(layer, before)``
  overrides the per-head targets (shared gains scale a whole layer).
  """
  clipped, cool, n_clipped, n_cool = 0.0, 0.0, 0, 0
  for name, s0 in before.items():
    s1 = after[name]
    want = expected(name, s0) if expected else np.where(s0 > tau, tau, s0)
    hot = s0 > tau
    if hot.any():
      clipped = max(clipped, float(np.max(np.abs(s1[hot] - want[hot]) / want[hot])))
      n_clipped += int(hot.sum())
    if (~hot).any():
      cool = max(cool, float(np.max(np.abs(s1[~hot] - want[~hot]) / np.abs(want[~hot]))))
      n_cool += int((~hot).sum())
  return clipped, n_clipped, cool, n_cool


def routing_check(params: Any, expect: Callable[[str, tuple[int, ...]], tuple[str, Any]],
                  **kwargs: Any) -> tuple[int, int, list[str]]:
  """Leaves whose label and ``(batch, fan_in, fan_out)`` view match ``expect(path, shape)``."""
  report = mc.muon_routing(params, **kwargs)
  ok, bad = 0, []
  for leaf in report.leaves:
    label, matrix = expect(leaf.path, leaf.shape)
    if leaf.label == label and (label == "adamw" or tuple(leaf.matrix) == tuple(matrix)):
      ok += 1
    else:
      bad.append(f"{leaf.path} {leaf.shape}: got {leaf.label} {leaf.matrix}, "
                 f"want {label} {matrix}")
  return ok, len(report.leaves), bad


def stat_error(collected: dict[str, np.ndarray], brute: dict[str, np.ndarray]
               ) -> tuple[float, float]:
  assert set(collected) == set(brute), (sorted(collected), sorted(brute))
  ab = max(float(np.max(np.abs(collected[k] - brute[k]))) for k in brute)
  rel = max(float(np.max(np.abs(collected[k] - brute[k]) / np.abs(brute[k]))) for k in brute)
  return ab, rel


def flat_stats(tree: Any) -> dict[str, np.ndarray]:
  """``{module path: statistic}`` from a statistics tree (``max_logits`` leaves)."""
  return {"/".join(k): np.asarray(v) for k, v in mc.collect_max_logits(tree).items()}


# --------------------------------------------------------------------------
# Gemma (linen): DeepMind's gemma 3.3.0 Attention/Block modules.

# One tiny model with every attention feature Gemma's modules have: layer 0 is
# MHA (qkv_einsum) with soft-cap and a sliding window; layer 1 is GQA
# (q_einsum + kv_einsum) with QK-norm ((1 + scale) gains) and soft-cap, global.
GEMMA_LAYERS = (
    # (num_kv_heads, soft-cap, qk-norm, attention type)
    (H, 5.0, False, "LOCAL_SLIDING"),
    (2, 5.0, True, "GLOBAL"),
)
GEMMA_FEATURES = "MHA + soft-cap + sliding window; GQA + QK-norm + soft-cap"


def _gemma_attn_kwargs(modules: Any, i: int) -> dict[str, Any]:
  kv, softcap, qk_norm, kind = GEMMA_LAYERS[i]
  return dict(num_heads=H, num_kv_heads=kv, head_dim=D // H,
              attn_type=getattr(modules.AttentionType, kind),
              query_pre_attn_scalar=(D // H) ** -0.5, attn_logits_soft_cap=softcap,
              sliding_window_size=4, use_qk_norm=qk_norm)


def gemma_model(modules: Any, jit: bool = True) -> Any:
  """A tiny Gemma decoder from the library's Embedder and Blocks, ``__call__`` in ``nn.jit``.

  ``gemma.gm.nn.Transformer`` is this (plus vision and caches), with its
  ``__call__`` wrapped in ``nn.jit`` the same way. ``jit=False`` gives the
  same model (same parameters) without it, for the brute-force probes.
  """
  from flax import linen as nn  # noqa: PLC0415

  class TinyGemma(nn.Module):
    def setup(self):
      self.embedder = modules.Embedder(vocab_size=VOCAB, embed_dim=D)
      self.blocks = [modules.Block(
          embed_dim=D, hidden_dim=2 * D, use_post_attn_norm=True, use_post_ffw_norm=True,
          transpose_gating_einsum=True, name=f"layer_{i}", **_gemma_attn_kwargs(modules, i))
          for i in range(len(GEMMA_LAYERS))]

    def forward(self, tokens):
      x = self.embedder.encode(tokens)
      pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None].repeat(tokens.shape[0], 0)
      for block in self.blocks:
        _, x = block(x, pos, None, mask)
      return self.embedder.decode(x)

    def __call__(self, tokens):
      return self.forward(tokens)

  if jit:
    TinyGemma.__call__ = functools.partial(nn.jit, static_argnames=("self",))(
        TinyGemma.__call__)
  return TinyGemma()


class _Recorder:
  """Stands in for ``jnp`` inside gemma's ``_modules``: records the logits einsum and mask."""

  LOGITS = ("BTNH,BSNH->BTNS", "BTKGH,BSKH->BTKGS")

  def __init__(self) -> None:
    self.logits: list[jax.Array] = []
    self.masks: list[jax.Array] = []

  def __getattr__(self, name: str) -> Any:
    return getattr(jnp, name)

  def einsum(self, spec: str, *args: Any, **kwargs: Any) -> jax.Array:
    out = jnp.einsum(spec, *args, **kwargs)
    if spec in self.LOGITS:
      self.logits.append(out)
    return out

  def where(self, cond: Any, *args: Any) -> jax.Array:
    self.masks.append(cond)
    return jnp.where(cond, *args)


@contextlib.contextmanager
def _recording(modules: Any):
  rec = _Recorder()
  saved = modules.jnp
  modules.jnp = rec
  try:
    yield rec
  finally:
    modules.jnp = saved


def _head_max(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-head max of ``[B, T, heads..., S]`` logits where ``mask`` (``[B, T, 1, S]``)."""
  b, t, s = logits.shape[0], logits.shape[1], logits.shape[-1]
  full = logits.astype(jnp.float32).reshape(b, t, -1, s)
  return jnp.where(jnp.broadcast_to(mask, full.shape), full, -jnp.inf).max(axis=(0, 1, 3))


def gemma_probe(modules: Any, plain: Any) -> Callable[..., Any]:
  """Jitted: per layer, the brute-force max of Gemma's own logits, and each layer's inputs."""
  from flax import linen as nn  # noqa: PLC0415

  @jax.jit
  def probe(params, tokens):
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, modules.Attention) and context.method_name == "__call__":
        seen.append(args)
      return next_fun(*args, **kwargs)

    with _recording(modules) as rec, nn.intercept_methods(record):
      plain.apply({"params": params}, tokens, method="forward")
    inputs = [(x, pos, mask) for x, pos, _, mask in seen]
    return [_head_max(lg, m) for lg, m in zip(rec.logits, rec.masks, strict=True)], inputs

  return probe


def gemma_relogits(modules: Any) -> Callable[..., Any]:
  """Jitted: each layer's brute-force max logits with ``params`` on recorded ``inputs``."""
  @jax.jit
  def relogits(params, inputs):
    out = []
    for i, (x, pos, mask) in enumerate(inputs):
      attn = modules.Attention(features=D, **_gemma_attn_kwargs(modules, i))
      with _recording(modules) as rec:
        attn.apply({"params": params[f"layer_{i}"]["attn"]}, x, pos, None, mask)
      out.append(_head_max(rec.logits[0], rec.masks[0]))
    return out

  return relogits


def gemma_expect(path: str, shape: tuple[int, ...]) -> tuple[str, Any]:
  """The Muon view each Gemma parameter should get (label, (batch, fan_in, fan_out))."""
  last = path.split("/")[-2:]
  if len(shape) < 2 or "embedder" in path or last[-1] == "scale":
    return "adamw", None
  name = last[0]
  if name in ("qkv_einsum", "kv_einsum"):  # (3|2, N, D, Hd): each a D x N*Hd projection
    return "muon", (shape[0], shape[2], shape[1] * shape[3])
  if name == "q_einsum":                  # (N, D, Hd): one D x N*Hd projection
    return "muon", (1, shape[1], shape[0] * shape[2])
  if name == "attn_vec_einsum":           # (N, Hd, D): one N*Hd x D projection
    return "muon", (1, shape[0] * shape[1], shape[2])
  if last[-1] == "gating_einsum":         # (2, F, D), transpose_gating_einsum=True
    return "muon", (shape[0], shape[2], shape[1])
  if last[-1] == "linear":                # (F, D)
    return "muon", (1, shape[0], shape[1])
  return "?", None


def _scale_heads(params: Any, path: tuple[str, ...], factors: np.ndarray) -> Any:
  """Multiplies the query weights of each head of one layer by ``factors``."""
  def f(p, x):
    names = tuple(getattr(k, "key", "") for k in p)
    if names[:2] != path:
      return x
    if names[-2:] == ("qkv_einsum", "w"):     # (3, N, D, Hd): the q slice
      return x.at[0].multiply(jnp.asarray(factors, x.dtype)[:, None, None])
    if names[-2:] == ("q_einsum", "w"):       # (N, D, Hd)
      return x * jnp.asarray(factors, x.dtype)[:, None, None]
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def gemma_row(modules: Any, source: str) -> Row:
  """One muonclip step at lr 0 on a tiny Gemma; the row of measurements."""
  model, plain = gemma_model(modules), gemma_model(modules, jit=False)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
  params = jax.jit(plain.init)(jax.random.key(0), tokens)["params"]
  layers = [f"layer_{i}/attn" for i in range(len(GEMMA_LAYERS))]
  probe = gemma_probe(modules, plain)
  # Spread the heads: the QK-norm layer (its gains are shared by its heads)
  # gets one head above tau; the MHA layer (logits linear in each head's query
  # weights) gets heads at 2, 0.5, 1.5 and 0.7 tau.
  s0 = [np.asarray(v) for v in probe(params, tokens)[0]]
  top2 = np.sort(s0[1])[-2:]
  tau = float(top2.mean())
  params = _scale_heads(params, ("layer_0", "attn"), np.asarray([2.0, 0.5, 1.5, 0.7]) * tau / s0[0])
  brute, inputs = probe(params, tokens)
  brute = {n: np.asarray(v) for n, v in zip(layers, brute, strict=True)}

  new_params, stats = gemma_step(model, tau, params)(params, tokens)
  stat_abs, stat_rel = stat_error(flat_stats(stats), brute)
  after = gemma_relogits(modules)(new_params, inputs)
  after = {n: np.asarray(v) for n, v in zip(layers, after, strict=True)}

  def expected(name, s):
    if GEMMA_LAYERS[layers.index(name)][2]:  # shared (1 + scale) gains: the layer scales
      return s * min(1.0, tau / float(s.max()))
    return np.where(s > tau, tau, s)
  clipped, n_clipped, cool, n_cool = compare(brute, after, tau, expected)
  ok, total, bad = routing_check(new_params, gemma_expect)
  model_lines, glue = count_markers(gemma_step)
  note = (f"{source}; {GEMMA_FEATURES}; in the QK-norm layer the (1 + scale) gains are "
          "shared by its heads, so its cool heads scale with its hottest one (measured "
          "against that)")
  if bad:
    note += "; routing mismatches: " + "; ".join(bad)
  return Row("Gemma", model_lines, glue, stat_abs, stat_rel, clipped, n_clipped, cool,
             n_cool, ok, total, note)


def gemma_step(model: Any, tau: float, params: Any) -> Callable[[Any, jax.Array], tuple[Any, Any]]:
  """The user's training step: MuonClip on a Gemma model (markers count the user's lines)."""
  tx = mc.muonclip(0.0, tau=tau, layouts=mc.gemma_layouts(params))  # glue

  def loss_fn(params, tokens):
    with mc.gemma_max_logits():  # glue
      logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), state["intermediates"]

  @jax.jit
  def step(params, tokens):
    opt_state = tx.init(params)
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, _ = tx.update(grads, opt_state, params, max_logits=stats)
    return optax.apply_updates(params, updates), stats

  return step


# --------------------------------------------------------------------------
# Equinox: eqx.nn.MultiheadAttention + RotaryPositionalEmbedding, scanned, vmapped.


def equinox_model(key: jax.Array) -> Any:
  """A tiny Equinox decoder: layers stacked with ``eqx.filter_vmap``, run with ``lax.scan``."""
  import equinox as eqx  # noqa: PLC0415

  class Block(eqx.Module):
    norm: eqx.nn.RMSNorm
    attn: eqx.nn.MultiheadAttention
    rope: eqx.nn.RotaryPositionalEmbedding
    mlp: eqx.nn.MLP

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.norm = eqx.nn.RMSNorm(D)
      self.attn = eqx.nn.MultiheadAttention(H, D, use_query_bias=True, use_key_bias=True,
                                            key=k1)
      self.rope = eqx.nn.RotaryPositionalEmbedding(D // H)
      self.mlp = eqx.nn.MLP(D, D, 2 * D, 1, key=k2)

    def heads(self, q, k, v):
      rope = jax.vmap(self.rope, in_axes=1, out_axes=1)
      return rope(q), rope(k), v

    def __call__(self, x, mask):
      h = jax.vmap(self.norm)(x)
      a, s = mc.equinox_attention(self.attn, h, h, h, mask, process_heads=self.heads)  # model-line
      x = x + a  # model-line
      return x + jax.vmap(self.mlp)(x), s  # model-line

  class Model(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: Block
    unembed: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.embed = eqx.nn.Embedding(VOCAB, D, key=k1)
      self.blocks = eqx.filter_vmap(Block)(jax.random.split(k2, LAYERS))
      self.unembed = eqx.nn.Linear(D, VOCAB, key=k3)

    def __call__(self, tokens):
      x = jax.vmap(self.embed)(tokens)
      mask = jnp.tril(jnp.ones((tokens.shape[0],) * 2, bool))
      params, static = eqx.partition(self.blocks, eqx.is_array)
      body = lambda x, p: eqx.combine(p, static)(x, mask)
      x, s = jax.lax.scan(body, x, params)  # model-line
      return jax.vmap(self.unembed)(x), s

  return Model(key)


def _filter_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  import equinox as eqx  # noqa: PLC0415
  return eqx.filter_jit(fn)


def equinox_layer_inputs(model: Any, tokens: jax.Array) -> list[jax.Array]:
  """Each layer's attention input ``(B, T, D)`` (the normed residual), layer by layer."""
  return _filter_jit(_equinox_layer_inputs)(model, tokens)


def _equinox_layer_inputs(model: Any, tokens: jax.Array) -> list[jax.Array]:
  x = jax.vmap(jax.vmap(model.embed))(tokens)
  mask = jnp.tril(jnp.ones((T, T), bool))
  out = []
  for i in range(LAYERS):
    blk = jax.tree.map(lambda a, i=i: a[i] if isinstance(a, jax.Array) else a, model.blocks)
    out.append(jax.vmap(jax.vmap(blk.norm))(x))
    x = jax.vmap(lambda xx, blk=blk: blk(xx, mask)[0])(x)
  return out


def equinox_brute(model: Any, inputs: list[jax.Array]) -> dict[str, np.ndarray]:
  """Brute force: every logit from the module's own projections and RoPE, max per head."""
  out = _filter_jit(_equinox_brute)(model, inputs)
  return {f"blocks/attn#{i}": np.asarray(v) for i, v in enumerate(out)}


def _equinox_brute(model: Any, inputs: list[jax.Array]) -> list[jax.Array]:
  mask = jnp.tril(jnp.ones((T, T), bool))
  out = []
  for i, h in enumerate(inputs):
    blk = jax.tree.map(lambda a, i=i: a[i] if isinstance(a, jax.Array) else a, model.blocks)
    mha = blk.attn

    def one(x, mha=mha, blk=blk):
      q = jax.vmap(mha.query_proj)(x).reshape(T, H, -1)
      k = jax.vmap(mha.key_proj)(x).reshape(T, H, -1)
      q, k, _ = blk.heads(q, k, k)
      logits = jnp.einsum("shd,Shd->hsS", q, k) / math.sqrt(q.shape[-1])
      return jnp.where(mask, logits, -jnp.inf)

    out.append(jax.vmap(one)(h).max(axis=(0, 2, 3)))
  return out


def equinox_expect(path: str, shape: tuple[int, ...]) -> tuple[str, Any]:
  """Stacked blocks: per-layer rank ``ndim - 1``; ``Linear`` weights ``(out, in)``."""
  stacked = path.startswith("blocks")
  if len(shape) - stacked < 2 or path.startswith(("embed", "unembed")):
    return "adamw", None
  lead = shape[0] if stacked else 1
  out_, in_ = shape[-2], shape[-1]  # Equinox Linear weights are (out, in)
  return "muon", (lead, in_, out_)


def equinox_step(model: Any, tau: float) -> Callable[..., Any]:
  """The user's training step: MuonClip on an Equinox model (markers count the user's lines)."""
  import equinox as eqx  # noqa: PLC0415

  params = eqx.filter(model, eqx.is_inexact_array)
  tx = mc.muonclip(0.0, tau=tau, layouts=mc.equinox_layouts(model))  # glue
  opt_state = tx.init(params)

  def loss_fn(model, tokens):
    logits, stats = jax.vmap(model)(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), stats

  @eqx.filter_jit
  def step(model, opt_state, tokens):
    (_, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, tokens)
    max_logits = mc.equinox_max_logits(model, stats)  # glue
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    return eqx.apply_updates(model, updates), max_logits

  return lambda model, tokens: step(model, opt_state, tokens)


def equinox_row() -> Row:
  import equinox as eqx  # noqa: PLC0415

  model = equinox_model(jax.random.key(0))
  model = eqx.tree_at(lambda m: m.blocks.attn.query_proj.weight, model,
                      model.blocks.attn.query_proj.weight
                      * jnp.repeat(jnp.asarray([3.0, 1.0, 2.0, 0.5]), D // H)[:, None])
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
  inputs = equinox_layer_inputs(model, tokens)
  brute = equinox_brute(model, inputs)
  tau = clip_tau(brute)
  new_model, stats = equinox_step(model, tau)(model, tokens)
  s = np.asarray(stats["blocks"]["attn"]["max_logits"])
  collected = {f"blocks/attn#{i}": s[i] for i in range(LAYERS)}
  stat_abs, stat_rel = stat_error(collected, brute)
  after = equinox_brute(new_model, inputs)
  clipped, n_clipped, cool, n_cool = compare(brute, after, tau)
  ok, total, bad = routing_check(eqx.filter(new_model, eqx.is_inexact_array), equinox_expect)
  model_lines = count_markers(equinox_model)[0]
  glue = count_markers(equinox_step)[1]
  note = f"equinox {eqx.__version__}; MultiheadAttention + RotaryPositionalEmbedding, lax.scan"
  note += (" over stacked layers, vmap over the batch; the statistic leaves the model as a "
           "return value (Equinox has no side channel): the attention call, the block's "
           "return and the scan's outputs")
  if bad:
    note += "; routing mismatches: " + "; ".join(bad)
  return Row("Equinox", model_lines, glue, stat_abs, stat_rel, clipped, n_clipped, cool,
             n_cool, ok, total, note)


# --------------------------------------------------------------------------
# Hand-written PyTorch-style attention: a dict of (out, in) arrays, plain JAX.

KV = 2


def torch_init(key: jax.Array) -> dict[str, Any]:
  """``q_proj``/``k_proj``/``v_proj``/``o_proj`` ``(out, in)`` weights, as a checkpoint has them."""
  ks = iter(jax.random.split(key, 64))
  lin = lambda o, i: {"weight": jax.random.normal(next(ks), (o, i)) / math.sqrt(i)}
  layers = []
  for _ in range(LAYERS):
    layers.append({
        "input_layernorm": {"weight": jnp.ones(D)},
        "self_attn": {"q_proj": lin(H * (D // H), D), "k_proj": lin(KV * (D // H), D),
                      "v_proj": lin(KV * (D // H), D), "o_proj": lin(D, H * (D // H))},
        "post_attention_layernorm": {"weight": jnp.ones(D)},
        "mlp": {"gate_proj": lin(2 * D, D), "up_proj": lin(2 * D, D),
                "down_proj": lin(D, 2 * D)},
    })
  return {"embed_tokens": {"weight": jax.random.normal(next(ks), (VOCAB, D))},
          "layers": layers, "norm": {"weight": jnp.ones(D)}, "lm_head": lin(VOCAB, D)}


def _rms(x: jax.Array, w: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def torch_attention(p: dict[str, Any], x: jax.Array, mask: jax.Array,
                    record: list | None = None) -> jax.Array:
  """GQA attention as a PyTorch port writes it (``x @ W.T``)."""
  b, t, _ = x.shape
  hd = D // H
  q = (x @ p["q_proj"]["weight"].T).reshape(b, t, H, hd)
  k = (x @ p["k_proj"]["weight"].T).reshape(b, t, KV, hd)
  v = (x @ p["v_proj"]["weight"].T).reshape(b, t, KV, hd)
  k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
  mc.record_max_logits(p, logits, mask=mask)  # model-line
  if record is not None:
    record.append(jnp.where(mask, logits, -jnp.inf).max(axis=(0, 2, 3)))
  probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, D)
  return out @ p["o_proj"]["weight"].T


def torch_forward(params: dict[str, Any], tokens: jax.Array, record: list | None = None,
                  inputs: list | None = None) -> jax.Array:
  x = params["embed_tokens"]["weight"][tokens]
  mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
  for layer in params["layers"]:
    h = _rms(x, layer["input_layernorm"]["weight"])
    if inputs is not None:
      inputs.append(h)
    x = x + torch_attention(layer["self_attn"], h, mask, record)
    h = _rms(x, layer["post_attention_layernorm"]["weight"])
    m = layer["mlp"]
    x = x + (jax.nn.silu(h @ m["gate_proj"]["weight"].T) * (h @ m["up_proj"]["weight"].T)
             ) @ m["down_proj"]["weight"].T
  return _rms(x, params["norm"]["weight"]) @ params["lm_head"]["weight"].T


def torch_step(tau: float) -> Callable[..., Any]:
  """The user's training step: MuonClip on the hand-written model (markers count the glue)."""
  tx = mc.muonclip(0.0, tau=tau, layouts=mc.torch_layout(H, KV))  # glue

  def loss_fn(params, tokens):
    with mc.max_logits_tape(params) as tape:  # glue
      logits = torch_forward(params, tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), tape.max_logits

  @jax.jit
  def step(params, tokens):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, _ = tx.update(grads, tx.init(params), params, max_logits=stats)
    return optax.apply_updates(params, updates), stats

  return step


def torch_expect(path: str, shape: tuple[int, ...]) -> tuple[str, Any]:
  if len(shape) < 2 or "embed" in path or "lm_head" in path or "norm" in path:
    return "adamw", None
  return "muon", (1, shape[1], shape[0])  # (out, in)


def torch_row() -> Row:
  params = torch_init(jax.random.key(0))
  for i, layer in enumerate(params["layers"]):
    w = layer["self_attn"]["q_proj"]["weight"]
    scale = jnp.repeat(jnp.asarray([3.0, 1.0, 2.0, 0.5]) * (1 + i), D // H)[:, None]
    layer["self_attn"]["q_proj"]["weight"] = w * scale
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
  names = [f"layers/{i}/self_attn" for i in range(LAYERS)]
  def probe(params, tokens):
    record, inputs = [], []
    torch_forward(params, tokens, record, inputs)
    return record, inputs
  record, inputs = jax.jit(probe)(params, tokens)
  brute = {n: np.asarray(r) for n, r in zip(names, record, strict=True)}
  tau = clip_tau(brute)
  new_params, stats = torch_step(tau)(params, tokens)
  stat_abs, stat_rel = stat_error(flat_stats(stats), brute)
  def relogits(params, inputs):
    mask = jnp.tril(jnp.ones((T, T), bool))
    rec: list = []
    for layer, h in zip(params["layers"], inputs, strict=True):
      torch_attention(layer["self_attn"], h, mask, rec)
    return rec
  after = dict(zip(names, map(np.asarray, jax.jit(relogits)(new_params, inputs)), strict=True))
  clipped, n_clipped, cool, n_cool = compare(brute, after, tau)
  ok, total, bad = routing_check(new_params, torch_expect)
  model_lines = count_markers(torch_attention)[0]
  glue = count_markers(torch_step)[1]
  note = "plain JAX, dict of (out, in) arrays, GQA 4/2, Python loop over layers"
  if bad:
    note += "; routing mismatches: " + "; ".join(bad)
  return Row("Hand-written (PyTorch-style)", model_lines, glue, stat_abs, stat_rel, clipped,
             n_clipped, cool, n_cool, ok, total, note)


# --------------------------------------------------------------------------


def rows(quick: bool = False) -> list[Row]:
  from benchmarks import _gemma_wheel  # noqa: PLC0415

  modules, source = _gemma_wheel.load()
  out = [gemma_row(modules, source)]
  out += [equinox_row(), torch_row()]
  del quick
  return out


def markdown(rs: list[Row]) -> str:
  headers = ["family", "model lines changed", "glue lines", "statistic vs brute force "
             "(max abs / rel)", "clipped heads: distance from tau (rel)",
             "cool heads: change (rel)", "Muon routing checked"]
  body = [[r.family, r.model_lines, r.glue_lines, f"{r.stat_abs:.1e} / {r.stat_rel:.1e}",
           f"{r.clipped_rel:.1e} ({r.n_clipped} heads)", f"{r.cool_rel:.1e} ({r.n_cool} heads)",
           f"{r.routing_ok}/{r.routing_total}"] for r in rs]
  notes = "\n".join(f"- {r.family}: {r.note}" for r in rs if r.note)
  return (f"Machine: {_common.machine()}.\n\n"
          + _common.table(headers, body) + "\n\n" + notes)


def main(argv: list[str] | None = None) -> list[Row]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="print only; leave RESULTS.md alone")
  args = p.parse_args(argv)
  rs = rows(args.quick)
  md = markdown(rs)
  print(md)
  if not args.quick:
    _common.write_section("MuonClip on real models (issue 16)", md)
  return rs


if __name__ == "__main__":
  with contextlib.suppress(KeyboardInterrupt):
    main()
  del math
