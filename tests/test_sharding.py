"""Muon and QK-Clip on a device mesh (8 host CPU devices, set in conftest.py).

Equality with the single-device update, output shardings, and the compiled
per-device program: FLOPs against the ideal 1/8, collective bytes against the
momentum's, no collective per Newton–Schulz step, one compilation.

Tolerance of the update against the single-device one: ``|delta| <= 2e-5``
absolute (f32; the updates have RMS 0.2, so about 1e-4 of it): the same
Newton–Schulz runs on the same matrices, but XLA compiles the batched products
of a different batch size (and transposes tall matrices into wide ones), so
sums round in a different order. The momentum, elementwise, is bitwise equal.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from support.arrays import rand as _rand

import muonclip_jax as mc
from benchmarks.hlo import collective_stats, compiled_flops
from muonclip_jax._coefficients import resolve_coefficients
from muonclip_jax._dimensions import default_dimension_numbers
from muonclip_jax._mesh_placement import ns_flops as _ns_flops
from muonclip_jax._mesh_plan import muon_sharding_summary
from muonclip_jax._muon import leaf_matrices
from muonclip_jax._newton_schulz import LocalOrthogonalizer, NSOptions, Orthogonalizer
from muonclip_jax._sharding import mesh_orthogonalizer

ATOL = 2e-5
NS = NSOptions(resolve_coefficients("keller"), None, "auto", None, 1e-7)


def mesh8(auto=False):
  types = (AxisType.Auto,) if auto else (AxisType.Explicit,)
  return jax.make_mesh((8,), ("fsdp",), axis_types=types)


def mesh24(auto=False):
  types = (AxisType.Auto,) * 2 if auto else (AxisType.Explicit,) * 2
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=types)


def tree(leaves):
  """``{name: (shape, spec)}`` -> (unsharded params, specs)."""
  rng = np.random.default_rng(0)
  params = {k: _rand(rng, s) for k, (s, _) in leaves.items()}
  return params, {k: sp for k, (_, sp) in leaves.items()}


def attention_tree(layers):
  out = {}
  for i in range(layers):
    for name in ("query", "key", "value"):
      out[f"h{i}/attn/{name}/kernel"] = ((64, 4, 16), P(None, "model", None))
    out[f"h{i}/attn/out/kernel"] = ((4, 16, 64), P("model", None, None))
  return out


def nest(flat):
  """``{'a/b/c': x}`` -> nested dicts (so the default dimension numbers see the path)."""
  out = {}
  for k, v in flat.items():
    *head, last = k.split("/")
    d = out
    for h in head:
      d = d.setdefault(h, {})
    d[last] = v
  return out


# name: (mesh factory, {leaf: (shape, spec)}, divisible)
CASES = {
    "fsdp_rows_8": (mesh8, {f"w{i}": ((64, 256), P("fsdp", None)) for i in range(8)}, True),
    "fsdp_rows_12": (mesh8, {f"w{i}": ((64, 256), P("fsdp", None)) for i in range(12)}, False),
    "fsdp_cols_8": (mesh8, {**{f"w{i}": ((64, 256), P(None, "fsdp")) for i in range(4)},
                            **{f"t{i}": ((256, 64), P("fsdp", None)) for i in range(4)}}, True),
    "fsdp_cols_6": (mesh8, {f"w{i}": ((64, 256), P(None, "fsdp")) for i in range(6)}, False),
    "tp_8": (mesh24, {f"w{i}": ((64, 256), P(None, "model")) for i in range(8)}, True),
    "tp_attention_16": (mesh24, attention_tree(4), True),
    "tp_attention_12": (mesh24, attention_tree(3), False),
    "stacked_16": (mesh8, {"layers/mlp": ((16, 64, 256), P("fsdp", None, None))}, True),
    "stacked_12_model": (mesh24, {"layers/mlp": ((12, 64, 256), P("model", None, None))}, False),
    "fsdp_rows_8_and_a_lone_one": (mesh8, {**{f"a{i}": ((64, 256), P("fsdp", None))
                                              for i in range(8)},
                                           "b": ((64, 128), P("fsdp", None))}, False),
    # Batch-sharded leaves of one shape join one operand on each device.
    "experts_3": (mesh24, {f"l{i}/moe/wi": ((4, 64, 256), P("model", "data", None))
                           for i in range(3)}, False),
    # ... and give fewer matrices to the devices that got the large pooled ones.
    "experts_levelled": (mesh24, {**{f"l{i}/moe/wi": ((4, 64, 256), P("model", "data", None))
                                     for i in range(4)},
                                  **{f"big{i}": ((256, 512), P("data", None)) for i in range(2)}},
                         False),
    "mixed_5_3": (mesh8, {**{f"a{i}": ((64, 256), P("fsdp", None)) for i in range(5)},
                          **{f"b{i}": ((64, 128), P("fsdp", None)) for i in range(3)}}, False),
}


def _setup(case, auto=False):
  make_mesh, leaves, divisible = CASES[case]
  mesh = make_mesh(auto)
  params, specs = tree(leaves)
  params, specs = nest(params), nest(specs)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  grads = jax.tree.map(lambda x: x * 0.5 + 0.1, sharded)
  return mesh, params, sharded, grads, divisible


def _pad_factor(params, n):
  """Busiest device over ideal if every shape's count were padded to a multiple of n."""
  counts, flops = {}, {}
  for leaf in leaf_matrices(params, default_dimension_numbers):
    b, fi, fo = leaf.matrix_shape
    r, c = min(fi, fo), max(fi, fo)
    counts[(r, c)] = counts.get((r, c), 0) + b
    flops[(r, c)] = _ns_flops(r, c, NS)
  padded = sum(-(-k // n) * flops[s] for s, k in counts.items())
  ideal = sum(k * flops[s] for s, k in counts.items()) / n
  return padded / ideal


def _same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mesh_update_equals_single_device_and_meets_hlo_budgets(case):
  mesh, params, sharded, grads, divisible = _setup(case)
  n = mesh.devices.size
  ref_tx = mc.scale_by_muon()
  ref_state = ref_tx.init(params)
  ref_grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
  ref_step = jax.jit(ref_tx.update)
  ref_u, ref_s = ref_step(ref_grads, ref_state, params)

  tx = mc.scale_by_muon(mesh=mesh)
  state = tx.init(sharded)
  step = jax.jit(tx.update)
  u, s = step(grads, state, sharded)
  u2, s2 = step(grads, s, sharded)  # a second step: same compiled program
  assert step._cache_size() == 1
  ref_u2, ref_s2 = ref_step(ref_grads, ref_s, params)

  for got, want in ((u, ref_u), (u2, ref_u2)):
    chex.assert_trees_all_close(got, want, atol=ATOL, rtol=0)
  chex.assert_trees_all_equal(s2.mu, ref_s2.mu)
  for x, p in zip(jax.tree.leaves((u, s.mu)), jax.tree.leaves((sharded, sharded))):
    assert _same_sharding(x, p), (x.sharding, p.sharding)

  # The compiled per-device program.
  compiled = step.lower(grads, state, sharded).compile()
  single = ref_step.lower(ref_grads, ref_state, params).compile()
  ratio = compiled_flops(compiled) / (compiled_flops(single) / n)
  pad = 1.0 if divisible else _pad_factor(params, n)
  assert ratio <= 1.1 * pad, (ratio, pad)
  stats = collective_stats(compiled.as_text())
  mom_global = sum(x.nbytes for x in jax.tree.leaves(params))
  mom_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.mu))
  # Per device, collective results against the device's own momentum shard
  # (the strict reading) and against the whole momentum (the reading).
  assert stats.total_bytes <= 2.5 * pad * mom_device, (stats, mom_device)
  assert stats.total_bytes <= 2.5 * mom_global
  if divisible:
    assert stats.counts["all-gather"] <= 1 and stats.counts["collective-permute"] == 0, stats

  # The plan, from shapes alone, is what XLA compiled: the same collectives and
  # bytes, and the Newton–Schulz FLOPs (cost analysis counts each operand's
  # heaviest switch branch, plus elementwise work the plan leaves out).
  plan = mc.plan_muon_sharding(sharded, mesh, param_labels=jax.tree.map(lambda _: "muon", params))
  assert plan.collective_counts == {k: v for k, v in stats.counts.items() if v}
  assert plan.collective_bytes == {k: v for k, v in stats.bytes.items() if v}
  mp = plan.mesh_plan
  heaviest = sum(max(b) * a.flops for a, b in zip(mp.arrays, mp.branches, strict=True))
  hlo = compiled_flops(compiled)
  assert 0.95 * hlo <= heaviest <= hlo, (heaviest, hlo)
  assert plan.busiest_flops <= heaviest


