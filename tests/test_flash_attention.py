"""flash_attention: the statistic from the kernel's own row maxima (tokamax), on CPU.

The TPU splash kernel runs in Pallas interpret mode; tokamax's XLA path runs as
is. Statistics against a brute-force max of ``q k^T / sqrt(d)`` (rtol 1e-3);
outputs and gradients against :func:`muonclip_jax.dot_product_attention`.
"""

import functools
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import muonclip_jax as mc
from muonclip_jax import _tokamax

pytest.importorskip("tokamax")

B, T, H, HKV, D = 2, 256, 4, 2, 32


@pytest.fixture(scope="module")
def qkv():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, H, D)) * 2, jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, HKV, D)) * 2, jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.float32)
  return q, k, v


def brute_max(q, k, *, causal=False, valid=None):
  """Per query head: max of q.k/sqrt(d) over batch and unmasked positions."""
  kk = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / jnp.sqrt(q.shape[-1])
  keep = jnp.ones(logits.shape, bool)
  if causal:
    keep &= jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  if valid is not None:
    keep &= valid[:, None, None, :]
  return np.asarray(jnp.max(jnp.where(keep, logits, -jnp.inf), axis=(0, 2, 3)))


class Sow(nn.Module):
  """Calls an attention function with module=self (the linen attention_fn protocol)."""

  fn: object

  @nn.compact
  def __call__(self, q, k, v, mask=None):
    return self.fn(q, k, v, mask=mask, module=self)


def sown_jnp(fn, q, k, v, mask=None):
  out, state = Sow(fn).apply({}, q, k, v, mask, mutable=["intermediates"])
  return out, state["intermediates"]["max_logits"]


def sown(fn, q, k, v, mask=None):
  out, stat = sown_jnp(fn, q, k, v, mask)
  return out, np.asarray(stat)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_statistic_output_and_grads_match(impl, qkv):
  q, k, v = qkv
  fa = functools.partial(mc.flash_attention, is_causal=True, implementation=impl,
                         interpret=True)
  ref = functools.partial(mc.dot_product_attention, is_causal=True)
  out, stat = sown(fa, q, k, v)
  np.testing.assert_allclose(stat, brute_max(q, k, causal=True), rtol=1e-3)
  np.testing.assert_allclose(out, ref(q, k, v), atol=2e-5, rtol=1e-4)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  g_flash = jax.grad(loss(fa), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_flash, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


def test_key_padding_mask_on_both_paths(qkv):
  q, k, v = qkv
  valid = jnp.arange(T)[None, :] < jnp.array([[T], [T // 2]])  # batch 1: half the keys
  mask = valid[:, None, None, :]
  want = brute_max(q, k, valid=valid)
  for impl in ("xla", "splash"):
    fa = functools.partial(mc.flash_attention, implementation=impl, interpret=True)
    out, stat = sown(fa, q, k, v, mask)
    np.testing.assert_allclose(stat, want, rtol=1e-3, err_msg=impl)
    np.testing.assert_allclose(out, mc.dot_product_attention(q, k, v, mask=mask), atol=2e-5,
                               rtol=1e-4, err_msg=impl)


def test_soft_cap_is_inverted_exactly_and_saturation_is_inf(qkv):
  q, k, v = qkv
  want = brute_max(q, k, causal=True)  # about 20
  fa = functools.partial(mc.flash_attention, is_causal=True, implementation="xla",
                         logit_soft_cap=10.0)
  np.testing.assert_allclose(sown(fa, q, k, v)[1], want, rtol=1e-4)
  # cap 1: tanh(20) rounds to 1 in f32; the pre-cap value is gone, the statistic is +inf,
  # which QK-Clip skips (and counts), never a wrong finite value.
  fa1 = functools.partial(fa, logit_soft_cap=1.0)
  assert np.all(np.isposinf(sown(fa1, q, k, v)[1]))


def test_logsumexp_bound_only_by_name(qkv):
  q, k, v = qkv
  fa = functools.partial(mc.flash_attention, is_causal=True,
                         statistic="logsumexp_upper_bound")
  want = brute_max(q, k, causal=True)
  bound = sown(fa, q, k, v)[1]
  assert np.all(bound >= want - 1e-4) and np.all(bound <= want + np.log(T) + 1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sinks=jnp.zeros(H)), "sinks"),
    (dict(max_logit_const=30.0), "max_logit_const"),
    (dict(bias=jnp.zeros((1, 1, T, T))), "stats_include_bias"),
    (dict(dropout_rate=0.1), "dropout"),
    (dict(implementation="splash", bias=jnp.zeros((1, 1, T, T)), stats_include_bias=True),
     "no bias"),
    (dict(implementation="splash", mask=jnp.ones((B, H, T, T), bool)), "key padding"),
    (dict(implementation="cudnn"), "implementation must be one of"),
    (dict(qk_attn_weights_einsum=jnp.einsum), "not supported by fused kernels"),
])
def test_refused_configurations_raise_clear_errors(kwargs, match, qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match=match):
    mc.flash_attention(q, k, v, **{"implementation": "xla", **kwargs})


def test_without_the_extra_it_says_how_to_install(monkeypatch, qkv):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  q, k, v = qkv
  _tokamax.load.cache_clear()
  monkeypatch.setattr(importlib.metadata, "version", missing)
  with pytest.raises(ImportError, match=r'pip install "muonclip_jax\[kernels\]"'):
    mc.flash_attention(q, k, v, implementation="splash", interpret=True)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.11")
  _tokamax.load.cache_clear()
  with pytest.raises(ImportError, match=r"supports tokamax>=0.0.12,<0.0.13"):
    mc.flash_attention(q, k, v, implementation="xla")
  monkeypatch.undo()
  _tokamax.load.cache_clear()


def _exact_clip(params, stats, old_stats, new_stats, tau):
  """Hot heads end at tau; cool heads' query/key kernels are bitwise unchanged."""
  hot = old_stats > tau
  assert hot.any() and not hot.all()
  np.testing.assert_allclose(new_stats[hot], tau, rtol=1e-4)
  np.testing.assert_array_equal(new_stats[~hot], old_stats[~hot])


def test_qk_clip_exact_through_flash_attention_linen():
  x = jax.random.normal(jax.random.key(0), (2, 16, 32)) * 3
  fa = functools.partial(mc.flash_attention, implementation="xla")
  layer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, attention_fn=fa)
  params = layer.init(jax.random.key(1), x)["params"]

  def stats_of(p):
    _, state = layer.apply({"params": p}, x, sow_weights=True, mutable=["intermediates"])
    return state["intermediates"]

  before = stats_of(params)
  old = np.asarray(before["max_logits"])
  tau = float(np.median(old))
  tx = mc.muonclip(0.0, tau=tau, steps=1)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params, max_logits=before)
  new_params = optax.apply_updates(params, updates)
  _exact_clip(params, before, old, np.asarray(stats_of(new_params)["max_logits"]), tau)
  cool = ~(old > tau)
  for name in ("query", "key"):
    np.testing.assert_array_equal(np.asarray(new_params[name]["kernel"])[:, cool],
                                  np.asarray(params[name]["kernel"])[:, cool])


