"""Muon and scale_by_muon against optax.contrib.muon and the published algorithm."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers
from support.arrays import rand as _rand

import muonclip_jax as mc
from muonclip_jax._coefficients import KELLER
from muonclip_jax._paths import path_str


def mixed_tree(rng):
  return {
      "embed": {"embedding": _rand(rng, (50, 32))},
      "block": {
          "attn": {"query": {"kernel": _rand(rng, (32, 4, 8)), "bias": _rand(rng, (4, 8))},
                   "out": {"kernel": _rand(rng, (4, 8, 32))}},
          "mlp": {"kernel": _rand(rng, (32, 96))},
          "norm": {"scale": _rand(rng, (32,))},
      },
      "lm_head": {"kernel": _rand(rng, (32, 50))},
  }


def optax_dims(params):
  def f(path, x):
    p = path_str(path)
    if mc.default_label(p, x.ndim) != "muon":
      return None
    return mc.default_dimension_numbers(p, x.shape)
  return jax.tree_util.tree_map_with_path(f, params)


def test_matches_optax_contrib_muon_step_for_step():
  """Tolerance: |params - optax params| <= 2e-6 after 6 steps (f32, lr 0.02)."""
  rng = np.random.default_rng(0)
  params = mixed_tree(rng)
  ours = mc.muon(0.02, weight_decay=0.1, nesterov=False)
  ref = optax.contrib.muon(0.02, weight_decay=0.1, nesterov=False, consistent_rms=0.2,
                           adam_b2=0.95, adam_weight_decay=0.1,
                           muon_weight_dimension_numbers=optax_dims)
  so, sr = ours.init(params), ref.init(params)
  po = pr = params
  uo_step, ur_step = jax.jit(ours.update), jax.jit(ref.update)
  for _ in range(6):
    g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
    uo, so = uo_step(g, so, po)
    ur, sr = ur_step(g, sr, pr)
    po, pr = optax.apply_updates(po, uo), optax.apply_updates(pr, ur)
  chex.assert_trees_all_close(po, pr, atol=2e-6, rtol=0)
  # And it did move: the parameters are far from where they started.
  assert float(jnp.max(jnp.abs(po["block"]["mlp"]["kernel"] - params["block"]["mlp"]["kernel"]))
               ) > 0.05


def _np_newton_schulz(m, steps=5):
  a, b, c = KELLER
  x = m.T if m.shape[0] > m.shape[1] else m
  x = x / (np.linalg.norm(x) + 1e-7)
  for _ in range(steps):
    r = x @ x.T
    x = a * x + (b * r + c * r @ r) @ x
  return x.T if m.shape[0] > m.shape[1] else x


def test_matches_published_algorithm_with_nesterov():
  """K2 Algorithm 1 written out in NumPy (float64): momentum, Nesterov, NS, 0.2 sqrt(max),
  decoupled decay. Tolerance 1e-5 after 4 steps."""
  rng = np.random.default_rng(1)
  shapes = {"w1": (24, 64), "w2": (64, 24), "w3": (40, 40)}
  params = {k: _rand(rng, s) for k, s in shapes.items()}
  lr, wd, mu_ = 0.05, 0.1, 0.95
  tx = mc.muon(lr, weight_decay=wd)
  state = tx.init(params)
  p_np = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m_np = {k: np.zeros(s) for k, s in shapes.items()}
  p = params
  step = jax.jit(tx.update)  # one compilation for the four steps
  for _ in range(4):
    g = {k: _rand(rng, s) for k, s in shapes.items()}
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
    for k in shapes:
      gk = np.asarray(g[k], np.float64)
      m_np[k] = mu_ * m_np[k] + gk
      o = _np_newton_schulz(gk + mu_ * m_np[k]) * 0.2 * np.sqrt(max(shapes[k]))
      p_np[k] = p_np[k] - lr * (o + wd * p_np[k])
  for k in shapes:
    np.testing.assert_allclose(np.asarray(p[k]), p_np[k], atol=1e-5)


@pytest.mark.parametrize("scaling, expected", [
    ("rms", lambda fi, fo: 0.2 * np.sqrt(max(fi, fo))),
    ("keller", lambda fi, fo: np.sqrt(max(1, fo / fi))),
    (None, lambda fi, fo: 1.0),
])
def test_shape_scaling(scaling, expected):
  rng = np.random.default_rng(2)
  g = {"w": _rand(rng, (16, 48)), "v": _rand(rng, (48, 16))}
  tx = mc.scale_by_muon(shape_scaling=scaling)
  u, _ = tx.update(g, tx.init(g))
  for k, (fi, fo) in {"w": (16, 48), "v": (48, 16)}.items():
    ref = mc.orthogonalize(g[k] * 1.95) * expected(fi, fo)  # Nesterov: g + 0.95 g at step 1
    chex.assert_trees_all_close(u[k], ref, atol=1e-5)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln_1")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h)
    x = x + h
    h = nn.RMSNorm(name="norm_2")(x)
    h = nn.Dense(64, name="fc")(h)
    return x + nn.Dense(16, name="proj")(nn.gelu(h)), None


class ScannedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(100, 16, name="embed")(tokens)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="layers")(x, None)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(100, name="lm_head")(x)


def test_routing_of_a_flax_tree_lands_where_documented():
  # Jitted, the init compiles as one program (eager: one compile per initialiser); same values.
  params = jax.jit(ScannedLM().init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  flat = {path_str(p): (lab, leaf.shape) for (p, lab), leaf in zip(
      jax.tree_util.tree_flatten_with_path(mc.default_param_labels(params))[0],
      jax.tree.leaves(params))}
  for path, (label, shape) in flat.items():
    is_matrix = path.endswith("kernel") and "lm_head" not in path
    assert label == ("muon" if is_matrix else "adamw"), (path, label, shape)
  assert flat["embed/embedding"][0] == "adamw"
  assert flat["lm_head/kernel"][0] == "adamw"
  assert flat["layers/ln_1/scale"][0] == "adamw"
  assert flat["layers/attn/query/bias"][0] == "adamw"
  # Scanned DenseGeneral query kernel (layers, embed, heads, head_dim): the layer axis is a
  # batch axis, embed is fan-in, heads x head_dim fan-out; the output kernel the reverse.
  q = mc.default_dimension_numbers("layers/attn/query/kernel", flat["layers/attn/query/kernel"][1])
  assert q == MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3))
  o = mc.default_dimension_numbers("layers/attn/out/kernel", flat["layers/attn/out/kernel"][1])
  assert o == MuonDimensionNumbers(reduction_axis=(1, 2), output_axis=3)
  fc = mc.default_dimension_numbers("layers/fc/kernel", flat["layers/fc/kernel"][1])
  assert fc == MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  conv = mc.default_dimension_numbers("conv1/kernel", (3, 3, 8, 16))
  assert conv == MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
  # The whole optimizer runs on it, and every scanned layer is orthogonalised separately.
  tx = mc.muon(1e-2)
  grads = jax.tree.map(jnp.ones_like, params)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_shapes(u, params)
  fc_w, fc_u = params["layers"]["fc"]["kernel"], u["layers"]["fc"]["kernel"]
  for i in range(3):  # Step 1, Nesterov: the direction is 1.95 g.
    o = mc.orthogonalize(1.95 * grads["layers"]["fc"]["kernel"][i]) * 0.2 * np.sqrt(64)
    chex.assert_trees_all_close(fc_u[i], -1e-2 * (o + 0.1 * fc_w[i]), atol=1e-6)


def test_scanned_stack_equals_per_layer():
  rng = np.random.default_rng(3)
  stack = _rand(rng, (3, 24, 40))
  tx = mc.scale_by_muon()
  u_stack, _ = tx.update({"h": {"kernel": stack}}, tx.init({"h": {"kernel": stack}}))
  for i in range(3):
    g = {"w": stack[i]}
    ui, _ = tx.update(g, tx.init(g))
    chex.assert_trees_all_close(u_stack["h"]["kernel"][i], ui["w"], atol=1e-6)


def test_label_tree_and_callable_override():
  rng = np.random.default_rng(4)
  params = {"embed": {"embedding": _rand(rng, (20, 8))}, "w": _rand(rng, (8, 8))}
  labels = {"embed": {"embedding": "muon"}, "w": "adamw"}
  g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
  for override in (labels, lambda p: labels):
    tx = mc.muon(0.1, weight_decay=0.0, param_labels=override)
    u, _ = tx.update(g, tx.init(params), params)
    muon_only = mc.muon(0.1, weight_decay=0.0, param_labels={"embed": {"embedding": "muon"},
                                                             "w": "muon"})
    um, _ = muon_only.update(g, muon_only.init(params), params)
    chex.assert_trees_all_close(u["embed"], um["embed"], atol=1e-7)
    adam = optax.adamw(0.1, b1=0.9, b2=0.95, weight_decay=0.0)
    ua, _ = adam.update(g, adam.init(params), params)
    chex.assert_trees_all_close(u["w"], ua["w"], atol=1e-7)


def test_dimension_numbers_tree_override():
  rng = np.random.default_rng(5)
  params = {"q": {"kernel": _rand(rng, (3, 16, 24))}}  # a scanned stack of 2-D kernels
  dims = {"q": {"kernel": MuonDimensionNumbers(reduction_axis=1, output_axis=2)}}
  tx = mc.scale_by_muon(dimension_numbers=dims)
  u, _ = tx.update(params, tx.init(params))
  for i in range(3):
    g = {"w": params["q"]["kernel"][i]}
    ui, _ = mc.scale_by_muon().update(g, mc.scale_by_muon().init(g))
    chex.assert_trees_all_close(u["q"]["kernel"][i], ui["w"], atol=1e-6)


def test_inject_hyperparams_schedules_and_arrays():
  rng = np.random.default_rng(6)
  params = mixed_tree(rng)
  g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
  sched = optax.linear_schedule(0.0, 0.1, 10)
  tx = optax.inject_hyperparams(mc.muon)(learning_rate=sched, weight_decay=jnp.asarray(0.05))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    u, state = step(g, state, params)
    fixed = mc.muon(float(sched(t)), weight_decay=0.05)
    fs = fixed.init(params)
    for _ in range(t + 1):
      uf, fs = fixed.update(g, fs, params)
    chex.assert_trees_all_close(u, uf, atol=1e-6)
  assert step._cache_size() == 1


def test_newton_schulz_object_equals_the_keywords_and_survives_inject_hyperparams():
  rng = np.random.default_rng(10)
  params = mixed_tree(rng)
  g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
  ns = mc.NewtonSchulz(coeffs="polar_express", steps=6, method="gram", restarts=(3,))
  keywords = mc.muonclip(0.01, coeffs="polar_express", steps=6, method="gram", restarts=(3,),
                         allow_no_attention=True)
  by_object = mc.muonclip(0.01, newton_schulz=ns, allow_no_attention=True)
  want, _ = keywords.update(g, keywords.init(params), params, max_logits={})
  got, _ = by_object.update(g, by_object.init(params), params, max_logits={})
  chex.assert_trees_all_equal(got, want)
  default, _ = mc.muon(0.01).update(g, mc.muon(0.01).init(params), params)
  assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, got, default)))
  # The object is static; learning rate and weight decay stay hyperparameters.
  tx = optax.inject_hyperparams(mc.muon)(learning_rate=0.01, weight_decay=0.1, newton_schulz=ns)
  state = tx.init(params)
  assert {"learning_rate", "weight_decay", "beta"} <= set(state.hyperparams)
  assert "newton_schulz" not in state.hyperparams
  u, _ = jax.jit(tx.update)(g, state, params)
  ref, _ = mc.muon(0.01, newton_schulz=ns).update(g, mc.muon(0.01).init(params), params)
  chex.assert_trees_all_close(u, ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(newton_schulz=mc.NewtonSchulz(steps=4), steps=6), "steps is set both"),
    (dict(newton_schulz=mc.NewtonSchulz(coeffs="dion"), coeffs="aol"), "coeffs is set both"),
    (dict(newton_schulz=mc.NewtonSchulz(method="gram"), method="standard"), "method is set"),
    (dict(newton_schulz=mc.NewtonSchulz(method="fast")), "method"),
])
def test_newton_schulz_object_refuses_conflicts_and_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mc.muon(0.01, **kwargs)
  with pytest.raises(TypeError, match="expected a muonclip_jax.NewtonSchulz"):
    mc.scale_by_muon(newton_schulz={"steps": 4})


def test_works_in_optax_combinators():
  rng = np.random.default_rng(7)
  params = mixed_tree(rng)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.apply_if_finite(mc.muon(0.01), 3))
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  for _ in range(4):
    g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
    u, state = step(g, state, p)
    p = optax.apply_updates(p, u)
  nan_g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  u, state = step(nan_g, state, p)
  u, state = step(nan_g, state, p)
  chex.assert_tree_all_finite(optax.apply_updates(p, u))
  assert step._cache_size() == 1


def test_mu_dtype_and_param_dtype():
  rng = np.random.default_rng(8)
  params = {"w": _rand(rng, (16, 32)).astype(jnp.bfloat16)}
  tx = mc.scale_by_muon(mu_dtype=jnp.float32, ns_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert state.mu["w"].dtype == jnp.float32
  u, state = tx.update(params, state)
  assert u["w"].dtype == jnp.bfloat16 and state.mu["w"].dtype == jnp.float32


class JitVariants(chex.TestCase):

  TX = mc.muon(0.01)  # Shared by both variants: the jitted reference compiles once.

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_jit_and_no_jit_agree(self):
    rng = np.random.default_rng(9)
    params = mixed_tree(rng)
    g = jax.tree.map(lambda x: _rand(rng, x.shape), params)
    tx = self.TX
    u, _ = self.variant(tx.update)(g, tx.init(params), params)
    ref, _ = jax.jit(tx.update)(g, tx.init(params), params)
    chex.assert_trees_all_close(u, ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(coeffs="fastest"), "unknown Newton–Schulz preset"),
    (dict(steps=0), "steps"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(shape_scaling="spectral"), "shape_scaling"),
])
def test_bad_construction_arguments(kwargs, match):
  args = dict(learning_rate=0.01) | kwargs
  with pytest.raises(ValueError, match=match):
    mc.muon(**args)


def test_rank_one_leaf_forced_to_muon_names_path():
  params = {"blk": {"norm": {"scale": jnp.ones(8)}, "w": jnp.ones((8, 8))}}
  tx = mc.muon(0.1, param_labels={"blk": {"norm": {"scale": "muon"}, "w": "muon"}})
  with pytest.raises(ValueError, match=r"blk/norm/scale.*rank < 2"):
    tx.init(params)
  with pytest.raises(ValueError, match=r"blk/norm/scale"):
    mc.scale_by_muon().init(params)


def test_bad_label_names_path():
  params = {"w": jnp.ones((8, 8))}
  with pytest.raises(ValueError, match=r"param_labels at w: expected 'muon' or 'adamw'"):
    mc.muon(0.1, param_labels={"w": "sgd"}).init(params)


@pytest.mark.parametrize("dims, match", [
    (MuonDimensionNumbers(reduction_axis=0, output_axis=3), r"layer/kernel: output.*out of range"),
    (MuonDimensionNumbers(reduction_axis=1, output_axis=1), r"layer/kernel: .*overlap"),
])
def test_dimension_numbers_that_do_not_fit_name_path(dims, match):
  params = {"layer": {"kernel": jnp.ones((4, 6, 8))}}
  tx = mc.scale_by_muon(dimension_numbers={"layer": {"kernel": dims}})
  with pytest.raises(ValueError, match=match):
    tx.init(params)


def test_weight_decay_mask_applies_to_both_branches():
  rng = np.random.default_rng(10)
  params = {"w": _rand(rng, (8, 16)), "v": _rand(rng, (8, 16)), "b": _rand(rng, (16,)),
            "c": _rand(rng, (16,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  mask = {"w": True, "v": False, "b": True, "c": False}
  tx = mc.muon(0.5, weight_decay=0.1, weight_decay_mask=mask)
  u, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: only decay moves
  chex.assert_trees_all_close(u["w"], -0.5 * 0.1 * params["w"], atol=1e-7)
  chex.assert_trees_all_close(u["b"], -0.5 * 0.1 * params["b"], atol=1e-7)
  chex.assert_trees_all_equal(u["v"], jnp.zeros_like(params["v"]))
  chex.assert_trees_all_equal(u["c"], jnp.zeros_like(params["c"]))


def test_nnx_variables_route_like_plain_arrays():
  """nnx.Optimizer.init passes nnx.Param variables (paths end in '.value'); update passes
  arrays. Both must get the same labels, or optax.partition's states do not line up."""
  from flax import nnx

  attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
  wrapped = nnx.state(attn, nnx.Param)
  plain = nnx.to_pure_dict(wrapped)
  assert jax.tree.leaves(mc.default_param_labels(wrapped)) == jax.tree.leaves(
      mc.default_param_labels(plain))
  assert mc.default_param_labels(plain)["query"]["bias"] == "adamw"
  opt = nnx.Optimizer(attn, mc.muon(1e-2), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(attn, nnx.Param))
  opt.update(attn, grads)
