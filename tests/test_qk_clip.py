"""QK-Clip exactness for every layout, and bad input.

Exactness (Kimi K2, arXiv 2507.20534): after one MuonClip step at learning
rate 0 the per-head max logit recomputed on the same batch is ``min(S, tau)``
(or the sharing rule's prediction for GQA "group"/"split" and shared QK-norm
gains), cool heads' parameters are bitwise unchanged, and so is every other
parameter.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from support.qk import (
  RTOL,
  B,
  E,
  L,
  brute_head_max,
  causal,
  check_clip_against_brute,
  check_heads,
  check_others_bitwise,
  clip_step,
  flat,
  gammas,
  group_min,
  merged,
  mlp_params,
  per_head,
  pick_tau,
  predicted,
  qk_logits,
  sgd0_clip,
  sgd_clip,
  stats_of,
  x_input,
)

import muonclip_jax as mc
from muonclip_jax._paths import path_components

_BIAS = nn.initializers.normal(0.5)


# --------------------------------------------------------------------------
# Hand-written linen attention modules, each sowing with sow_max_logits.


def finish(mod: nn.Module, logits, v):
  mask = causal()
  mc.sow_max_logits(mod, mc.head_max_logits(logits, mask=mask))
  w = jax.nn.softmax(jnp.where(mask, logits, -1e9))
  rep = logits.shape[-3] // v.shape[-2]
  out = jnp.einsum("...hqk,...khd->...qhd", w, jnp.repeat(v, rep, axis=-2))
  return nn.DenseGeneral(E, axis=(-2, -1), name="o_proj")(out)


class DenseAttn(nn.Module):
  """2-D ``nn.Dense`` q/k/v projections with biases (``separate_qk(merged_heads=True)``)."""

  heads: int = 4
  kv_heads: int = 4
  dim: int = 4

  @nn.compact
  def __call__(self, x):
    sh = x.shape[:-1]
    q = nn.Dense(self.heads * self.dim, bias_init=_BIAS, name="q_proj")(x)
    k = nn.Dense(self.kv_heads * self.dim, bias_init=_BIAS, name="k_proj")(x)
    v = nn.Dense(self.kv_heads * self.dim, name="v_proj")(x)
    q = q.reshape(sh + (self.heads, self.dim))
    k = k.reshape(sh + (self.kv_heads, self.dim))
    v = v.reshape(sh + (self.kv_heads, self.dim))
    return finish(self, qk_logits(q, k), v)


class GeneralAttn(nn.Module):
  """3-D ``DenseGeneral`` projections named ``wq``/``wk``/``wv`` with biases."""

  heads: int = 4
  kv_heads: int = 4
  dim: int = 4

  @nn.compact
  def __call__(self, x):
    dg = lambda h, name: nn.DenseGeneral((h, self.dim), bias_init=_BIAS, name=name)
    q, k, v = dg(self.heads, "wq")(x), dg(self.kv_heads, "wk")(x), dg(self.kv_heads, "wv")(x)
    return finish(self, qk_logits(q, k), v)


class FusedAttn(nn.Module):
  """One ``nn.Dense`` QKV projection, laid out by ``order``."""

  heads: int = 4
  kv_heads: int = 4
  dim: int = 4
  order: str = "blocks"

  @nn.compact
  def __call__(self, x):
    h, kv, d = self.heads, self.kv_heads, self.dim
    y = nn.Dense((h + 2 * kv) * d, bias_init=_BIAS, name="qkv")(x)
    sh = x.shape[:-1]
    if self.order == "blocks":
      y = y.reshape(sh + (h + 2 * kv, d))
      q, k, v = y[..., :h, :], y[..., h:h + kv, :], y[..., h + kv:, :]
    elif self.order == "heads":
      y = y.reshape(sh + (h, 3, d))
      q, k, v = y[..., 0, :], y[..., 1, :], y[..., 2, :]
    else:
      rep = h // kv
      y = y.reshape(sh + (kv, rep + 2, d))
      q = y[..., :rep, :].reshape(sh + (h, d))
      k, v = y[..., rep, :], y[..., rep + 1, :]
    return finish(self, qk_logits(q, k), v)


def rope(x, theta: float = 0.3):
  """A rotary embedding over the last axis (pairs), positions on axis -3 or -2."""
  pos = jnp.arange(L, dtype=jnp.float32)
  half = x.shape[-1] // 2
  ang = pos[:, None] * theta * (1.0 + jnp.arange(half, dtype=jnp.float32))
  if x.ndim == 4:  # [B, L, H, D]
    ang = ang[:, None, :]
  c, s = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


class MLAAttn(nn.Module):
  """Multi-head latent attention with decoupled RoPE (shared ``k^R``)."""

  heads: int = 4
  nope: int = 4
  rope_dim: int = 2
  v_dim: int = 4
  rank: int = 6

  @nn.compact
  def __call__(self, x):
    n, r = self.nope, self.rope_dim
    q = nn.DenseGeneral((self.heads, n + r), use_bias=False, name="wq")(x)
    kv_a = nn.Dense(self.rank + r, use_bias=False, name="wkv_a")(x)
    c, k_rope = kv_a[..., :self.rank], rope(kv_a[..., self.rank:])
    kv = nn.DenseGeneral((self.heads, n + self.v_dim), use_bias=False, name="wkv_b")(c)
    q_nope, q_rope = q[..., :n], rope(q[..., n:])
    k_nope, v = kv[..., :n], kv[..., n:]
    logits = (jnp.einsum("...qhd,...khd->...hqk", q_nope, k_nope)
              + jnp.einsum("...qhd,...kd->...hqk", q_rope, k_rope)) / math.sqrt(n + r)
    return finish(self, logits, v)


class HeadRMSNorm(nn.Module):
  """RMSNorm over the head dim with a gain shared by heads or per head."""

  heads: int
  per_head: bool

  @nn.compact
  def __call__(self, x):
    shape = (self.heads, x.shape[-1]) if self.per_head else (x.shape[-1],)
    scale = self.param("scale", lambda key, s: 1.0 + 0.3 * jax.random.normal(key, s), shape)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class NormAttn(nn.Module):
  """QK-norm (RMSNorm on q and k after the projection)."""

  heads: int = 4
  kv_heads: int = 4
  dim: int = 4
  per_head: bool = False

  @nn.compact
  def __call__(self, x):
    dg = lambda h, name: nn.DenseGeneral((h, self.dim), name=name)
    q, k, v = dg(self.heads, "wq")(x), dg(self.kv_heads, "wk")(x), dg(self.kv_heads, "wv")(x)
    q = HeadRMSNorm(self.heads, self.per_head, name="q_norm")(q) * 3.0
    k = HeadRMSNorm(self.kv_heads, self.per_head, name="k_norm")(k) * 3.0
    return finish(self, qk_logits(q, k), v)


class Parallel(nn.Module):
  """Two attention layers on the same input (so both see pre-update inputs)."""

  make: object

  @nn.compact
  def __call__(self, x):
    return self.make(name="attn0")(x) + self.make(name="attn1")(x)


def linen_case(model: nn.Module, seed: int = 0, scale: float = 2.0):
  x = x_input(seed + 1, scale)
  params = model.init(jax.random.key(seed), x)["params"]

  def stats_fn(p):
    return model.apply({"params": p}, x, mutable=["intermediates"])[1]["intermediates"]
  return params, stats_fn


def run_case(params, stats_fn, mode: str, *, kv: int | None = None, layouts=None,
             gqa_sharing: str = "query"):
  stats = stats_fn(params)
  tau = pick_tau(stats)
  new, state = clip_step(params, stats, tau, layouts=layouts, gqa_sharing=gqa_sharing)
  before, after = stats_of(stats), stats_of(stats_fn(new))
  assert before.keys() == after.keys() and before
  n_hot = 0
  for path, s in before.items():
    want = predicted(s, tau, mode, kv)
    np.testing.assert_allclose(after[path], want, rtol=RTOL, atol=RTOL * tau,
                               err_msg=f"layer {path}")
    n_hot += int(np.sum(gammas(s, tau) < 1))
  assert 0 < n_hot and int(state.num_clipped) == n_hot
  return new, stats, tau


def layer_gammas(stats, path, tau):
  return gammas(stats_of(stats)[path], tau)


# --------------------------------------------------------------------------
# Exactness, layout by layout (linen).


def test_flax_linen_mha_auto():
  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, bias_init=_BIAS,
                                          attention_fn=mc.dot_product_attention, name="a")
      b = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, bias_init=_BIAS,
                                          attention_fn=mc.dot_product_attention, name="b")
      m = causal()
      return a(x, mask=m, sow_weights=True) + b(x, mask=m, sow_weights=True)

  params, stats_fn = linen_case(Wrap())
  new, stats, tau = run_case(params, stats_fn, "mha")
  for layer in ("a", "b"):
    hot = layer_gammas(stats, (layer,), tau) < 1
    for proj in ("query", "key"):
      check_heads(params, new, (layer, proj, "kernel"), lambda a: per_head(a, -2), hot)
      check_heads(params, new, (layer, proj, "bias"), lambda a: per_head(a, -2), hot)
  check_others_bitwise(params, new, {(lay, p, n) for lay in "ab" for p in ("query", "key")
                                     for n in ("kernel", "bias")})


def test_flax_linen_normalize_qk_auto_uses_gains():
  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      mk = lambda name: mc.MaxLogitMultiHeadDotProductAttention(
          num_heads=4, qkv_features=16, normalize_qk=True, name=name)
      # LayerNorm output is O(1); scale the input of the logits through the gains.
      return mk("a")(x, mask=causal()) + mk("b")(x * 0.5, mask=causal())

  model = Wrap()
  x = x_input(3)
  params = model.init(jax.random.key(3), x)["params"]
  # Start the gains large so logits exceed 1.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 4.0 if path_components(p)[-1] == "scale" else a, params)
  stats_fn = lambda p: model.apply({"params": p}, x, mutable=["intermediates"])[1][
      "intermediates"]
  new, stats, tau = run_case(params, stats_fn, "shared")
  for layer in ("a", "b"):
    layer_hot = bool(np.any(layer_gammas(stats, (layer,), tau) < 1))
    for ln in ("query_ln", "key_ln"):
      check_heads(params, new, (layer, ln, "scale"), lambda a: a[None], np.array([layer_hot]))
  check_others_bitwise(params, new, {(lay, ln, "scale") for lay in "ab"
                                     for ln in ("query_ln", "key_ln")})


@pytest.mark.parametrize("kv", [4, 2])
def test_dense_2d_kernels_with_bias(kv):
  params, stats_fn = linen_case(Parallel(lambda name: DenseAttn(4, kv, name=name)))
  layout = mc.separate_qk("q_proj", "k_proj", num_heads=4, num_kv_heads=kv, merged_heads=True)
  new, stats, tau = run_case(params, stats_fn, "query", layouts=layout)
  for layer in ("attn0", "attn1"):
    hot = layer_gammas(stats, (layer,), tau) < 1
    check_heads(params, new, (layer, "q_proj", "kernel"), lambda a: merged(a, 4), hot)
    check_heads(params, new, (layer, "q_proj", "bias"), lambda a: a.reshape(4, -1), hot)
    khot = hot if kv == 4 else np.zeros(kv, bool)  # GQA "query": shared key untouched
    check_heads(params, new, (layer, "k_proj", "kernel"), lambda a: merged(a, kv), khot)
  check_others_bitwise(params, new, {(lay, p, n) for lay in ("attn0", "attn1")
                                     for p in ("q_proj", "k_proj") for n in ("kernel", "bias")})


@pytest.mark.parametrize("sharing", ["query", "group", "split"])
def test_general_3d_gqa_sharing(sharing):
  kv = 2
  params, stats_fn = linen_case(Parallel(lambda name: GeneralAttn(4, kv, name=name)), seed=5)
  layout = {"attn*": mc.separate_qk("wq", "wk")}
  new, stats, tau = run_case(params, stats_fn, sharing, kv=kv, layouts=layout,
                             gqa_sharing=sharing)
  for layer in ("attn0", "attn1"):
    g = layer_gammas(stats, (layer,), tau)
    gm = group_min(g, kv)
    q_hot = (gm < 1) if sharing == "group" else (g < 1)
    k_hot = (gm[::2] < 1) if sharing in ("group", "split") else np.zeros(kv, bool)
    for n in ("kernel", "bias"):
      check_heads(params, new, (layer, "wq", n), lambda a: per_head(a, -2), q_hot)
      check_heads(params, new, (layer, "wk", n), lambda a: per_head(a, -2), k_hot)
  check_others_bitwise(params, new, {(lay, p, n) for lay in ("attn0", "attn1")
                                     for p in ("wq", "wk") for n in ("kernel", "bias")})


def fused_parts(order: str, kv: int, h: int = 4):
  """Selectors of the q, k, v parts of a fused kernel/bias, heads on axis -2."""
  rep = h // kv
  if order == "blocks":
    split = lambda a: a.reshape(a.shape[:-1] + (h + 2 * kv, -1))
    return (lambda a: split(a)[..., :h, :], lambda a: split(a)[..., h:h + kv, :],
            lambda a: split(a)[..., h + kv:, :])
  if order == "heads":
    split = lambda a: a.reshape(a.shape[:-1] + (h, 3, -1))
    return (lambda a: split(a)[..., 0, :], lambda a: split(a)[..., 1, :],
            lambda a: split(a)[..., 2, :])
  split = lambda a: a.reshape(a.shape[:-1] + (kv, rep + 2, -1))
  return (lambda a: split(a)[..., :rep, :].reshape(a.shape[:-1] + (h, -1)),
          lambda a: split(a)[..., rep, :], lambda a: split(a)[..., rep + 1:, :])


@pytest.mark.parametrize("order,kv", [("blocks", 4), ("blocks", 2), ("heads", 4),
                                      ("groups", 2)])
def test_fused_qkv(order, kv):
  params, stats_fn = linen_case(Parallel(lambda name: FusedAttn(4, kv, order=order,
                                                                name=name)), seed=7)
  layout = mc.fused_qkv("qkv", num_heads=4, num_kv_heads=kv, order=order)
  new, stats, tau = run_case(params, stats_fn, "query", kv=kv, layouts=layout)
  for layer in ("attn0", "attn1"):
    hot = layer_gammas(stats, (layer,), tau) < 1
    for n in ("kernel", "bias"):
      a_old = flat(params)[(layer, "qkv", n)]
      a_new = flat(new)[(layer, "qkv", n)]
      qs, ks, vs = fused_parts(order, kv)
      hv = lambda a: per_head(a, -2)
      for sel, want in ((qs, hot), (ks, hot if kv == 4 else np.zeros(kv, bool))):
        same = np.all(hv(sel(a_old)) == hv(sel(a_new)), axis=-1)
        np.testing.assert_array_equal(same, ~want, err_msg=f"{layer} {n}")
      np.testing.assert_array_equal(vs(a_old), vs(a_new))
  check_others_bitwise(params, new, {(lay, "qkv", n) for lay in ("attn0", "attn1")
                                     for n in ("kernel", "bias")})


def test_mla_rope_parts_and_shared_key_untouched():
  params, stats_fn = linen_case(Parallel(lambda name: MLAAttn(name=name)), seed=11, scale=3.0)
  layout = mc.mla("wq", "wkv_b", num_heads=4, qk_nope_head_dim=4, qk_rope_head_dim=2,
                  v_head_dim=4)
  new, stats, tau = run_case(params, stats_fn, "mha", layouts=layout)
  for layer in ("attn0", "attn1"):
    g = layer_gammas(stats, (layer,), tau)
    hot = g < 1
    wq_o, wq_n = flat(params)[(layer, "wq", "kernel")], flat(new)[(layer, "wq", "kernel")]
    # q^C by sqrt(gamma), q^R by gamma, per head.
    np.testing.assert_allclose(wq_n[..., :4], wq_o[..., :4] * np.sqrt(g)[:, None], rtol=1e-6)
    np.testing.assert_allclose(wq_n[..., 4:], wq_o[..., 4:] * g[:, None], rtol=1e-6)
    check_heads(params, new, (layer, "wq", "kernel"), lambda a: per_head(a, -2), hot)
    kv_o, kv_n = flat(params)[(layer, "wkv_b", "kernel")], flat(new)[(layer, "wkv_b", "kernel")]
    np.testing.assert_allclose(kv_n[..., :4], kv_o[..., :4] * np.sqrt(g)[:, None], rtol=1e-6)
    np.testing.assert_array_equal(kv_n[..., 4:], kv_o[..., 4:])  # values untouched
  # wkv_a (shared k^R and the latent) and o_proj untouched.
  check_others_bitwise(params, new, {(lay, p, "kernel") for lay in ("attn0", "attn1")
                                     for p in ("wq", "wkv_b")})


@pytest.mark.parametrize("per_head", [False, True])
def test_qk_norm_gains(per_head):
  kv = 2 if per_head else 4
  params, stats_fn = linen_case(Parallel(lambda name: NormAttn(4, kv, per_head=per_head,
                                                               name=name)), seed=13)
  layout = mc.qk_norm("q_norm", "k_norm", num_heads=4, num_kv_heads=kv, per_head=per_head,
                      gain="scale")
  mode = "query" if per_head else "shared"
  new, stats, tau = run_case(params, stats_fn, mode, kv=kv, layouts=layout)
  for layer in ("attn0", "attn1"):
    g = layer_gammas(stats, (layer,), tau)
    if per_head:
      check_heads(params, new, (layer, "q_norm", "scale"), lambda a: a, g < 1)
      check_heads(params, new, (layer, "k_norm", "scale"), lambda a: a, np.zeros(kv, bool))
    else:
      for n in ("q_norm", "k_norm"):
        check_heads(params, new, (layer, n, "scale"), lambda a: a[None], np.array([np.any(g < 1)]))
  # Kernels are not scaled (the norm would cancel it).
  check_others_bitwise(params, new, {(lay, n, "scale") for lay in ("attn0", "attn1")
                                     for n in ("q_norm", "k_norm")})


class ScanBlock(nn.Module):
  make: object

  @nn.compact
  def __call__(self, x, _):
    return x, self.make(name="attn")(x)  # every layer sees the same (pre-update) input


class Scanned(nn.Module):
  make: object
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(ScanBlock, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True}, length=self.layers)
    _, ys = stack(self.make, name="stack")(x, None)
    return ys.sum(0)


def test_scanned_flax_attention_auto():
  make = lambda name: mc.MaxLogitMultiHeadDotProductAttention(
      num_heads=4, qkv_features=16, bias_init=_BIAS, name=name)
  params, stats_fn = linen_case(Scanned(make), seed=17)
  assert stats_of(stats_fn(params))[("stack", "attn")].shape == (3, 4)
  new, stats, tau = run_case(params, stats_fn, "mha")
  hot = layer_gammas(stats, ("stack", "attn"), tau) < 1
  assert hot.any(axis=1).sum() >= 1 and (~hot).any()
  for proj in ("query", "key"):
    check_heads(params, new, ("stack", "attn", proj, "kernel"),
                lambda a: per_head(a, -2, n_lead=1), hot)
  check_others_bitwise(params, new, {("stack", "attn", p, n) for p in ("query", "key")
                                     for n in ("kernel", "bias")})


def test_scanned_fused_gqa_layout():
  make = lambda name: FusedAttn(4, 2, order="blocks", name=name)
  params, stats_fn = linen_case(Scanned(make), seed=19)
  layout = {"stack/attn": mc.fused_qkv("qkv", num_heads=4, num_kv_heads=2)}
  new, stats, tau = run_case(params, stats_fn, "split", kv=2, layouts=layout,
                             gqa_sharing="split")
  old_k = flat(params)[("stack", "attn", "qkv", "kernel")].reshape(3, E, 8, -1)[:, :, 4:6]
  new_k = flat(new)[("stack", "attn", "qkv", "kernel")].reshape(3, E, 8, -1)[:, :, 4:6]
  g = layer_gammas(stats, ("stack", "attn"), tau)
  k_hot = group_min(g, 2)[:, ::2] < 1
  same = np.all(np.moveaxis(old_k, 2, 1) == np.moveaxis(new_k, 2, 1), axis=(-1, -2))
  np.testing.assert_array_equal(same, ~k_hot)


# --------------------------------------------------------------------------
# Exactness (NNX).


class NNXParallel(nnx.Module):
  def __init__(self, kv: int, normalize_qk: bool = False, *, rngs: nnx.Rngs):
    mk = lambda: mc.MaxLogitMultiHeadAttention(
        4, E, qkv_features=16, num_kv_heads=kv, decode=False, normalize_qk=normalize_qk,
        bias_init=nnx.initializers.normal(0.5), rngs=rngs)
    self.layers = nnx.List([mk(), mk()])

  def __call__(self, x):
    return sum(layer(x, mask=causal()) for layer in self.layers)


def nnx_case(kv: int, normalize_qk: bool = False, seed: int = 0):
  model = NNXParallel(kv, normalize_qk, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  x = x_input(seed + 1)
  if normalize_qk:
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 4.0 if "scale" in path_components(p) else a, params)

  def stats_fn(p):
    m = nnx.merge(graphdef, p)
    return nnx.capture(m, nnx.Intermediate)(x)[1]
  return params, stats_fn


@pytest.mark.parametrize("kv,sharing", [(4, "query"), (2, "query"), (2, "group"),
                                        (1, "split")])
def test_nnx_attention_auto(kv, sharing):
  params, stats_fn = nnx_case(kv, seed=23)
  mode = "mha" if kv == 4 else sharing
  new, stats, tau = run_case(params, stats_fn, mode, kv=kv, gqa_sharing=sharing)
  for i in ("0", "1"):
    g = layer_gammas(stats, ("layers", i), tau)
    gm = group_min(g, kv)
    q_hot = (gm < 1) if (sharing == "group" and kv < 4) else (g < 1)
    if kv == 4:
      k_hot = g < 1
    elif sharing == "query":
      k_hot = np.zeros(kv, bool)
    else:
      k_hot = gm[::4 // kv] < 1
    check_heads(params, new, ("layers", i, "query", "kernel"), lambda a: per_head(a, -2), q_hot)
    check_heads(params, new, ("layers", i, "key", "kernel"), lambda a: per_head(a, -2), k_hot)
  check_others_bitwise(params, new, {("layers", i, p, n) for i in ("0", "1")
                                     for p in ("query", "key") for n in ("kernel", "bias")})


def test_nnx_normalize_qk_auto():
  params, stats_fn = nnx_case(4, normalize_qk=True, seed=29)
  new, stats, tau = run_case(params, stats_fn, "shared")
  check_others_bitwise(params, new, {("layers", i, n, "scale") for i in ("0", "1")
                                     for n in ("query_ln", "key_ln")})


# --------------------------------------------------------------------------
# Transform-level properties.


def simple_params(seed: int = 0, heads: int = 4):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  attn = {n: {"kernel": mk(E, heads, 4), "bias": mk(heads, 4)} for n in ("query", "key", "value")}
  attn["out"] = {"kernel": mk(heads, 4, E), "bias": mk(E)}
  return {"attn": attn, "mlp": {"kernel": mk(E, E)}}


def test_update_formula_and_passthrough_bitwise():
  params = simple_params()
  grads = jax.tree.map(lambda p: jnp.sin(p), params)
  s = jnp.array([5.0, 0.5, 2.0, 1.0])
  tx = sgd_clip(1.0)
  upd, state = tx.update(grads, tx.init(params), params,
                         max_logits={"intermediates": {"attn": {"max_logits": s}}})
  plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
  new = optax.apply_updates(params, upd)
  f = np.sqrt(np.minimum(1.0, 1.0 / np.asarray(s)))
  for n in ("query", "key"):
    post = np.asarray(params["attn"][n]["kernel"] + plain["attn"][n]["kernel"])
    np.testing.assert_allclose(new["attn"][n]["kernel"], post * f[:, None], rtol=1e-6)
    # heads at or below tau: the optimizer's update, bit for bit
    for h in (1, 3):
      np.testing.assert_array_equal(upd["attn"][n]["kernel"][:, h],
                                    plain["attn"][n]["kernel"][:, h])
  for path in (("attn", "value", "kernel"), ("attn", "out", "kernel"), ("mlp", "kernel")):
    a, b = upd, plain
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a, b)
  st = state[-1]
  assert int(st.num_clipped) == 2 and int(st.num_skipped) == 0
  np.testing.assert_array_equal(st.max_logits["attn"], s)


def test_tau_exactly_at_bound_is_untouched():
  params = simple_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = sgd_clip(2.0)
  upd, state = tx.update(grads, tx.init(params), params,
                         max_logits={"attn": {"max_logits": jnp.full((4,), 2.0)}})
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(upd))
  assert int(state[-1].num_clipped) == 0


def test_inject_hyperparams_tau():
  params = simple_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  stats = {"attn": {"max_logits": jnp.array([4.0, 3.0, 2.0, 1.0])}}
  tx = optax.inject_hyperparams(mc.qk_clip)(tau=3.5)
  state = tx.init(params)
  step = jax.jit(tx.update)
  upd, state = step(grads, state, params, max_logits=stats)
  assert int(state.inner_state.num_clipped) == 1
  state.hyperparams["tau"] = jnp.asarray(1.5)
  upd, state = step(grads, state, params, max_logits=stats)
  assert int(state.inner_state.num_clipped) == 3
  g = np.array([1.5 / 4, 1.5 / 3, 1.5 / 2, 1])
  new = optax.apply_updates(params, upd)
  np.testing.assert_allclose(new["attn"]["query"]["kernel"],
                             params["attn"]["query"]["kernel"] * np.sqrt(g)[:, None], rtol=1e-6)
  # A traced tau <= 0 never scales weights.
  state.hyperparams["tau"] = jnp.asarray(-1.0)
  upd, state = step(grads, state, params, max_logits=stats)
  assert int(state.inner_state.num_clipped) == 0
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(upd))


def test_built_inside_jit_equals_built_outside():
  # A train step may build its optimizer inside jax.jit (e.g. a functional loop that
  # closes over Python hyperparameters); the argument checks must not concretise tau.
  params = simple_params()
  grads = jax.tree.map(jnp.sin, params)
  stats = {"attn": {"max_logits": jnp.array([5.0, 0.5, 2.0, 1.0])}}

  def step(tau):
    tx = sgd_clip(tau)
    return tx.update(grads, tx.init(params), params, max_logits=stats)

  inside = jax.jit(functools.partial(step, 1.0))()
  outside = step(1.0)
  chex.assert_trees_all_close(inside[0], outside[0], rtol=1e-6)
  assert int(inside[1][-1].num_clipped) == int(outside[1][-1].num_clipped) == 2


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_nonpositive_tau_raises(tau):
  with pytest.raises(ValueError, match="tau must be positive"):
    mc.qk_clip(tau)
  with pytest.raises(ValueError, match="tau must be positive"):
    mc.muonclip(1e-3, tau=tau)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="gqa_sharing"):
    mc.qk_clip(1.0, gqa_sharing="keys")
  with pytest.raises(ValueError, match="gqa_alpha"):
    mc.qk_clip(1.0, gqa_alpha=1.5)


def _update(tx, params, stats):
  grads = jax.tree.map(jnp.zeros_like, params)
  return jax.jit(tx.update)(grads, tx.init(params), params, max_logits=stats)


def test_wrong_stats_shape_names_path():
  params = simple_params()
  with pytest.raises(ValueError, match=r"'attn' have shape \(3,\), expected \(4,\)"):
    _update(sgd_clip(1.0), params, {"attn": {"max_logits": jnp.ones(3)}})
  # heads must come last: a (heads, batch) statistic is refused, not reduced
  with pytest.raises(ValueError, match=r"'attn' have shape \(4, 2\).*\[layers..., batch..., "
                     r"heads\]"):
    _update(sgd_clip(1.0), params, {"attn": {"max_logits": jnp.ones((4, 2))}})


def test_stats_without_params_names_path():
  params = simple_params()
  stats = {"attn": {"max_logits": jnp.ones(4)}, "mlp": {"max_logits": jnp.ones(4)}}
  with pytest.raises(ValueError, match="statistics at 'mlp' have no matching attention"):
    _update(sgd_clip(1.0), params, stats)
  with pytest.raises(ValueError, match="statistics at 'decoder/attn' have no matching"):
    _update(sgd_clip(1.0), params, {"decoder": {"attn": {"max_logits": jnp.ones(4)}},
                                    "attn": {"max_logits": jnp.ones(4)}})


def test_layout_matching_nothing_names_pattern():
  params = simple_params()
  with pytest.raises(ValueError, match="pattern 'blocks/\\*' matches nothing"):
    sgd_clip(1.0, layouts={"blocks/*": mc.separate_qk("q_proj", "k_proj")}).init(params)
  with pytest.raises(ValueError, match="matches nothing"):
    sgd_clip(1.0, layouts=mc.fused_qkv("qkv", num_heads=4)).init(params)


def test_layout_shape_mismatch_names_param():
  params = simple_params()
  bad = mc.separate_qk("query", "key", num_heads=3, merged_heads=True)
  with pytest.raises(ValueError, match="attn/query/kernel"):
    sgd_clip(1.0, layouts=bad).init(params)


def test_missing_max_logits_raises():
  params = simple_params()
  tx = sgd_clip(1.0)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="needs this step's attention statistics"):
    tx.update(grads, tx.init(params), params)


def test_strict_missing_layer_and_opt_out():
  params = simple_params()
  params["attn2"] = simple_params(1)["attn"]
  stats = {"attn": {"max_logits": jnp.full((4,), 9.0)}}
  with pytest.raises(ValueError, match=r"no max_logits for attention layers \['attn2'\]"):
    _update(sgd_clip(1.0), params, stats)
  upd, _ = _update(sgd_clip(1.0, strict=False), params, stats)
  new = optax.apply_updates(params, upd)
  assert not np.array_equal(new["attn"]["query"]["kernel"], params["attn"]["query"]["kernel"])


@functools.cache
def _sgd_clip_update():
  """``sgd_clip(1.0)`` and its jitted update, shared: the bad values are data, one compile."""
  tx = sgd_clip(1.0)
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -3.0, 0.0])
def test_bad_statistics_never_scale_and_are_counted(bad):
  params = simple_params()
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  s = jnp.array([bad, 10.0, bad, 0.5])
  tx, update = _sgd_clip_update()
  upd, state = update(grads, tx.init(params), params, max_logits={"attn": {"max_logits": s}})
  plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
  for n in ("query", "key"):
    for h in (0, 2, 3):
      np.testing.assert_array_equal(upd["attn"][n]["kernel"][:, h],
                                    plain["attn"][n]["kernel"][:, h])
    assert not np.array_equal(upd["attn"][n]["kernel"][:, 1], plain["attn"][n]["kernel"][:, 1])
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(upd))
  st = state[-1]
  assert int(st.num_skipped) == 2 and int(st.skipped_total) == 2 and int(st.num_clipped) == 1


class NNXStack(nnx.Module):
  """Hand-written stacked layers: ``wq``/``wk`` of shape ``(layers, E, heads, dim)``."""

  def __init__(self, layers: int = 3, heads: int = 4, dim: int = 4, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.5)
    self.wq = nnx.Param(init(rngs.params(), (layers, E, heads, dim)))
    self.wk = nnx.Param(init(rngs.params(), (layers, E, heads, dim)))
    self.wv = nnx.Param(init(rngs.params(), (layers, E, heads, dim)))

  def __call__(self, x):
    def layer(_, w):
      wq, wk, wv = w
      q, k = jnp.einsum("ble,ehd->blhd", x, wq), jnp.einsum("ble,ehd->blhd", x, wk)
      logits = qk_logits(q, k)
      out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits),
                       jnp.einsum("ble,ehd->blhd", x, wv))
      return None, (out, mc.head_max_logits(logits, mask=causal()))
    _, (outs, stats) = jax.lax.scan(layer, None, (self.wq[...], self.wk[...], self.wv[...]))
    mc.sow_max_logits(self, stats)  # [layers, heads]
    return outs.sum(0)


def test_nnx_scanned_stack_custom_layout():
  model = NNXStack(rngs=nnx.Rngs(31))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  x = x_input(32)

  def stats_fn(p):
    return nnx.capture(nnx.merge(graphdef, p), nnx.Intermediate)(x)[1]

  layout = mc.QKLayout((mc.QKParam("wq", "query", ndim=3), mc.QKParam("wk", "key", ndim=3)))
  assert stats_of(stats_fn(params))[()].shape == (3, 4)
  new, stats, tau = run_case(params, stats_fn, "mha", layouts=layout)
  hot = gammas(stats_of(stats)[()], tau) < 1
  assert hot.any() and (~hot).any()
  for n in ("wq", "wk"):
    check_heads(params, new, (n,), lambda a: per_head(a, -2, n_lead=1), hot)
  check_others_bitwise(params, new, {("wq",), ("wk",)})


def test_params_under_variables_dict_and_tuple_sow():
  """A linen ``{'params': ...}`` tree and Flax's default tuple ``sow`` both work."""
  params = simple_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  s = jnp.array([5.0, 0.5, 2.0, 1.0])
  tx = sgd_clip(1.0)
  upd, _ = tx.update({"params": grads}, tx.init({"params": params}), {"params": params},
                     max_logits={"intermediates": {"attn": {"max_logits": (s - 1.0, s)}}})
  f = np.sqrt(np.minimum(1.0, 1.0 / np.asarray(s)))
  new = optax.apply_updates({"params": params}, upd)["params"]
  np.testing.assert_allclose(new["attn"]["key"]["kernel"],
                             params["attn"]["key"]["kernel"] * f[:, None], rtol=1e-6)