# Fewer unsharded matrices than devices: spread over one axis and repeated over
# the other (a: over model, b: over data), or computed on every device (c).
REPEATED = {**{f"a{i}": ((256, 256), P()) for i in range(3)},
            **{f"b{i}": ((192, 192), P()) for i in range(2)},
            **{f"c{i}": ((64, 256), P()) for i in range(3)}}


def test_repeated_operands_compile_as_planned_and_equal_single_device():
  mesh = mesh24()
  params, specs = tree(REPEATED)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  grads = jax.tree.map(lambda x: x * 0.5 + 0.1, sharded)
  tx, ref_tx = mc.scale_by_muon(mesh=mesh), mc.scale_by_muon()
  state = tx.init(sharded)
  step = jax.jit(tx.update)
  u, _ = step(grads, state, sharded)
  ref_u, _ = jax.jit(ref_tx.update)(jax.tree.map(lambda x: x * 0.5 + 0.1, params),
                                    ref_tx.init(params), params)
  chex.assert_trees_all_close(u, ref_u, atol=ATOL, rtol=0)
  plan = mc.plan_muon_sharding(sharded, mesh, param_labels={k: "muon" for k in params})
  assert sorted(a.redundant for a in plan.mesh_plan.arrays) == [
      ("data",), ("data", "model"), ("model",)]
  stats = collective_stats(step.lower(grads, state, sharded).compile().as_text())
  assert plan.collective_counts == {k: v for k, v in stats.counts.items() if v}
  assert plan.collective_bytes == {k: v for k, v in stats.bytes.items() if v}
  assert plan.moved_bytes <= 2 * sum(x.nbytes for x in jax.tree.leaves(params))


