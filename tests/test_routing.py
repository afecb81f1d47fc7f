"""Muon's routing on the parameter trees of real codebases, leaf by leaf.

Each family's tree is built with the names and shapes of the library's own
source (cited per family). For every leaf the table gives what the library's
math means: AdamW, or the batch / fan-in / fan-out axes of the matrices its
einsum or matmul applies. The tests check :func:`muonclip_jax.muon_routing`
against the table, and ``muon``'s update against an independent reference:
the exact polar factor (SVD) of each intended matrix, built from the table
with NumPy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh

import muonclip_jax as mc

A = "adamw"
# Small sizes: heads, kv heads, embed, head dim, MLP hidden, vocab, layers.
N, K, D, H, F, V, L = 4, 2, 16, 8, 32, 64, 3


def m(batch, fan_in, fan_out):
  """An expected Muon view: (batch, fan-in, fan-out) axes."""
  return (tuple(batch), tuple(fan_in), tuple(fan_out))


# --- Gemma 3.3.0 (linen): gemma/gm/nn/_modules.py (Embedder, Attention, FeedForward,
# Block), _layers.py (Einsum: param named weight_name, default 'w'; RMSNorm 'scale'),
# _transformer.py (embedder, layer_{i}, final_norm). Einsums as in the source:
#   q_einsum 'BTD,NDH->BTNH'         (N, D, H)     one D x N*H projection
#   kv_einsum 'BSD,CKDH->CBSKH'      (2, K, D, H)  K and V: two D x K*H projections
#   qkv_einsum 'BTD,SNDH->SBTNH'     (3, N, D, H)  q, k, v: three D x N*H projections
#   attn_vec_einsum 'BTNH,NHD->BTD'  (N, H, D)     one N*H x D projection
#   gating_einsum '...F,NHF->...NH'  (2, F, D)     gate and up: two D x F projections
#     (transpose_gating_einsum=True: every Gemma 2 9B/27B and Gemma 3 config, _gemma.py)
#   linear '...H,HF->...F'           (F, D)        F x D
# The shapes were checked against the real Block.init (gemma 3.3.0 wheel).
def gemma_gqa():
  layer = {
      "pre_attention_norm": {"scale": ((D,), A)},
      "attn": {
          "q_einsum": {"w": ((N, D, H), m([], [1], [0, 2]))},
          "kv_einsum": {"w": ((2, K, D, H), m([0], [2], [1, 3]))},
          "_query_norm": {"scale": ((H,), A)},
          "_key_norm": {"scale": ((H,), A)},
          "attn_vec_einsum": {"w": ((N, H, D), m([], [0, 1], [2]))},
      },
      "post_attention_norm": {"scale": ((D,), A)},
      "pre_ffw_norm": {"scale": ((D,), A)},
      "mlp": {"gating_einsum": ((2, F, D), m([0], [2], [1])),
              "linear": ((F, D), m([], [0], [1]))},
      "post_ffw_norm": {"scale": ((D,), A)},
  }
  return {"embedder": {"input_embedding": ((V, D), A)},  # also the tied LM head (decode)
          "layer_0": layer, "layer_1": layer, "final_norm": {"scale": ((D,), A)}}


def gemma_mha():  # num_kv_heads == num_heads: one fused qkv_einsum (Attention.use_qkv_einsum)
  tree = gemma_gqa()
  for name in ("layer_0", "layer_1"):
    attn = dict(tree[name]["attn"])
    del attn["q_einsum"], attn["kv_einsum"], attn["_query_norm"], attn["_key_norm"]
    attn["qkv_einsum"] = {"w": ((3, N, D, H), m([0], [2], [1, 3]))}
    tree[name] = {**tree[name], "attn": attn}
  return tree


# --- MaxText (AI-Hypercomputer/maxtext, src/maxtext): layers/decoders.py and
# nnx_decoders.py (token_embedder, decoder/layers or layers_{i}, decoder_norm,
# logits_dense), models/llama2.py (pre/post_self_attention_layer_norm, self_attention,
# mlp), layers/attentions.py (query/key/value (embed, heads, head_dim), out
# (heads, head_dim, embed)), layers/linears.py (MlpBlock wi_0/wi_1 (embed, mlp), wo
# (mlp, embed)), configs/base.yml (scan_layers: true, param_scan_axis: 1: nn.scan's
# variable_axes puts the layer axis at that position of every scanned parameter).
def maxtext_llama_layer():
  return {
      "pre_self_attention_layer_norm": {"scale": ((D,), A)},
      "self_attention": {
          "query": {"kernel": ((D, N, H), m([], [0], [1, 2]))},
          "key": {"kernel": ((D, K, H), m([], [0], [1, 2]))},
          "value": {"kernel": ((D, K, H), m([], [0], [1, 2]))},
          "out": {"kernel": ((N, H, D), m([], [0, 1], [2]))},
      },
      "post_self_attention_layer_norm": {"scale": ((D,), A)},
      "mlp": {"wi_0": {"kernel": ((D, F), m([], [0], [1]))},
              "wi_1": {"kernel": ((D, F), m([], [0], [1]))},
              "wo": {"kernel": ((F, D), m([], [0], [1]))}},
  }


# DeepSeek: models/deepseek.py (dense_layers / moe_layers, DeepSeekMoeBlock_0),
# layers/attention_mla.py (wq_a (embed, q_lora), q_norm, wq_b (q_lora, heads, qk_head_dim),
# wkv_a (embed, kv_lora + rope), kv_norm, wkv_b (kv_lora, heads, nope + v), out),
# layers/moe.py (RoutedAndSharedMoE: MoeBlock_0 with gate/kernel (embed, experts) and the
# experts as parameters wi_0/wi_1 (experts, embed, mlp), wo (experts, mlp, embed);
# shared_experts an MlpBlock).
QL, KVL, R, E = 12, 10, 4, 4


def maxtext_mla_attention():
  return {
      "wq_a": {"kernel": ((D, QL), m([], [0], [1]))},
      "q_norm": {"scale": ((QL,), A)},
      "wq_b": {"kernel": ((QL, N, H + R), m([], [0], [1, 2]))},
      "wkv_a": {"kernel": ((D, KVL + R), m([], [0], [1]))},
      "kv_norm": {"scale": ((KVL,), A)},
      "wkv_b": {"kernel": ((KVL, N, 2 * H), m([], [0], [1, 2]))},
      "out": {"kernel": ((N, H, D), m([], [0, 1], [2]))},
  }


def maxtext_mla_layers():
  norms = {"pre_self_attention_layer_norm": {"scale": ((D,), A)},
           "post_self_attention_layer_norm": {"scale": ((D,), A)}}
  dense = {**norms, "self_attention": maxtext_mla_attention(),
           "mlp": maxtext_llama_layer()["mlp"]}
  moe = {**norms, "self_attention": maxtext_mla_attention(), "DeepSeekMoeBlock_0": {
      "MoeBlock_0": {"gate": {"kernel": ((D, E), m([], [0], [1]))},
                     "wi_0": ((E, D, F), m([0], [1], [2])),
                     "wi_1": ((E, D, F), m([0], [1], [2])),
                     "wo": ((E, F, D), m([0], [1], [2]))},
      "shared_experts": {"wi_0": {"kernel": ((D, F), m([], [0], [1]))},
                         "wi_1": {"kernel": ((D, F), m([], [0], [1]))},
                         "wo": {"kernel": ((F, D), m([], [0], [1]))}}}}
  return {"dense_layers": dense, "moe_layers": moe}


def _stack(table, axis):
  """Every leaf of ``table`` stacked over L layers at ``axis`` (nn.scan's variable_axes)."""
  def one(entry):
    shape, want = entry
    shape = shape[:axis] + (L,) + shape[axis:]
    if want == A:
      return shape, A
    up = lambda axes: tuple(a + (a >= axis) for a in axes)
    batch, fin, fout = want
    return shape, (tuple(sorted(up(batch) + (axis,))), up(fin), up(fout))
  return jax.tree.map(one, table, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                      and isinstance(x[0], tuple))


def maxtext(layers, scan_axis):
  """A MaxText decoder: ``layers`` maps container names to one layer's table."""
  decoder = {"decoder_norm": {"scale": ((D,), A)},
             "logits_dense": {"kernel": ((D, V), A)}}  # the untied LM head
  for name, layer in layers.items():
    if scan_axis is None:
      for i in range(2):
        decoder[f"{name}_{i}"] = layer
    else:
      decoder[name] = _stack(layer, scan_axis)
  return {"token_embedder": {"embedding": ((V, D), A)}, "decoder": decoder}


# --- A PyTorch-style hand-written Llama: the parameter names of Meta's
# llama/model.py (tok_embeddings, layers.{i}.attention.wq/wk/wv/wo, feed_forward.w1/w2/w3,
# attention_norm, ffn_norm, norm, output), with torch.nn.Linear's (out, in) weights.
def torch_llama():
  layer = {
      "attention": {"wq": {"weight": ((N * H, D), m([], [1], [0]))},
                    "wk": {"weight": ((K * H, D), m([], [1], [0]))},
                    "wv": {"weight": ((K * H, D), m([], [1], [0]))},
                    "wo": {"weight": ((D, N * H), m([], [1], [0]))}},
      "feed_forward": {"w1": {"weight": ((F, D), m([], [1], [0]))},
                       "w2": {"weight": ((D, F), m([], [1], [0]))},
                       "w3": {"weight": ((F, D), m([], [1], [0]))}},
      "attention_norm": {"weight": ((D,), A)},
      "ffn_norm": {"weight": ((D,), A)},
  }
  return {"tok_embeddings": {"weight": ((V, D), A)}, "layers": {"0": layer, "1": layer},
          "norm": {"weight": ((D,), A)}, "output": {"weight": ((V, D), A)}}


FAMILIES = {
    "gemma_gqa": (gemma_gqa, {}),
    "gemma_mha": (gemma_mha, {}),
    "maxtext_llama_unscanned": (lambda: maxtext({"layers": maxtext_llama_layer()}, None), {}),
    "maxtext_llama_scan0": (lambda: maxtext({"layers": maxtext_llama_layer()}, 0),
                            {"layer_axis": 0}),
    "maxtext_llama_scan1": (lambda: maxtext({"layers": maxtext_llama_layer()}, 1),
                            {"layer_axis": 1}),
    "maxtext_mla_unscanned": (lambda: maxtext(maxtext_mla_layers(), None), {}),
    "maxtext_mla_scan0": (lambda: maxtext(maxtext_mla_layers(), 0), {"layer_axis": 0}),
    "maxtext_mla_scan1": (lambda: maxtext(maxtext_mla_layers(), 1), {"layer_axis": 1}),
    "torch_llama": (torch_llama, {}),
}


def split(table):
  """(shapes tree of ShapeDtypeStructs, {path: expected})."""
  is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
  shapes = jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], jnp.float32), table,
                        is_leaf=is_entry)
  flat = jax.tree_util.tree_flatten_with_path(table, is_leaf=is_entry)[0]
  return shapes, {jax.tree_util.keystr(p, simple=True, separator="/"): e for p, e in flat}