def _clip_tree(params, layout, s, sharing="query"):
  tx = optax.chain(optax.sgd(0.0), mc.qk_clip(1.0, layouts={"m": layout},
                                                 gqa_sharing=sharing, auto_detect=False))
  grads = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(grads, tx.init(params), params, max_logits={"m": {"max_logits": s}})
  return optax.apply_updates(params, upd)


@pytest.mark.parametrize("kv,sharing", [(4, "query"), (2, "query"), (2, "group"), (2, "split")])
def test_storage_layouts_agree(kv, sharing):
  """One set of per-head weights stored five ways: the clip acts on the same entries."""
  rng = np.random.default_rng(kv)
  h, d = 4, 3
  q, k, v = (rng.standard_normal((E, n, d)).astype(np.float32) for n in (h, kv, kv))
  s = jnp.array([3.0, 0.5, 1.5, 4.0])
  ref = _clip_tree({"m": {"wq": {"kernel": q}, "wk": {"kernel": k}}},
                   mc.separate_qk("wq", "wk"), s, sharing)["m"]
  rq, rk = np.asarray(ref["wq"]["kernel"]), np.asarray(ref["wk"]["kernel"])
  assert not np.array_equal(rq, q)

  merged2d = _clip_tree({"m": {"wq": {"kernel": q.reshape(E, -1)},
                               "wk": {"kernel": k.reshape(E, -1)}}},
                        mc.separate_qk("wq", "wk", num_heads=h, num_kv_heads=kv,
                                       merged_heads=True), s, sharing)["m"]
  np.testing.assert_array_equal(merged2d["wq"]["kernel"], rq.reshape(E, -1))
  np.testing.assert_array_equal(merged2d["wk"]["kernel"], rk.reshape(E, -1))

  blocks = np.concatenate([q, k, v], axis=1).reshape(E, -1)
  out = _clip_tree({"m": {"qkv": {"kernel": blocks}}},
                   mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv), s, sharing)["m"]
  np.testing.assert_array_equal(
      out["qkv"]["kernel"], np.concatenate([rq, rk, v], axis=1).reshape(E, -1))

  rep = h // kv
  group = lambda q_, k_: np.concatenate(
      [q_.reshape(E, kv, rep, d), k_[:, :, None], v[:, :, None]], axis=2).reshape(E, -1)
  out = _clip_tree({"m": {"qkv": {"kernel": group(q, k)}}},
                   mc.fused_qkv("qkv", num_heads=h, num_kv_heads=kv, order="groups"), s,
                   sharing)["m"]
  np.testing.assert_array_equal(out["qkv"]["kernel"], group(rq, rk))

  if kv == h:
    heads = lambda q_, k_: np.stack([q_, k_, v], axis=2).reshape(E, -1)
    out = _clip_tree({"m": {"qkv": {"kernel": heads(q, k)}}},
                     mc.fused_qkv("qkv", num_heads=h, order="heads"), s)["m"]
    np.testing.assert_array_equal(out["qkv"]["kernel"], heads(rq, rk))