def test_stacked_layer_axis_on_the_mesh_needs_no_collective():
  mesh, _, sharded, grads, _ = _setup("stacked_16")
  tx = mc.scale_by_muon(mesh=mesh)
  compiled = jax.jit(tx.update).lower(grads, tx.init(sharded), sharded).compile()
  assert collective_stats(compiled.as_text()).total_count == 0


@pytest.mark.parametrize("case", ["fsdp_rows_8", "tp_attention_12"])
def test_no_collective_per_newton_schulz_step(case):
  """Collectives do not grow with the number of Newton–Schulz steps."""
  mesh, _, sharded, grads, _ = _setup(case)
  found = []
  for steps in (2, 7):
    tx = mc.scale_by_muon(mesh=mesh, steps=steps)
    compiled = jax.jit(tx.update).lower(grads, tx.init(sharded), sharded).compile()
    found.append(collective_stats(compiled.as_text()))
  assert found[0] == found[1]
  assert found[0].total_count > 0


@pytest.mark.parametrize("case", ["fsdp_cols_8", "tp_attention_12"])
def test_auto_axis_mesh(case):
  """``AxisType.Auto`` meshes: init records the shardings; outputs take them."""
  mesh, params, sharded, grads, _ = _setup(case, auto=True)
  tx = mc.scale_by_muon(mesh=mesh)
  state = tx.init(sharded)
  u, s = jax.jit(tx.update)(grads, state, sharded)
  ref_tx = mc.scale_by_muon()
  ref_u, _ = jax.jit(ref_tx.update)(jax.tree.map(lambda x: x * 0.5 + 0.1, params),
                                    ref_tx.init(params), params)
  chex.assert_trees_all_close(u, ref_u, atol=ATOL, rtol=0)
  for x, p in zip(jax.tree.leaves((u, s.mu)), jax.tree.leaves((sharded, sharded))):
    assert _same_sharding(x, p)
  # init traced under jit records nothing: still correct, shardings left to XLA.
  tx2 = mc.scale_by_muon(mesh=mesh)
  u2, _ = jax.jit(tx2.update)(grads, jax.jit(tx2.init)(sharded), sharded)
  chex.assert_trees_all_close(u2, ref_u, atol=ATOL, rtol=0)