def check_routing(routing, expected):
  assert [leaf.path for leaf in routing.leaves] == list(expected)
  for leaf in routing.leaves:
    shape, want = expected[leaf.path]
    assert leaf.shape == shape, leaf.path
    if want == A:
      assert leaf.label == "adamw", (leaf.path, leaf.label_rule)
      continue
    assert leaf.label == "muon", (leaf.path, leaf.label_rule)
    got = (leaf.batch_axes, leaf.fan_in_axes, leaf.fan_out_axes)
    assert got == want, (leaf.path, got, want, leaf.view_rule)
    assert leaf.matrix == tuple(math.prod(shape[a] for a in axes) for axes in want), leaf.path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routing_report_matches_the_libraries_math(family):
  make, opts = FAMILIES[family]
  shapes, expected = split(make())
  routing = mc.muon_routing(shapes, **opts)
  check_routing(routing, expected)
  # What muon itself uses: the same labels, and views the mesh planner agrees with.
  assert mc.default_param_labels(shapes, layer_axis=opts.get("layer_axis")) == jax.tree.map(
      lambda leaf: leaf, jax.tree_util.tree_unflatten(
          jax.tree.structure(shapes), [leaf.label for leaf in routing.leaves]))
  plan = mc.plan_muon_sharding(shapes, {"fsdp": 2}, **opts)
  views = {leaf.path: leaf.matrices for leaf in plan.leaves}
  for leaf in routing.leaves:
    assert views[leaf.path] == leaf.matrix, leaf.path
  # Nothing in these trees is ambiguous except Gemma's gating orientation (see below).
  flagged = {leaf.path.split("/")[-1] for leaf in routing.flagged}
  assert flagged <= {"gating_einsum"}, [(f.path, f.flags) for f in routing.flagged]


