"""The layout vocabulary: what a layout must declare, and that declared layouts clip exactly.

Covers :mod:`muonclip_jax._qk_layouts`: orientations (``weight_layout=``),
QK-norm gain forms (``gain=``), scan axes (``scan_axis=``) and stacked
projections (``query_stack=``/``key_stack=``) are declared or refused, never
guessed; declared, they clip exactly as the brute force predicts.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.qk import (
  B,
  E,
  L,
  causal,
  check_clip_against_brute,
  check_heads,
  check_others_bitwise,
  flat,
  gammas,
  group_min,
  mlp_params,
  predicted,
  sgd0_clip,
  sgd_clip,
  x_input,
)

import muonclip_jax as mc

# --------------------------------------------------------------------------
# QK-norm gains stored as (1 + scale) (Gemma 2/3 RMSNorm, scale initialised at 0).


def _rms_one_plus(x, scale, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + np.asarray(
      scale, np.float64))


def brute_norm_head_max(p, x) -> np.ndarray:
  """Gemma's attention logits: RMSNorm(q) . RMSNorm(k) / sqrt(d), gains ``1 + scale``."""
  x = np.asarray(x, np.float64)
  q = _rms_one_plus(np.einsum("bte,ehd->bthd", x, np.asarray(p["q"]["kernel"], np.float64)),
                    p["query_norm"]["scale"])
  k = _rms_one_plus(np.einsum("bte,ehd->bthd", x, np.asarray(p["k"]["kernel"], np.float64)),
                    p["key_norm"]["scale"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return np.where(np.asarray(causal()), logits, -np.inf).max(axis=(0, 2, 3))


def one_plus_params(per_head: bool, seed: int = 8, heads: int = 4, dim: int = 8):
  rng = np.random.default_rng(seed)
  g = (heads, dim) if per_head else (dim,)
  # scale near its zero initialisation, gains 1 + scale around 2-3: logits of order 5-10
  mk = lambda *s, sd=1.0, mean=0.0: jnp.asarray(mean + sd * rng.standard_normal(s), jnp.float32)
  return {"attn": {"q": {"kernel": mk(E, heads, dim)}, "k": {"kernel": mk(E, heads, dim)},
                   "query_norm": {"scale": mk(*g, sd=0.3, mean=1.5)},
                   "key_norm": {"scale": mk(*g, sd=0.3, mean=1.5)}}}


@pytest.mark.parametrize("per_head", [True, False])
def test_qk_norm_one_plus_gain_lowers_the_logit(per_head):
  params = one_plus_params(per_head)
  x = x_input(9)
  before = brute_norm_head_max(params["attn"], x)
  tau = float(np.median(before))
  layout = mc.qk_norm("query_norm", "key_norm", num_heads=4, per_head=per_head,
                      gain="one_plus", bias=None)
  stats = {"attn": {"max_logits": jnp.asarray(before, jnp.float32)}}
  new, state = sgd0_clip(params, stats, tau, layouts={"attn": layout}, auto_detect=False)
  after = brute_norm_head_max(new["attn"], x)
  if per_head:
    hot = check_clip_against_brute(before, after, tau)
    for n in ("query_norm", "key_norm"):
      check_heads(params, new, ("attn", n, "scale"), lambda a: a, hot)
  else:  # shared gains: the layer's smallest gamma on every head, the hottest lands on tau
    hot = before > tau
    np.testing.assert_allclose(after, before * tau / before.max(), rtol=1e-5)
  assert int(state.num_clipped) == int(hot.sum())
  check_others_bitwise(params, new, {("attn", n, "scale") for n in ("query_norm", "key_norm")})
  # The undeclared-form trap, for the record: read as x * scale, the clip scales scale
  # and the (1 + scale) gain does not fall as far: the hottest head misses tau.
  wrong, _ = sgd0_clip(params, stats, tau, auto_detect=False, layouts={"attn": mc.qk_norm(
      "query_norm", "key_norm", num_heads=4, per_head=per_head, gain="scale", bias=None)})
  assert brute_norm_head_max(wrong["attn"], x).max() > tau * (1 + 1e-2)


def test_qk_norm_gain_must_be_declared():
  with pytest.raises(ValueError, match=r"declare how the norm applies its gain.*one_plus"):
    mc.qk_norm("q_norm", "k_norm", num_heads=4)
  with pytest.raises(ValueError, match="gain must be one of"):
    mc.qk_norm("q_norm", "k_norm", num_heads=4, gain="1+scale")
  assert mc.qk_norm("q", "k", num_heads=2, gain=0.5).params[0].offset == 0.5


# --------------------------------------------------------------------------
# Orientation declared or refused; Gemma's stacked einsum kernels.


def brute_from_qk(q, k) -> np.ndarray:
  """float64 per-head causal max of ``q . k / sqrt(d)``; q ``(B, T, H, D)``, k ``(B, S, K, D)``."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[-2] // k.shape[-2], axis=-2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return np.where(np.asarray(causal()), logits, -np.inf).max(axis=(0, 2, 3))


def _clip_with(params, layout, before, tau, **kw):
  stats = {"attn": {"max_logits": jnp.asarray(before, jnp.float32)}}
  return sgd0_clip(params, stats, tau, layouts={"attn": layout}, auto_detect=False, **kw)


def test_out_in_weights_equinox_style_clip_the_output_side():
  """``eqx.nn.Linear``: ``weight (out, in)``, ``y = W x + b``; square, 4 heads merged."""
  rng = np.random.default_rng(11)
  h = 4
  mk = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
  params = {"attn": {n: {"weight": mk(E, E), "bias": mk(E)} for n in
                     ("query_proj", "key_proj", "value_proj")}}
  x = np.asarray(x_input(12), np.float64)

  def brute(p):
    proj = lambda n: (np.einsum("bte,oe->bto", x, np.asarray(p["attn"][n]["weight"], np.float64))
                      + np.asarray(p["attn"][n]["bias"], np.float64)).reshape(B, L, h, -1)
    return brute_from_qk(proj("query_proj"), proj("key_proj"))
  before = brute(params)
  tau = float(np.median(before))
  with pytest.raises(ValueError, match=r"orientation of 'weight' weights.*weight_layout='out_in'"):
    mc.separate_qk("query_proj", "key_proj", num_heads=h, merged_heads=True, kernel="weight")
  layout = mc.separate_qk("query_proj", "key_proj", num_heads=h, merged_heads=True,
                          kernel="weight", weight_layout="out_in")
  new, state = _clip_with(params, layout, before, tau)
  hot = check_clip_against_brute(before, brute(new), tau)
  assert int(state.num_clipped) == int(hot.sum())
  for n in ("query_proj", "key_proj"):  # rows (outputs) of a cool head: bit for bit
    check_heads(params, new, ("attn", n, "weight"), lambda a: a.reshape(h, -1), hot)
    check_heads(params, new, ("attn", n, "bias"), lambda a: a.reshape(h, -1), hot)
  check_others_bitwise(params, new, {("attn", n, m) for n in ("query_proj", "key_proj")
                                     for m in ("weight", "bias")})


def test_out_in_layouts_are_the_transpose_of_in_out():
  """Every layout read ``out_in`` clips the transposed entries of its ``in_out`` reading."""
  rng = np.random.default_rng(13)
  h, kv, d = 4, 2, 3
  s = jnp.array([3.0, 0.5, 1.5, 4.0])
  w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  t2 = lambda a: np.swapaxes(np.asarray(a), -1, -2)
  t3 = lambda a: np.moveaxis(np.asarray(a), 0, -1)   # (in, H, D) -> (H, D, in)
  cases = [  # (params, in_out layout, out_in layout, to out_in)
      ({"wq": {"w": w(E, h * d)}, "wk": {"w": w(E, kv * d)}},
       mc.separate_qk("wq", "wk", num_heads=h, num_kv_heads=kv, merged_heads=True, kernel="w",
                      weight_layout="in_out"),
       mc.separate_qk("wq", "wk", num_heads=h, num_kv_heads=kv, merged_heads=True, kernel="w",
                      weight_layout="out_in"), t2),
      ({"wq": {"w": w(E, h, d)}, "wk": {"w": w(E, kv, d)}},
       mc.separate_qk("wq", "wk", kernel="w", weight_layout="in_out"),
       mc.separate_qk("wq", "wk", kernel="w", weight_layout="out_in"), t3),
      ({"qkv": {"w": w(E, (h + 2 * kv) * d)}},
       mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv, kernel="w", weight_layout="in_out"),
       mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv, kernel="w", weight_layout="out_in"),
       t2),
      ({"qkv": {"w": w(E, (h + 2 * kv) * d)}},
       mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv, order="groups", kernel="w",
                    weight_layout="in_out"),
       mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv, order="groups", kernel="w",
                    weight_layout="out_in"), t2),
      ({"wq": {"w": w(E, h, 5)}, "wkv_b": {"w": w(6, h, 7)}},
       mc.mla("wq", num_heads=h, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4,
              kernel="w", weight_layout="in_out"),
       mc.mla("wq", num_heads=h, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4,
              kernel="w", weight_layout="out_in"), t3),
      ({"wq": {"w": w(E, h * 5)}, "wkv_b": {"w": w(6, h * 7)}},
       mc.mla("wq", num_heads=h, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4,
              merged_heads=True, kernel="w", weight_layout="in_out"),
       mc.mla("wq", num_heads=h, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4,
              merged_heads=True, kernel="w", weight_layout="out_in"), t2),
  ]
  # All cases in one tree (one update each way): module c{i} holds case i.
  def clip_all(trees, layouts):
    tx = optax.chain(optax.sgd(0.0), mc.qk_clip(1.0, layouts=layouts, auto_detect=False))
    params = {f"c{i}": t for i, t in enumerate(trees)}
    stats = {f"c{i}": {"max_logits": s} for i in range(len(trees))}
    upd, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                                max_logits=stats)
    return optax.apply_updates(params, upd)
  ref = clip_all([c[0] for c in cases], {f"c{i}": c[1] for i, c in enumerate(cases)})
  flipped = [{m: {"w": jnp.asarray(c[3](v["w"]))} for m, v in c[0].items()} for c in cases]
  out = clip_all(flipped, {f"c{i}": c[2] for i, c in enumerate(cases)})
  for i, (params, _, layout, flip) in enumerate(cases):
    changed = False
    for m in params:
      np.testing.assert_array_equal(out[f"c{i}"][m]["w"], flip(ref[f"c{i}"][m]["w"]),
                                    err_msg=layout.name)
      changed |= not np.array_equal(ref[f"c{i}"][m]["w"], params[m]["w"])
    assert changed, layout.name
  for fn in (lambda: mc.fused_qkv("qkv", num_heads=4, kernel="weight"),
             lambda: mc.mla(num_heads=4, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=4,
                            kernel="weight")):
    with pytest.raises(ValueError, match="weight_layout="):
      fn()


def gemma_params(num_heads: int, num_kv_heads: int, seed: int = 14, dim: int = 4):
  """Gemma's attention parameter tree (gemma 3.3.0, gemma/gm/nn/_modules.py, Attention)."""
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
  attn = {"attn_vec_einsum": {"w": mk(num_heads, dim, E)}}
  if num_kv_heads == num_heads:
    attn["qkv_einsum"] = {"w": mk(3, num_heads, E, dim)}
  else:
    attn["q_einsum"] = {"w": mk(num_heads, E, dim)}
    attn["kv_einsum"] = {"w": mk(2, num_kv_heads, E, dim)}
  return {"attn": attn}


def gemma_qk(attn, x):
  """Gemma's projections: ``'BTD,SNDH->SBTNH'`` or ``'BTD,NDH->BTNH'`` and ``'BSD,CKDH->CBSKH'``."""
  x = np.asarray(x, np.float64)
  f = lambda n: np.asarray(attn[n]["w"], np.float64)
  if "qkv_einsum" in attn:
    q, k, _ = np.einsum("BTD,SNDH->SBTNH", x, f("qkv_einsum"))
  else:
    q = np.einsum("BTD,NDH->BTNH", x, f("q_einsum"))
    k, _ = np.einsum("BSD,CKDH->CBSKH", x, f("kv_einsum"))
  return q, k


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_gemma_einsum_layouts_without_a_custom_layout(kv):
  h = 4
  params = gemma_params(h, kv)
  x = x_input(15)
  before = brute_from_qk(*gemma_qk(params["attn"], x))
  tau = float(np.median(before))
  if kv == h:
    layout = mc.separate_qk("qkv_einsum", "qkv_einsum", kernel="w", head_axis=0,
                            query_stack=(0, 0), key_stack=(0, 1), bias=None)
    q_path, k_path = ("attn", "qkv_einsum", "w"), ("attn", "qkv_einsum", "w")
  else:
    layout = mc.separate_qk("q_einsum", "kv_einsum", num_heads=h, num_kv_heads=kv, kernel="w",
                            head_axis=0, key_stack=(0, 0), bias=None)
    q_path, k_path = ("attn", "q_einsum", "w"), ("attn", "kv_einsum", "w")
  new, state = _clip_with(params, layout, before, tau)
  hot = check_clip_against_brute(before, brute_from_qk(*gemma_qk(new["attn"], x)), tau)
  assert int(state.num_clipped) == int(hot.sum())
  old, cur = flat(params), flat(new)
  if kv == h:  # stack index 0 (q) and 1 (k) per head: touched iff hot; values (2) untouched
    for i in (0, 1):
      np.testing.assert_array_equal(
          np.all(old[q_path][i] == cur[q_path][i], axis=(1, 2)), ~hot)
    np.testing.assert_array_equal(old[q_path][2], cur[q_path][2])
  else:  # gqa_sharing="query": the query heads carry gamma; keys and values untouched
    np.testing.assert_array_equal(np.all(old[q_path] == cur[q_path], axis=(1, 2)), ~hot)
    np.testing.assert_array_equal(old[k_path], cur[k_path])
  check_others_bitwise(params, new, {q_path, k_path})


def test_projection_clip_beside_a_qk_norm_warns():
  """Gemma 3: clipping q_einsum/kv_einsum while _query_norm/_key_norm follow changes nothing."""
  params = gemma_params(4, 2)
  params["attn"]["_query_norm"] = {"scale": jnp.zeros(4)}
  params["attn"]["_key_norm"] = {"scale": jnp.zeros(4)}
  kernels = mc.separate_qk("q_einsum", "kv_einsum", num_heads=4, num_kv_heads=2, kernel="w",
                           head_axis=0, key_stack=(0, 0), bias=None)
  with pytest.warns(UserWarning, match=r"\{'attn': \['_key_norm', '_query_norm'\]\}.*qk_norm"):
    sgd_clip(1.0, layouts=kernels).init(params)
  norms = mc.qk_norm("_query_norm", "_key_norm", num_heads=4, num_kv_heads=2, gain="one_plus",
                     bias=None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sgd_clip(1.0, layouts=norms).init(params)
    mla = {"attn": {"q_norm": {"scale": jnp.ones(6)}, "wq_b": {"kernel": jnp.ones((6, 4, 5))},
                    "kv_norm": {"scale": jnp.ones(6)}, "wkv_b": {"kernel": jnp.ones((6, 4, 7))}}}
    sgd_clip(1.0, layouts=mc.mla("wq_b", num_heads=4, qk_nope_head_dim=3, qk_rope_head_dim=2,
                                 v_head_dim=4)).init(mla)  # latent norms: no warning


def test_gemma_kv_stack_clips_keys_never_values():
  """``gqa_sharing="split"`` touches the shared keys: index 0 of kv_einsum, never index 1."""
  h, kv = 4, 2
  params = gemma_params(h, kv, seed=16)
  x = x_input(17)
  before = brute_from_qk(*gemma_qk(params["attn"], x))
  tau = float(np.median(before))
  layout = mc.separate_qk("q_einsum", "kv_einsum", num_heads=h, num_kv_heads=kv, kernel="w",
                          head_axis=0, key_stack=(0, 0), bias=None)
  new, _ = _clip_with(params, layout, before, tau, gqa_sharing="split")
  after = brute_from_qk(*gemma_qk(new["attn"], x))
  np.testing.assert_allclose(after, predicted(before, tau, "split", kv), rtol=1e-5)
  old, cur = flat(params)[("attn", "kv_einsum", "w")], flat(new)[("attn", "kv_einsum", "w")]
  np.testing.assert_array_equal(old[1], cur[1])  # values
  k_hot = group_min(gammas(before, tau), kv)[::h // kv] < 1
  np.testing.assert_array_equal(np.all(old[0] == cur[0], axis=(1, 2)), ~k_hot)


def test_fused_qkv_on_a_stacked_einsum_points_to_the_stack_option():
  params = gemma_params(12, 12, dim=16)  # qkv_einsum (3, 12, E, 16): the failure
  with pytest.raises(ValueError, match=r"cannot be split.*query_stack=\(0, 0\), key_stack="):
    sgd_clip(1.0, layouts=mc.fused_qkv("qkv_einsum", num_heads=12, kernel="w",
                                       weight_layout="in_out")).init(params)
  with pytest.raises(ValueError, match="allow_no_attention"):
    mc.muonclip(1e-3, tau=1.0).init(mlp_params())
  mc.muonclip(1e-3, tau=1.0, allow_no_attention=True).init(mlp_params())