def test_mla_merged_matches_3d():
  rng = np.random.default_rng(0)
  h, nope, rope_d, vd, r = 4, 3, 2, 5, 6
  wq = rng.standard_normal((E, h, nope + rope_d)).astype(np.float32)
  wkv = rng.standard_normal((r, h, nope + vd)).astype(np.float32)
  s = jnp.array([3.0, 0.5, 1.5, 4.0])
  kw = dict(num_heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=vd)
  ref = _clip_tree({"m": {"wq": {"kernel": wq}, "wkv_b": {"kernel": wkv}}},
                   mc.mla(**kw), s)["m"]
  out = _clip_tree({"m": {"wq": {"kernel": wq.reshape(E, -1)},
                          "wkv_b": {"kernel": wkv.reshape(r, -1)}}},
                   mc.mla(**kw, merged_heads=True), s)["m"]
  np.testing.assert_array_equal(out["wq"]["kernel"], np.asarray(ref["wq"]["kernel"]).reshape(E, -1))
  np.testing.assert_array_equal(out["wkv_b"]["kernel"],
                                np.asarray(ref["wkv_b"]["kernel"]).reshape(r, -1))


# --------------------------------------------------------------------------
# Never silent: nothing found, nothing passed.


def test_no_attention_layers_raises_at_init_with_hint():
  # A model whose attention is not Flax's (Equinox-style names) and no layouts: refused.
  params = {"attn": {"query_proj": {"weight": jnp.ones((8, 8))},
                     "key_proj": {"weight": jnp.ones((8, 8))}}}
  for tx in (sgd_clip(1.0), mc.muonclip(1e-3, tau=1.0)):
    with pytest.raises(ValueError, match=r"no attention layer found.*'attn/key_proj/weight'"
                       r".*layouts=.*weight_layout='out_in'.*allow_no_attention=True"):
      tx.init(params)