def polar(x):
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  return u @ vt


# One Newton–Schulz step, in NumPy: X / (|X|_F + eps), then a X + b (X X^T) X + c (X X^T)^2 X.
# It mixes every entry of the intended matrix, so a wrong grouping or orientation of the
# axes changes it; and one step keeps the compile of each test small.
NS1 = (3.4445, -4.7750, 2.0315)


def ns_step(x, eps=1e-7):
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS1
  gram = x @ x.T
  return a * x + b * gram @ x + c * gram @ gram @ x


def reference_update(g, want, fn):
  """``fn`` on each intended matrix of ``g`` (from the table, with NumPy)."""
  batch, fin, fout = want
  perm = batch + fin + fout
  t = np.transpose(g, perm)
  size = lambda axes: math.prod(g.shape[a] for a in axes)
  mats = t.reshape(size(batch), size(fin), size(fout))
  o = np.stack([fn(mat) for mat in mats]).reshape(t.shape)
  return np.transpose(o, np.argsort(perm))


def check_update(table, opts, ns, fn, atol):
  """muon's update on ``table``'s tree: ``-fn`` of each Muon matrix, AdamW elsewhere."""
  shapes, expected = split(table)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
  params = jax.tree.map(jnp.zeros_like, grads)
  tx = mc.muon(1.0, weight_decay=0.0, beta=0.0, shape_scaling=None, **ns, **opts)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  flat_u = dict(zip(expected, jax.tree.leaves(updates), strict=True))
  flat_g = dict(zip(expected, jax.tree.leaves(grads), strict=True))
  for path, (_, want) in expected.items():
    g = np.asarray(flat_g[path], np.float64)
    if want == A:  # AdamW's first step: m/(sqrt(v) + eps) with both debiased is g/(|g| + eps).
      ref = -g / (np.abs(g) + 1e-8)
      np.testing.assert_allclose(np.asarray(flat_u[path]), ref, atol=1e-6, err_msg=path)
    else:
      ref = -reference_update(g, want, fn)
      np.testing.assert_allclose(np.asarray(flat_u[path]), ref, atol=atol, err_msg=path)


