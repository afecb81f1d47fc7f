"""The max-logit sowing attention, the blockwise statistic and the wrapper modules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import muonclip_jax as mc


def normal(key, shape) -> jax.Array:
  """``jax.random.normal(key, shape)``, bit for bit (the threefry counter is a reshaped iota):
  drawn flat and reshaped, because XLA:CPU takes seconds to compile the rank-3/4 draw."""
  return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def bernoulli(key, p: float, shape) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)``, bit for bit, drawn flat (see :func:`normal`)."""
  return jax.random.bernoulli(key, p, (math.prod(shape),)).reshape(shape)


def qkv(seed: int = 0, heads: int = 4, kv_heads: int = 4, q_len: int = 5, kv_len: int = 7,
        depth: int = 8, batch: tuple[int, ...] = (2,)):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = normal(k1, batch + (q_len, heads, depth)) * 2
  k = normal(k2, batch + (kv_len, kv_heads, depth)) * 2
  v = normal(k3, batch + (kv_len, kv_heads, depth))
  return q, k, v


def brute_max(q, k, mask=None):
  """Reference statistic in float64: per query head, over everything else."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  rep = q.shape[-2] // k.shape[-2]
  k = np.repeat(k, rep, axis=-2)
  logits = np.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
  return np.moveaxis(logits, -3, 0).reshape(q.shape[-2], -1).max(axis=1)


class Holder(nn.Module):
  """A linen module calling the attention function with ``module=self``."""

  fn: object

  @nn.compact
  def __call__(self, q, k, v, **kw):
    return self.fn(q, k, v, module=self, **kw)


def sown_linen(fn, q, k, v, **kw):
  out, state = Holder(fn).apply({}, q, k, v, mutable=["intermediates"], **kw)
  return out, state["intermediates"]


def test_matches_flax_linen_output_and_sows_stat():
  q, k, v = qkv()
  mask = bernoulli(jax.random.key(9), 0.7, (2, 1, 5, 7))
  bias = normal(jax.random.key(8), (1, 4, 5, 7))
  want = nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  got = mc.dot_product_attention(q, k, v, bias=bias, mask=mask)
  np.testing.assert_array_equal(got, want)
  out, inter = sown_linen(mc.dot_product_attention, q, k, v, bias=bias, mask=mask)
  np.testing.assert_array_equal(out, want)
  assert set(inter) == {"max_logits"}  # never the weights
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k, mask), rtol=1e-6)
  assert inter["max_logits"].dtype == jnp.float32


def test_matches_flax_nnx_gqa_causal():
  q, k, v = qkv(1, heads=4, kv_heads=2)
  mask = bernoulli(jax.random.key(3), 0.8, (2, 1, 5, 7))
  want = nnx.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  got = mc.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  causal = np.tril(np.ones((5, 7), bool))
  _, inter = sown_linen(mc.dot_product_attention, q, k, v, mask=mask, is_causal=True)
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k, mask & causal), rtol=1e-6)


def test_mqa_stats_per_query_head():
  q, k, v = qkv(2, heads=6, kv_heads=1)
  _, inter = sown_linen(mc.dot_product_attention, q, k, v)
  assert inter["max_logits"].shape == (6,)
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k), rtol=1e-6)


def test_soft_cap_recorded_before_cap():
  q, k, v = qkv(3)
  cap = 1.0
  fn = functools.partial(mc.dot_product_attention, logit_soft_cap=cap)
  out, inter = sown_linen(fn, q, k, v)
  assert float(jnp.max(inter["max_logits"])) > 2 * cap  # uncapped value
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k), rtol=1e-6)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q / math.sqrt(8), k)
  w = jax.nn.softmax(cap * jnp.tanh(logits / cap))
  np.testing.assert_allclose(out, jnp.einsum("bhqk,bkhd->bqhd", w, v), rtol=1e-5, atol=1e-6)


def test_stats_exclude_bias_unless_asked():
  q, k, v = qkv(4)
  bias = jnp.full((1, 4, 5, 7), 100.0)
  _, inter = sown_linen(mc.dot_product_attention, q, k, v, bias=bias)
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k), rtol=1e-6)
  fn = functools.partial(mc.dot_product_attention, stats_include_bias=True)
  _, inter = sown_linen(fn, q, k, v, bias=bias)
  np.testing.assert_allclose(inter["max_logits"], brute_max(q, k) + 100.0, rtol=1e-6)


def test_fully_masked_head_is_minus_inf():
  q, k, v = qkv(5)
  mask = jnp.ones((1, 4, 5, 7), bool).at[:, 2].set(False)
  _, inter = sown_linen(mc.dot_product_attention, q, k, v, mask=mask)
  assert inter["max_logits"][2] == -jnp.inf
  assert np.all(np.isfinite(np.asarray(inter["max_logits"])[[0, 1, 3]]))


def test_stat_is_stop_gradient():
  q, k, v = qkv(6)

  def f(q):
    _, inter = sown_linen(mc.dot_product_attention, q, k, v)
    return jnp.sum(inter["max_logits"])
  g = jax.grad(f)(q)
  np.testing.assert_array_equal(g, jnp.zeros_like(q))


def test_no_module_no_sow_and_dropout():
  q, k, v = qkv(7)
  rng = jax.random.key(0)
  got = mc.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.3)
  want = nn.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("seed,heads,kv_heads,block,causal", [
    (0, 4, 4, 3, False), (1, 4, 2, 7, True), (2, 6, 1, 16, False), (3, 4, 4, 1, True)])
def test_blockwise_matches_dense_stat(seed, heads, kv_heads, block, causal):
  q, k, _ = qkv(seed, heads=heads, kv_heads=kv_heads, q_len=9, kv_len=11)
  mask = bernoulli(jax.random.key(seed + 10), 0.6, (2, 1, 9, 11))
  want_mask = mask & np.tril(np.ones((9, 11), bool)) if causal else mask
  np.testing.assert_allclose(
      mc.max_logits_blockwise(q, k, mask=mask, is_causal=causal, block_size=block),
      brute_max(q, k, want_mask), rtol=1e-6)
  if seed == 0:
    np.testing.assert_allclose(mc.max_logits_blockwise(q, k, block_size=block),
                               brute_max(q, k), rtol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
      mc.max_logits_blockwise(q, k, block_size=0)


def test_blockwise_under_jit_no_batch_dims():
  q, k, _ = qkv(8, batch=())
  got = jax.jit(lambda a, b: mc.max_logits_blockwise(a, b, block_size=4))(q, k)
  np.testing.assert_allclose(got, brute_max(q, k), rtol=1e-6)


def test_sow_helpers_from_hand_written_attention_linen_and_nnx():
  q, k, _ = qkv(9)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)

  class Lin(nn.Module):
    @nn.compact
    def __call__(self, logits):
      mc.sow_max_logits(self, mc.head_max_logits(logits))
      mc.sow_max_logits(self, mc.head_max_logits(logits) - 100.0)  # max-reduced, not appended
      return logits

  _, state = Lin().apply({}, logits, mutable=["intermediates"])
  np.testing.assert_allclose(state["intermediates"]["max_logits"], brute_max(q, k), rtol=1e-6)

  class NNX(nnx.Module):
    def __call__(self, logits):
      mc.sow_max_logits(self, mc.head_max_logits(logits) - 100.0)
      mc.sow_max_logits(self, mc.head_max_logits(logits))
      return logits

  _, stats = nnx.capture(NNX(), nnx.Intermediate)(logits)
  np.testing.assert_allclose(stats["max_logits"][...], brute_max(q, k), rtol=1e-6)
  with pytest.raises(TypeError, match=r"Module.*Equinox.*head_max_logits.*'max_logits'"):
    mc.sow_max_logits(object(), jnp.ones(2))


def test_linen_module_switch_and_repeated_calls_max_reduce():
  x1 = normal(jax.random.key(0), (2, 5, 16))
  x2 = 3 * normal(jax.random.key(1), (2, 5, 16))

  class Twice(nn.Module):
    sow: bool

    @nn.compact
    def __call__(self, x1, x2):
      a = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16,
                                          attention_fn=mc.dot_product_attention, name="a")
      return a(x1, sow_weights=self.sow) + a(x2, sow_weights=self.sow)

  params = Twice(True).init(jax.random.key(2), x1, x2)
  _, state = Twice(False).apply(params, x1, x2, mutable=["intermediates"])
  assert state == {}  # nothing without sow_weights=True
  _, state = Twice(True).apply(params, x1, x2, mutable=["intermediates"])
  st = state["intermediates"]["a"]["max_logits"]
  one = lambda x: nn.MultiHeadDotProductAttention(
      num_heads=4, qkv_features=16, attention_fn=mc.dot_product_attention).apply(
          {"params": params["params"]["a"]}, x, sow_weights=True,
          mutable=["intermediates"])[1]["intermediates"]["max_logits"]
  np.testing.assert_array_equal(st, jnp.maximum(one(x1), one(x2)))


def test_linen_wrapper_equals_flax_module():
  x = normal(jax.random.key(0), (2, 5, 16))
  mask = nn.make_causal_mask(jnp.ones((2, 5)))
  for normalize_qk in (False, True):
    kw = dict(num_heads=4, qkv_features=16, normalize_qk=normalize_qk)
    ours = mc.MaxLogitMultiHeadDotProductAttention(**kw)
    params = ours.init(jax.random.key(1), x)
    out, state = ours.apply(params, x, mask=mask, mutable=["intermediates"])
    np.testing.assert_array_equal(
        out, nn.MultiHeadDotProductAttention(**kw).apply(params, x, mask=mask))
    assert set(state["intermediates"]) == {"max_logits"}
    assert state["intermediates"]["max_logits"].shape == (4,)


def test_nnx_wrapper_gqa_equals_flax_module_and_stats():
  x = normal(jax.random.key(0), (2, 5, 16))
  kw = dict(num_heads=4, in_features=16, num_kv_heads=2, decode=False)
  ours = mc.MaxLogitMultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  out, stats = nnx.capture(ours, nnx.Intermediate)(x, is_causal=True)
  np.testing.assert_allclose(out, ref(x, is_causal=True), rtol=1e-5, atol=1e-6)
  q = ours.query(x)
  k = ours.key(x)
  want = brute_max(q, k, np.tril(np.ones((5, 5), bool)))
  np.testing.assert_allclose(stats["max_logits"][...], want, rtol=1e-5)
  # plain Flax module + attention_fn + sow_weights=True gives the same statistic
  plain = nnx.MultiHeadAttention(**kw, attention_fn=mc.dot_product_attention, rngs=nnx.Rngs(0))
  _, stats2 = nnx.capture(plain, nnx.Intermediate)(x, is_causal=True, sow_weights=True)
  np.testing.assert_array_equal(stats2["max_logits"][...], stats["max_logits"][...])
  assert set(stats2) == {"max_logits"}


def test_scan_stacks_stats_per_layer():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + mc.MaxLogitMultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True}, length=3)
      return stack(name="stack")(x, None)[0]

  x = normal(jax.random.key(0), (2, 4, 8))
  params = Model().init(jax.random.key(1), x)
  _, state = Model().apply(params, x, mutable=["intermediates"])
  leaves = jax.tree.leaves(state)
  assert len(leaves) == 1 and leaves[0].shape == (3, 2)