def test_muon_optimizer_on_mesh_matches_single_device():
  """muon(): Muon branch on the mesh, AdamW branch elementwise; three steps."""
  mesh = mesh24()
  rng = np.random.default_rng(3)
  layer = lambda: {"mlp": {"kernel": _rand(rng, (64, 256))},
                   "proj": {"kernel": _rand(rng, (256, 64))},
                   "norm": {"scale": _rand(rng, (64,))}}
  params = {"embed": {"embedding": _rand(rng, (96, 64))}, "h0": layer(), "h1": layer()}
  spec = lambda x: P("data", "model") if x.ndim == 2 else P("model")
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
  ref, ours = mc.muon(0.02), mc.muon(0.02, mesh=mesh)
  rs = ref.init(params)
  with jax.set_mesh(mesh):  # The state's scalars (AdamW's count) on the mesh too.
    os_ = jax.jit(ours.init)(sharded)
  rstep, ostep = jax.jit(ref.update), jax.jit(ours.update)
  rp, op = params, sharded
  for t in range(3):
    g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), params)
    gs = jax.tree.map(lambda x, p: jax.device_put(x, p.sharding), g, sharded)
    ru, rs = rstep(g, rs, rp)
    ou, os_ = ostep(gs, os_, op)
    rp, op = optax.apply_updates(rp, ru), optax.apply_updates(op, ou)
  assert ostep._cache_size() == 1
  chex.assert_trees_all_close(op, rp, atol=3 * 0.02 * ATOL, rtol=0)
  for x, p in zip(jax.tree.leaves(op), jax.tree.leaves(sharded)):
    assert _same_sharding(x, p)


# -- QK-Clip on a mesh -----------------------------------------------------------------


def _attention_params(rng, e=64, h=8, d=16):
  return {"attn": {"query": {"kernel": _rand(rng, (e, h, d)), "bias": _rand(rng, (h, d))},
                   "key": {"kernel": _rand(rng, (e, h, d)), "bias": _rand(rng, (h, d))},
                   "value": {"kernel": _rand(rng, (e, h, d)), "bias": _rand(rng, (h, d))},
                   "out": {"kernel": _rand(rng, (h, d, e)), "bias": _rand(rng, (e,))}}}


QK_SPECS = {"attn": {k: {"kernel": P("data", "model", None), "bias": P("model", None)}
                     for k in ("query", "key", "value")}}
QK_SPECS["attn"]["out"] = {"kernel": P("model", None, "data"), "bias": P()}


@pytest.mark.parametrize("auto", [False, True])
def test_qk_clip_scales_weights_in_their_own_sharding(auto):
  """Bitwise the single-device update; no gather of weights (only a tiny all-reduce)."""
  mesh = mesh24(auto)
  rng = np.random.default_rng(4)
  params = _attention_params(rng)
  updates = jax.tree.map(lambda x: 0.01 * jnp.cos(x), params)
  stats = {"attn": {"max_logits": jnp.asarray([50., 150, 90, 300, 10, 101, 99, 500])}}
  put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t,
                               QK_SPECS)
  tx = mc.qk_clip(100.0)
  ref, _ = jax.jit(tx.update)(updates, tx.init(params), params, max_logits=stats)
  sp, su = put(params), put(updates)
  step = jax.jit(tx.update)
  state = tx.init(sp)
  out, new_state = step(su, state, sp, max_logits=stats)
  chex.assert_trees_all_equal(out, ref)
  assert int(new_state.num_clipped) == 4
  for x, p in zip(jax.tree.leaves(out), jax.tree.leaves(sp)):
    assert _same_sharding(x, p)
  text = step.lower(su, state, sp, max_logits=stats).compile().as_text()
  cs = collective_stats(text)
  for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert cs.counts[op] == 0, cs
  assert cs.bytes["all-reduce"] <= 64, cs  # counters at most, never a weight


def test_max_logits_statistic_is_a_global_max_over_data_shards():
  """Under jit, the per-head max of batch-sharded logits is an all-reduce *max*."""
  mesh = mesh24()
  rng = np.random.default_rng(5)
  logits = _rand(rng, (8, 4, 16, 16)) * 10  # (batch, heads, q, k)
  sharded = jax.device_put(logits, NamedSharding(mesh, P("data", "model")))
  f = jax.jit(mc.head_max_logits)
  got = f(sharded)
  np.testing.assert_array_equal(np.asarray(got), np.max(np.asarray(logits), axis=(0, 2, 3)))
  text = f.lower(sharded).compile().as_text()
  reduces = [line for line in text.splitlines() if " all-reduce(" in line]
  assert reduces, "expected a cross-shard reduction"
  for line in reduces:
    comp = line.split("to_apply=")[1].split(",")[0].strip()
    body = text[text.index("\n" + comp + " "):]
    body = body[:body.index("\n}")]
    assert " maximum(" in body and " add(" not in body, body