@pytest.mark.parametrize("family", ["gemma_mha", "maxtext_llama_scan1", "maxtext_mla_scan0",
                                    "torch_llama"])
def test_muon_update_orthogonalises_each_intended_matrix(family):
  make, opts = FAMILIES[family]
  check_update(make(), opts, {"coeffs": NS1, "steps": 1}, ns_step, atol=2e-5)


def test_muon_update_on_gemma_is_the_polar_factor_of_each_projection():
  # Polar Express, 12 steps, converges to the polar factor (within 1e-6 on these sizes).
  one_layer = {k: v for k, v in gemma_gqa().items() if k != "layer_1"}
  check_update(one_layer, {}, {"coeffs": "polar_express", "steps": 12}, polar, atol=2e-5)


def test_gemma_per_head_option_and_keller_refusal():
  shapes, _ = split(gemma_gqa())
  per_head = {leaf.path: leaf for leaf in mc.muon_routing(shapes, per_head=True).leaves}
  q = per_head["layer_0/attn/q_einsum/w"]
  assert (q.batch_axes, q.fan_in_axes, q.fan_out_axes, q.matrix) == ((0,), (1,), (2,), (N, D, H))
  kv = per_head["layer_0/attn/kv_einsum/w"]
  assert (kv.batch_axes, kv.fan_in_axes, kv.fan_out_axes) == ((0, 1), (2,), (3,))
  o = per_head["layer_0/attn/attn_vec_einsum/w"]
  assert (o.batch_axes, o.fan_in_axes, o.fan_out_axes) == ((0,), (1,), (2,))
  # Gemma's gating einsum is (2, F, D) or (2, D, F) by config: flagged, and keller scaling
  # (which depends on the fan-in side) refuses it until dimension_numbers declares it.
  gating = {leaf.path: leaf for leaf in mc.muon_routing(shapes).leaves}[
      "layer_0/mlp/gating_einsum"]
  assert gating.flags and "orientation" in gating.flags[0]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes)
  with pytest.raises(ValueError, match=r"layer_0/mlp/gating_einsum: shape_scaling='keller'"):
    mc.muon(0.1, shape_scaling="keller").init(params)
  dims = lambda path, shape: (mc.MuonDimensionNumbers(2, 1) if path.endswith("gating_einsum")
                              else None)
  mc.muon(0.1, shape_scaling="keller", dimension_numbers=dims).init(params)
  assert not any(leaf.flags for leaf in mc.muon_routing(
      shapes, dimension_numbers=dims, shape_scaling="keller").flagged)