def test_no_attention_opt_out_passes_updates_through():
  params = mlp_params()
  tx = sgd_clip(1.0, allow_no_attention=True)
  grads = jax.tree.map(jnp.ones_like, params)
  plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
  for stats in ({}, {"intermediates": {}}):
    upd, state = tx.update(grads, tx.init(params), params, max_logits=stats)
    chex.assert_trees_all_equal(upd, plain)
    assert int(state[-1].num_clipped) == 0


@pytest.mark.parametrize("stats", [{}, {"intermediates": {}},
                                   {"attn": {"attention_weights": jnp.ones(4)}}])
def test_empty_statistics_raise_with_every_producer(stats):
  params = simple_params()
  for strict in (True, False):  # strict=False does not make "nothing at all" acceptable
    with pytest.raises(ValueError, match=r"hold no 'max_logits' entry.*'attn'.*sow_weights="
                       r"True.*nnx.pop\(model, nnx.Intermediate\).*head_max_logits"):
      _update(sgd_clip(1.0, strict=strict), params, stats)


def test_missing_statistics_hints_fit_every_framework():
  params = simple_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = sgd_clip(1.0)
  with pytest.raises(ValueError, match=r"needs this step's attention statistics.*linen.*"
                     r"nnx.capture.*MaxText.*nnx.pop.*Equinox"):
    tx.update(grads, tx.init(params), params, max_logits=None)
  params["attn2"] = simple_params(1)["attn"]
  with pytest.raises(ValueError, match=r"strict=True.*nnx.pop.*head_max_logits"):
    _update(sgd_clip(1.0), params, {"attn": {"max_logits": jnp.ones(4)}})