def test_muonclip_on_mesh_matches_single_device():
  mesh = mesh24()
  rng = np.random.default_rng(6)
  params = _attention_params(rng)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                         QK_SPECS)
  stats = {"attn": {"max_logits": jnp.asarray([50., 150, 90, 300, 10, 101, 99, 500])}}
  ref, ours = mc.muonclip(0.02, tau=100.0), mc.muonclip(0.02, tau=100.0, mesh=mesh)
  g = jax.tree.map(jnp.sin, params)
  gs = jax.tree.map(lambda x, p: jax.device_put(x, p.sharding), g, sharded)
  ru, _ = jax.jit(ref.update)(g, ref.init(params), params, max_logits=stats)
  ou, _ = jax.jit(ours.update)(gs, ours.init(sharded), sharded, max_logits=stats)
  chex.assert_trees_all_close(ou, ru, atol=0.02 * ATOL, rtol=0)
  for x, p in zip(jax.tree.leaves(ou), jax.tree.leaves(sharded)):
    assert _same_sharding(x, p)


# -- The summary and abstract planning against real shardings (no compilation) ---------
# (Planning from shapes alone: tests/test_mesh_plan.py.)


def test_summary_lists_every_leaf():
  mesh = mesh24()
  flat = {**attention_tree(1), "h0/ln/scale": ((64,), P()),
          "layers/mlp": ((12, 64, 256), P("model", None, None))}
  params = nest({k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, sp))
                 for k, (s, sp) in flat.items()})
  text = muon_sharding_summary(params, mesh)
  for k in flat:
    assert k in text
  assert "AdamW" in text and "all-to-all cols<->batch over model" in text
  # A lone matrix that the busiest device would compute anyway: computed everywhere.
  flat = {**{f"w{i}": ((64, 256), P(None, "model")) for i in range(8)},
          "lone": ((64, 96), P("data", None))}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, sp))
            for k, (s, sp) in flat.items()}
  text = muon_sharding_summary(params, mesh, param_labels=lambda p: {k: "muon" for k in p})
  assert "all-gather over data; computed on every device" in text, text
  assert "busiest device" in text


def test_plan_from_abstract_shapes_equals_plan_from_arrays():
  """No devices needed: ShapeDtypeStructs on an AbstractMesh, or axis sizes."""
  mesh, params, sharded, _, _ = _setup("experts_levelled")
  labels = jax.tree.map(lambda _: "muon", params)
  concrete = mc.plan_muon_sharding(sharded, mesh, param_labels=labels)
  abstract = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(abstract, x.sharding.spec)), sharded)
  for m in (abstract, {"data": 2, "model": 4}):
    plan = mc.plan_muon_sharding(shapes, m, param_labels=labels)
    assert plan.mesh_plan == concrete.mesh_plan and plan.leaves == concrete.leaves
    assert str(plan) == str(concrete)
  counts = {a.counts for a in concrete.mesh_plan.arrays if a.cells is None}
  assert any(len(set(c)) > 1 for c in counts), counts  # this case is levelled
  with pytest.raises(ValueError, match="not on the planned mesh"):
    mc.plan_muon_sharding(shapes, {"data": 4, "model": 2}, param_labels=labels)
  with pytest.raises(TypeError, match="mesh: expected"):
    mc.plan_muon_sharding(shapes, [2, 4], param_labels=labels)


def test_orthogonalizer_without_specs_is_correct():
  """Called directly (no wrapper, shardings unknown): gathered, still exact in value."""
  mesh = mesh24()
  rng = np.random.default_rng(7)
  mats = [_rand(rng, (3, 32, 64)), _rand(rng, (5, 64, 32)), _rand(rng, (1, 48, 48))]
  orth = mesh_orthogonalizer(mesh)
  got = jax.jit(lambda ms: orth(ms, NS))(mats)
  want = jax.jit(lambda ms: LocalOrthogonalizer()(ms, NS))(mats)  # one compile, not per op
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)


def test_both_orthogonalizers_satisfy_the_declared_protocol():
  assert isinstance(LocalOrthogonalizer(), Orthogonalizer)
  assert isinstance(mesh_orthogonalizer(mesh24()), Orthogonalizer)
  assert not isinstance(object(), Orthogonalizer)