def test_lm_heads_by_their_common_names_and_blocks_are_not_heads():
  for path in ("decoder/logits_dense/kernel", "lm_head/kernel", "model/lm_head/weight",
               "output/weight", "output_layer/weight", "unembed/w", "head/weight",
               "decoder/output_projection/weight", "to_logits/kernel", "embed_out/weight",
               "embedder/input_embedding", "classifier/kernel"):
    assert mc.default_label(path, 2) == "adamw", path
  for path in ("bert/encoder/layer/0/attention/output/dense/kernel",
               "bert/encoder/layer/0/output/dense/kernel", "blocks/0/head/kernel",
               "attn/output_proj/weight", "layers/0/attention/wo/weight"):
    assert mc.default_label(path, 2) == "muon", path


def test_undeclared_scan_axis_is_flagged_and_a_useless_declaration_refused():
  # MaxText's default param_scan_axis=1 without layer_axis: the report flags the stacks.
  shapes, _ = split(maxtext({"layers": maxtext_llama_layer()}, 1))
  routing = mc.muon_routing(shapes)
  flagged = {leaf.path for leaf in routing.flagged}
  assert "decoder/layers/self_attention/query/kernel" in flagged
  assert all("layer_axis" in leaf.flags[0] for leaf in routing.flagged)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes)
  with pytest.raises(ValueError, match="layer_axis=1: no parameter is under a scanned"):
    mc.muon(0.1, layer_axis=1).init({"mlp": {"kernel": jnp.zeros((4, 3, 5))}})
  with pytest.raises(ValueError, match=r"layer_axis\['decoder/blocks'\]: no Muon parameter"):
    mc.muon(0.1, layer_axis={"decoder/blocks": 1}).init(params)
  with pytest.raises(ValueError, match="layer_axis: expected None"):
    mc.muon(0.1, layer_axis="1")
  # A mapping names the stack exactly (here the same as the int form).
  by_prefix = mc.muon_routing(shapes, layer_axis={"decoder/layers": 1})
  assert by_prefix == mc.muon_routing(shapes, layer_axis=1)
  assert not by_prefix.flagged