# --------------------------------------------------------------------------
# Statistics as models produce them (MaxText-like: [batch, heads] sown on a
# parameter-less child, scanned layers first), checked against a brute force.


class OpChild(nnx.Module):
  """MaxText's AttentionOp: no parameters, assigns (not sows) a ``[batch, heads]`` statistic."""

  def __call__(self, q, k):
    logits = qk_logits(q, k)
    self.max_logits = nnx.Intermediate(
        jnp.max(jnp.where(causal(), logits, -jnp.inf), axis=(-2, -1)))
    return logits


class Dense3(nnx.Module):
  def __init__(self, shape, rng: np.random.Generator):
    # numpy draws: XLA:CPU takes seconds to compile rank-3 jax.random draws
    self.kernel = nnx.Param(jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32))


class SelfAttention(nnx.Module):
  """Parameter names of MaxText's llama attention; the statistic on ``attention_op``."""

  def __init__(self, rng: np.random.Generator, heads=4, kv=2, dim=4):
    self.query = Dense3((E, heads, dim), rng)
    self.key = Dense3((E, kv, dim), rng)
    self.value = Dense3((E, kv, dim), rng)
    self.out = Dense3((heads, dim, E), rng)
    self.attention_op = OpChild()

  def __call__(self, x):
    q = jnp.einsum("bte,ehd->bthd", x, self.query.kernel[...])
    k = jnp.einsum("bte,ehd->bthd", x, self.key.kernel[...])
    v = jnp.einsum("bte,ehd->bthd", x, self.value.kernel[...])
    logits = self.attention_op(q, k)
    w = jax.nn.softmax(jnp.where(causal(), logits, -1e9))
    v = jnp.repeat(v, q.shape[-2] // v.shape[-2], axis=-2)
    return jnp.einsum("bhqk,bkhd,hde->bqe", w, v, self.out.kernel[...])


class Decoder(nnx.Module):
  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    self.layers = nnx.List([SelfAttention(rng) for _ in range(2)])

  def __call__(self, x):
    return sum(layer(x) for layer in self.layers)


def test_batch_statistic_on_parameterless_child_nnx_pop():
  """MaxText's shape ``[batch, heads]`` at ``.../attention_op``, gathered with ``nnx.pop``."""
  model = Decoder(3)
  x = x_input(4)
  _, empty = nnx.capture(model, nnx.Intermediate)(x)
  assert not jax.tree.leaves(empty)  # assigned, not sown: nnx.capture sees nothing
  model(x)
  stats = nnx.pop(model, nnx.Intermediate)
  assert stats_of(stats)[("layers", "0", "attention_op")].shape == (B, 4)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  lay = lambda p, i: p["layers"][i]
  before = {i: brute_head_max(lay(params, i)["query"]["kernel"], lay(params, i)["key"]["kernel"],
                              x) for i in (0, 1)}
  for i in (0, 1):  # the producer agrees with the brute force once batch is max-reduced
    np.testing.assert_allclose(stats_of(stats)[("layers", str(i), "attention_op")].max(0),
                               before[i], rtol=1e-5)
  tau = float(np.median(np.concatenate(list(before.values()))))
  new, state = sgd0_clip(params, stats, tau)
  n_hot = 0
  for i in (0, 1):
    after = brute_head_max(lay(new, i)["query"]["kernel"], lay(new, i)["key"]["kernel"], x)
    hot = check_clip_against_brute(before[i], after, tau)
    n_hot += int(hot.sum())
    check_heads(params, new, ("layers", str(i), "query", "kernel"),
                lambda a: per_head(a, -2), hot)
  assert int(state.num_clipped) == n_hot
  assert set(state.max_logits) == {"layers/0", "layers/1"}
  check_others_bitwise(params, new, {("layers", str(i), "query", "kernel") for i in (0, 1)})


def test_statistic_on_child_with_parameters_is_refused():
  params = simple_params()
  params["attn"]["op"] = {"scale": jnp.ones(4)}  # a child with parameters of its own
  with pytest.raises(ValueError, match="statistics at 'attn/op' have no matching attention"):
    _update(sgd_clip(1.0), params, {"attn": {"op": {"max_logits": jnp.ones((2, 4))}}})
  params = simple_params()
  params["block"] = {"norm": {"scale": jnp.ones(4)}}  # nearest owner is no attention layer
  with pytest.raises(ValueError, match="statistics at 'block/op' have no matching attention"):
    _update(sgd_clip(1.0), params, {"attn": {"max_logits": jnp.ones(4)},
                                    "block": {"op": {"max_logits": jnp.ones(4)}}})


def test_own_and_child_statistics_are_max_reduced():
  params = simple_params()
  s1, s2 = jnp.array([5.0, 0.5, 2.0, 1.0]), jnp.array([[1.0, 0.5, 3.0, 0.2]] * 2)
  _, state = _update(sgd_clip(1.0), params, {"attn": {"max_logits": s1,
                                                      "op": {"max_logits": s2}}})
  np.testing.assert_array_equal(state[-1].max_logits["attn"], [5.0, 0.5, 3.0, 1.0])


L_SCAN = 3


def scanned_params(scan_axis: int, seed: int = 5, heads: int = 4, kv: int = 2, dim: int = 4):
  """MaxText-like scanned attention: kernels with the layer axis at ``scan_axis``."""
  rng = np.random.default_rng(seed)
  mk = lambda *shape: np.asarray(rng.standard_normal(shape) * 0.5, np.float32)
  per_layer = {"query": mk(L_SCAN, E, heads, dim), "key": mk(L_SCAN, E, kv, dim),
               "value": mk(L_SCAN, E, kv, dim), "out": mk(L_SCAN, heads, dim, E)}
  attn = {n: {"kernel": jnp.asarray(np.moveaxis(w, 0, scan_axis))} for n, w in per_layer.items()}
  return {"decoder": {"layers": {"self_attention": attn}}}


def scanned_stats(params, scan_axis: int, x):
  """What a scan over the layers sows: ``[layers, batch, heads]`` (layer axis first)."""
  attn = params["decoder"]["layers"]["self_attention"]
  wq, wk = (jnp.moveaxis(attn[n]["kernel"], scan_axis, 0) for n in ("query", "key"))

  def body(_, w):
    q = jnp.einsum("bte,ehd->bthd", x, w[0])
    k = jnp.einsum("bte,ehd->bthd", x, w[1])
    logits = jnp.where(causal(), qk_logits(q, k), -jnp.inf)
    return None, jnp.max(logits, axis=(-2, -1))
  _, s = jax.lax.scan(body, None, (wq, wk))
  return {"decoder": {"layers": {"self_attention": {"attention_op": {"max_logits": s}}}}}


@pytest.mark.parametrize("scan_axis", [0, 1])
def test_scan_axis_anywhere_with_batch_statistic(scan_axis):
  params = scanned_params(scan_axis)
  x = x_input(6)
  stats = scanned_stats(params, scan_axis, x)
  assert stats_of(stats)[("decoder", "layers", "self_attention", "attention_op")].shape \
      == (L_SCAN, B, 4)
  attn = lambda p: p["decoder"]["layers"]["self_attention"]
  layer = lambda p, n, i: np.take(np.asarray(attn(p)[n]["kernel"]), i, axis=scan_axis)
  before = np.stack([brute_head_max(layer(params, "query", i), layer(params, "key", i), x)
                     for i in range(L_SCAN)])
  tau = float(np.median(before))
  layout = mc.separate_qk("query", "key", scan_axis=scan_axis)
  new, state = sgd0_clip(params, stats, tau, layouts=layout)
  after = np.stack([brute_head_max(layer(new, "query", i), layer(new, "key", i), x)
                    for i in range(L_SCAN)])
  hot = check_clip_against_brute(before, after, tau)
  assert int(state.num_clipped) == int(hot.sum())
  for n in ("query", "key"):  # GQA, gqa_sharing="query": the shared keys are untouched
    changed = hot if n == "query" else np.zeros((L_SCAN, 2), bool)
    check_heads(params, new, ("decoder", "layers", "self_attention", n, "kernel"),
                lambda a: per_head(np.moveaxis(a, scan_axis, 0), -2, n_lead=1), changed)
  check_others_bitwise(params, new, {("decoder", "layers", "self_attention", "query",
                                      "kernel")})


def test_undeclared_scan_axis_is_refused_not_guessed():
  params = scanned_params(1)
  stats = scanned_stats(params, 1, x_input(6))
  with pytest.raises(ValueError, match=r"disagree on their leading \(layer\) axes.*scan_axis=1"):
    _update(sgd_clip(1.0), params, stats)
  # A layout that reads the layer axis as leading: the statistic's layer axes don't fit.
  with pytest.raises(ValueError, match=r"\[layers..., batch..., heads\].*scan_axis="):
    _update(sgd_clip(1.0, layouts=mc.separate_qk("query", "key"), auto_detect=False),
            params, stats)
  with pytest.raises(ValueError, match=r"scan_axis=1 declares one layer axis"):
    bad = {"attn": {"query": {"kernel": jnp.ones((2, 3, E, 4, 4))},
                    "key": {"kernel": jnp.ones((2, 3, E, 4, 4))}}}
    sgd_clip(1.0, layouts=mc.separate_qk("query", "key", scan_axis=1)).init(bad)