def test_qk_clip_exact_through_flash_attention_nnx():
  x = jax.random.normal(jax.random.key(0), (2, 16, 32)) * 3
  fa = functools.partial(mc.flash_attention, implementation="xla")
  model = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32,
                                 attention_fn=fa, decode=False, rngs=nnx.Rngs(1))

  def stats_of(m):
    _, stats = nnx.capture(m, nnx.Intermediate)(x, sow_weights=True)
    return stats

  before = stats_of(model)
  old = np.asarray(jax.tree.leaves(before)[0])
  tau = float(np.median(old))
  q_old = np.asarray(model.query.kernel[...])
  optimizer = nnx.Optimizer(model, mc.muonclip(0.0, tau=tau, steps=1), wrt=nnx.Param)
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads, max_logits=before)
  new = np.asarray(jax.tree.leaves(stats_of(model))[0])
  _exact_clip(None, before, old, new, tau)
  cool = ~(old > tau)
  np.testing.assert_array_equal(np.asarray(model.query.kernel[...])[:, cool], q_old[:, cool])


def test_sharded_over_batch_and_heads_equals_unsharded(qkv):
  q, k, v = qkv
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  fa = functools.partial(mc.flash_attention, is_causal=True, implementation="xla")
  out, stat = sown(fa, q, k, v)
  sharded = functools.partial(fa, mesh=mesh, batch_axes=("data",), head_axes=("model",))
  out_s, stat_s = sown(sharded, q, k, v)
  # Each shard compiles its own (smaller) program: f32 sums round differently (~1e-6).
  np.testing.assert_allclose(out_s, out, atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(stat_s, stat, rtol=1e-6)


def test_context_parallel_statistic_is_the_max_over_sequence_shards(qkv):
  """Queries sharded over the sequence (ring/context parallel): each shard's statistic
  covers its own rows; reduce_max_logits over the sequence axis gives the global one."""
  q, k, v = qkv
  mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(None, "seq"), P(), P()),
                     out_specs=P(), check_vma=False)
  def per_shard(q_shard, k, v):
    _, local = sown_jnp(functools.partial(mc.flash_attention, implementation="xla"),
                        q_shard, k, v)
    return mc.reduce_max_logits({"attn": {"max_logits": local}}, "seq")["attn"]["max_logits"]

  got = np.asarray(per_shard(q, k, v))
  np.testing.assert_allclose(got, brute_max(q, k), rtol=1e-5)
  # Each shard alone sees less: the reduction is what makes it global.
  first = sown(functools.partial(mc.flash_attention, implementation="xla"),
               q[:, : T // 4], k, v)[1]
  assert np.any(first < got)


# -- bad input: a clear error naming the argument, or the right answer ---------------


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_logit_soft_cap_must_be_positive_and_finite(cap, qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match=r"logit_soft_cap must be a positive finite float.*"
                                       r"None to disable"):
    mc.flash_attention(q, k, v, implementation="xla", logit_soft_cap=cap)


def test_logit_soft_cap_traced_is_refused_with_the_fix(qkv):
  q, k, v = qkv
  fa = lambda cap: mc.flash_attention(q, k, v, implementation="xla", logit_soft_cap=cap)
  with pytest.raises(ValueError, match=r"logit_soft_cap must be a concrete number.*partial"):
    jax.jit(fa)(5.0)
  # A concrete numpy/jax scalar is a number: accepted, same as the float.
  np.testing.assert_array_equal(fa(np.float32(5.0)), fa(5.0))


@pytest.mark.parametrize("q_len, kv_len, causal", [(64, 64, True), (100, 200, False)])
def test_splash_pads_short_and_uneven_sequences_exactly(q_len, kv_len, causal):
  """Splash works in 128-blocks: shorter or uneven lengths are padded, the pad keys
  masked; output and statistic equal those of the unpadded attention."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, q_len, 2, D)) * 2, jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, kv_len, 2, D)) * 2, jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, kv_len, 2, D)), jnp.float32)
  mask, valid = None, None
  if not causal:  # and a key padding mask on top of the pad keys
    valid = jnp.arange(kv_len)[None, :] < jnp.array([[kv_len], [kv_len - 37]])
    mask = valid[:, None, None, :]
  fa = functools.partial(mc.flash_attention, is_causal=causal, implementation="splash",
                         interpret=True)
  out, stat = sown(fa, q, k, v, mask)
  np.testing.assert_allclose(stat, brute_max(q, k, causal=causal, valid=valid), rtol=1e-3)
  want = mc.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)


def test_auto_picks_a_kernel_that_takes_the_arguments():
  from muonclip_jax._flash_attention import choose_implementation
  pad = jnp.ones((B, 1, 1, T), bool)
  pick = lambda platform, kind="", **kw: choose_implementation("auto", platform, kind, **{
      "bias": None, "mask": None, "ndim": 4, **kw})
  assert pick("tpu") == "splash" and pick("tpu", mask=pad) == "splash"  # any length (padded)
  assert pick("tpu", mask=jnp.ones((B, H, T, T), bool)) == "xla"
  assert pick("tpu", bias=jnp.zeros((1, 1, T, T))) == "xla"
  assert pick("tpu", ndim=3) == "xla" and pick("tpu", ndim=5) == "xla"
  assert pick("gpu", "NVIDIA H100 80GB HBM3") == "mosaic_gpu"
  assert pick("gpu", "NVIDIA A100-SXM4-40GB") == "triton"
  assert pick("cpu") == "xla"
  assert choose_implementation("splash", "cpu", "", bias=None, mask=None, ndim=4) == "splash"


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("mask_shape, match", [
    ((B, T), r"mask of shape \(2, 256\) does not fit \[batch, num_heads, q_len, kv_len\].*"
             r"mask\[:, None, None, :\]"),
    ((3, 1, 1, T), r"mask of shape \(3, 1, 1, 256\) does not fit .*\(2, 4, 256, 256\)"),
])
def test_mask_of_a_wrong_shape_names_the_shapes(impl, mask_shape, match, qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match=match):
    mc.flash_attention(q, k, v, mask=jnp.ones(mask_shape, bool), implementation=impl,
                       interpret=True)


def test_integer_masks_read_as_flax_does_and_float_masks_are_refused(qkv):
  q, k, v = qkv
  valid = jnp.arange(T)[None, :] < jnp.array([[T], [T // 2]])
  fa = functools.partial(mc.flash_attention, implementation="xla")
  out, stat = sown(fa, q, k, v, valid[:, None, None, :])
  out_i, stat_i = sown(fa, q, k, v, valid[:, None, None, :].astype(jnp.int32))
  np.testing.assert_array_equal(out_i, out)
  np.testing.assert_array_equal(stat_i, stat)
  with pytest.raises(ValueError, match=r"mask must be boolean .* got dtype float32"):
    fa(q, k, v, mask=jnp.where(valid, 0.0, -jnp.inf)[:, None, None, :])


@pytest.mark.parametrize("rank", [3, 5])
def test_splash_needs_rank_4_and_says_so(rank, qkv):
  q, k, v = qkv
  if rank == 3:
    q, k, v = q[0], k[0], v[0]
  else:
    q, k, v = q[None], k[None], v[None]
  with pytest.raises(ValueError, match=r"query, key and value of rank 4, \[batch, seq_len, "
                                       rf"num_heads, head_dim\]; got query of shape .*rank {rank}"):
    mc.flash_attention(q, k, v, implementation="splash", interpret=True)