def test_equinox_modules_route_by_their_out_in_weights():
  import equinox as eqx  # in the [test] extra

  class Block(eqx.Module):  # equinox 0.13: nn.MultiheadAttention, nn.MLP, nn.RMSNorm
    norm: eqx.nn.RMSNorm
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.norm = eqx.nn.RMSNorm(D)
      self.attn = eqx.nn.MultiheadAttention(N, D, qk_size=H, vo_size=H, key=k1)
      self.mlp = eqx.nn.MLP(D, D, F, 1, key=k2)

  class LM(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: Block  # a stack: eqx.filter_vmap over the layer keys (leading layer axis)
    lm_head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.embed = eqx.nn.Embedding(V, D, key=k1)
      self.blocks = eqx.filter_vmap(Block)(jax.random.split(k2, L))
      self.lm_head = eqx.nn.Linear(D, V, use_bias=False, key=k3)

  params = eqx.filter(LM(jax.random.key(0)), eqx.is_array)
  # Linear.weight is (out, in): fan-in is the last axis; the layer axis 0 is batch.
  expected = {
      "embed/weight": ((V, D), A),
      "blocks/norm/weight": ((L, D), A),
      "blocks/norm/bias": ((L, D), A),
      "blocks/attn/query_proj/weight": ((L, N * H, D), m([0], [2], [1])),
      "blocks/attn/key_proj/weight": ((L, N * H, D), m([0], [2], [1])),
      "blocks/attn/value_proj/weight": ((L, N * H, D), m([0], [2], [1])),
      "blocks/attn/output_proj/weight": ((L, D, N * H), m([0], [2], [1])),
      "blocks/mlp/layers/0/weight": ((L, F, D), m([0], [2], [1])),
      "blocks/mlp/layers/0/bias": ((L, F), A),
      "blocks/mlp/layers/1/weight": ((L, D, F), m([0], [2], [1])),
      "blocks/mlp/layers/1/bias": ((L, D), A),
      "lm_head/weight": ((V, D), A),
  }
  routing = mc.muon_routing(params, layer_axis={"blocks": 0})
  got = {leaf.path: leaf for leaf in routing.leaves}
  assert set(got) == set(expected)
  ordered = {leaf.path: expected[leaf.path] for leaf in routing.leaves}
  check_routing(routing, ordered)
  assert not routing.flagged
  # Undeclared, the stack is still read as leading, and flagged as assumed.
  assert {leaf.path for leaf in mc.muon_routing(params).flagged} == {
      p for p, (_, w) in expected.items() if w != A}
  # And muon's update orthogonalises each layer's (out, in) matrix; keller scaling reads the
  # orientation the right way round: fan_out / fan_in = F / D for the MLP's first layer.
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                       params)
  tx = mc.muon(1.0, weight_decay=0.0, beta=0.0, shape_scaling="keller",
               layer_axis={"blocks": 0}, coeffs=NS1, steps=1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name, get, scale in (
      ("attn/output_proj", lambda t: t.blocks.attn.output_proj.weight, 1.0),
      ("mlp/layers/0", lambda t: t.blocks.mlp.layers[0].weight, math.sqrt(F / D)),
      ("mlp/layers/1", lambda t: t.blocks.mlp.layers[1].weight, 1.0)):
    g = np.asarray(get(grads), np.float64)
    ref = -scale * reference_update(g, m([0], [2], [1]), ns_step)
    np.testing.assert_allclose(np.asarray(get(updates)), ref, atol=2e-5, err_msg=name)


LAYOUTS = [  # (container path, one layer's leaf table): the layouts a scan can stack.
    ("self_attention/query/kernel", (D, N, H)),
    ("self_attention/out/kernel", (N, H, D)),
    ("mlp/wo/kernel", (F, D)),
    ("attn/q_einsum/w", (N, D, H)),
    ("attn/kv_einsum/w", (2, K, D, H)),
    ("MoeBlock_0/wi_0", (E, D, F)),
]


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_layer_axis_anywhere_is_a_batch_axis(data):
  """A stack scanned at any axis updates each layer exactly as that layer on its own."""
  name, shape = data.draw(st.sampled_from(LAYOUTS))
  axis = data.draw(st.integers(0, len(shape)))
  negative = data.draw(st.booleans())
  layers = data.draw(st.integers(1, 3))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  per_layer = [rng.standard_normal(shape).astype(np.float32) for _ in range(layers)]
  stacked = jnp.asarray(np.stack(per_layer, axis=axis))
  declared = axis - stacked.ndim if negative else axis

  def tree(x, container):
    t = x
    for c in reversed(name.split("/")):
      t = {c: t}
    return {"decoder": {container: t}}

  tx = mc.scale_by_muon(layer_axis=declared, coeffs=NS1, steps=1)
  u = jax.jit(tx.update)(tree(stacked, "layers"), tx.init(tree(stacked, "layers")))[0]
  u = jax.tree.leaves(u)[0]
  ref_tx = mc.scale_by_muon(coeffs=NS1, steps=1)
  ref_update = jax.jit(ref_tx.update)
  for i, w in enumerate(per_layer):
    ui = jax.tree.leaves(ref_update(tree(jnp.asarray(w), "layers_0"),
                                    ref_tx.init(tree(jnp.asarray(w), "layers_0")))[0])[0]
    np.testing.assert_allclose(np.take(np.asarray(u), i, axis=axis), np.asarray(ui), atol=2e-6)


def test_options_reach_the_mesh_path():
  shapes, expected = split(maxtext({"layers": maxtext_llama_layer()}, 1))
  mesh = AbstractMesh((2,), ("fsdp",))
  text = mc.muon_sharding_summary(shapes, mesh, layer_axis=1)
  assert "decoder/layers/self_attention/query/kernel" in text
  plan = mc.plan_muon_sharding(shapes, mesh, layer_axis=1, per_head=True)
  q = {leaf.path: leaf for leaf in plan.leaves}["decoder/layers/self_attention/query/kernel"]
  assert q.matrices == (L * N, D, H)  # per head, per layer


def test_report_table_lists_every_leaf_with_its_rule():
  shapes, expected = split(gemma_gqa())
  text = str(mc.muon_routing(shapes))
  lines = text.splitlines()
  assert lines[0].startswith(f"Muon routing: {len(expected)} leaves;")
  for path in expected:
    assert any(f" {path} " in line for line in lines), path
  assert "Gemma q_einsum (N, D, H): whole D x N*H projection" in text
  assert "name: embedding 'embedder'" in text
  assert "Gemma mlp/linear (F, D)" in text
  assert "! layer_0/mlp/gating_einsum: orientation" in text


def test_layer_axis_under_inject_hyperparams_needs_static_args():
  params = {"decoder": {"layers": {"mlp": {"kernel": jnp.ones((4, 3, 5))}}}}
  with pytest.raises(ValueError, match=r"static_args=\('layer_axis',\)"):
    optax.inject_hyperparams(mc.muon)(learning_rate=0.1, layer_axis=1).init(params)
  tx = optax.inject_hyperparams(mc.muon, static_args=("layer_axis",))(
      learning_rate=0.1, layer_axis=1)
  ref = mc.muon(0.1, layer_axis=1)
  u, _ = tx.update(params, tx.init(params), params)
  r, _ = ref.update(params, ref.init(params), params)
  np.testing.assert_allclose(u["decoder"]["layers"]["mlp"]["kernel"],
                             r["decoder"]["layers"]["mlp"]["kernel"], atol=1e-7)


def test_empty_layer_axis_declares_nothing_is_stacked():
  # MaxText fused_mlp, unscanned: mlp/wi is (embed, num_activations, mlp) (layers/linears.py).
  shapes = {"decoder": {"layers_0": {"mlp": {"wi": {"kernel": jax.ShapeDtypeStruct(
      (D, 2, F), jnp.float32)}}}}}
  guessed = mc.muon_routing(shapes).leaves[0]
  assert guessed.flags and "fused" in guessed.flags[0]
  leaf = mc.muon_routing(shapes, layer_axis={}).leaves[0]
  assert (leaf.batch_axes, leaf.fan_in_axes, leaf.fan_out_axes, leaf.flags) == (
      (1,), (0,), (2,), ())
