"""The mesh plan from shapes alone: placement, view shardings, cost, and the report.

Covers :mod:`muonclip_jax._mesh_placement`, :mod:`muonclip_jax._view_sharding`,
:mod:`muonclip_jax._mesh_cost` and :mod:`muonclip_jax._mesh_plan` without devices
or compilation (``AbstractMesh`` or axis sizes); that the compiled program
matches the plan is checked in ``tests/test_sharding.py``.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonclip_jax as mc
from muonclip_jax._coefficients import resolve_coefficients
from muonclip_jax._mesh_placement import plan_mesh
from muonclip_jax._newton_schulz import NSOptions
from muonclip_jax._view_sharding import view_spec

NS = NSOptions(resolve_coefficients("keller"), None, "auto", None, 1e-7)


@given(counts=st.lists(st.integers(1, 20), min_size=1, max_size=4),
       axes=st.sampled_from([{"x": 8}, {"a": 2, "b": 4}, {"a": 2, "b": 2}]))
def test_plan_places_every_matrix_once_within_bounds(counts, axes):
  shapes = [(c, 16 + 16 * i, 64) for i, c in enumerate(counts)]
  plan = plan_mesh(shapes, [jnp.float32] * len(shapes), None, axes, NS)
  n = math.prod(axes.values())
  seen = []
  spread_bound = 0  # FLOPs of the spread operands, each padded to a multiple of n
  for a in plan.arrays:
    if a.replicated:  # one matrix, computed by every device
      assert len(a.cells) == 1 and a.counts == (1,) * n
      seen.append((a.members[a.cells[0][0]], a.cells[0][1]))
      spread_bound += a.flops
      continue
    # Repeated over a.redundant: a position per device of the other axes.
    positions = n // math.prod(axes[x] for x in a.redundant)
    assert len(a.cells) == a.slots * positions
    for t in range(n):
      u = t % positions
      block = a.cells[u * a.slots:(u + 1) * a.slots]
      real = [c for c in block if c is not None]
      assert len(real) == a.counts[t] and block[:len(real)] == tuple(real)  # pads last
    seen += [(a.members[j], k) for j, k in (c for c in a.cells if c is not None)]
    spread_bound += -(-a.count // positions) * a.flops
    # Repeating is chosen only when spreading over every device would gather
    # more than twice the operand's bytes (here: fewer matrices than devices).
    if a.redundant:
      assert a.count < n and 2 * a.count * a.rows * a.cols * 4 < n * a.rows * a.cols * 4
  assert sorted(seen) == sorted((i, k) for i, s in enumerate(shapes) for k in range(s[0]))
  assert plan.total_flops / n <= plan.per_device_flops <= spread_bound
  if all(c % n == 0 for c in counts):
    assert plan.per_device_flops == plan.total_flops // n


@pytest.mark.parametrize("sizes", [{"x": 65536}, {"data": 256, "fsdp": 256},
                                   {"data": 64, "fsdp": 32, "tp": 32}])
def test_few_matrices_on_many_devices_move_at_most_twice_their_bytes(sizes):
  """65,536 devices, a handful of unsharded matrices: spread one per device, the
  gather back would move 65,536 x a matrix per device (64 GiB for these 4 MiB)."""
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  shapes = [(512, 512), (512, 512), (512, 1024), (256, 512), (1024, 1024)]
  params = {f"w{i}": jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, P()))
            for i, s in enumerate(shapes)}
  labels = {k: "muon" for k in params}
  plan = mc.plan_muon_sharding(params, mesh, param_labels=labels)
  total = sum(4 * r * c for r, c in shapes)
  assert plan.moved_bytes <= 2 * total, (plan.moved_bytes, total)
  placed = sorted((a.members[j], k) for a in plan.mesh_plan.arrays
                  for j, k in (c for c in a.cells if c is not None))
  assert placed == [(i, 0) for i in range(len(shapes))]
  # What spreading them one per device would have moved: 65,536 matrices' bytes.
  assert "computed on every device, nothing moved" in str(plan)


def test_as_many_matrices_as_devices_are_still_spread():
  params = {f"w{i}": jax.ShapeDtypeStruct((512, 512), jnp.float32) for i in range(16)}
  plan = mc.plan_muon_sharding(params, {"x": 8}, param_labels={k: "muon" for k in params})
  (a,) = plan.mesh_plan.arrays
  assert a.redundant == () and a.slots == 2 and plan.flops_ratio == 1.0


def test_view_spec():
  assert view_spec(P("fsdp", None), (64, 256), (), (0,), (1,)) == ((), ("fsdp",), ())
  # q kernel (embed, heads, head_dim), heads sharded: the merged fan-out keeps it.
  assert view_spec(P(None, "model"), (64, 4, 16), (), (0,), (1, 2)) == ((), (), ("model",))
  # head_dim sharded under unsharded heads is not a tiling of the merged axis.
  assert view_spec(P(None, None, "model"), (64, 4, 16), (), (0,), (1, 2)) is None
  assert view_spec(P("fsdp", None, ("a", "b")), (16, 64, 256), (0,), (1,), (2,)) == (
      ("fsdp",), (), ("a", "b"))


def test_plan_balances_a_pod_scale_moe_tree_in_seconds():
  """2,048 devices, 60 MoE layers: no straggler, every expert matrix placed once.

  No device does more than 2% over the lower bound: the ideal share, or the
  largest single matrix (here an 8192 x 7168 projection outweighs a device's
  share of the Gram-path experts), whichever is larger.
  """
  sizes = {"fsdp": 64, "expert": 32}
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  sds = lambda shape, *spec: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                                  sharding=NamedSharding(mesh, P(*spec)))
  params = {f"layer{i}": {"attn": {"o": sds((8192, 7168), "expert", "fsdp"),
                                   "q": sds((1536, 12288), "fsdp", "expert")},
                          "moe": {"wi": sds((384, 7168, 2048), "expert", "fsdp", None),
                                  "wo": sds((384, 2048, 7168), "expert", None, "fsdp")}}
            for i in range(60)}
  plan = mc.plan_muon_sharding(params, mesh)
  bound = max(plan.ideal_flops, max(a.flops for a in plan.mesh_plan.arrays))
  assert plan.busiest_flops <= 1.02 * bound, (plan.busiest_flops / bound, plan.flops_ratio)
  (experts,) = [a for a in plan.mesh_plan.arrays if a.cells is None]
  assert experts.count == 120 * 384 and len(experts.members) == 120
  # o and q sharded on both axes: 2 all-to-alls in, 2 out; experts: 1 in, 1 out.
  assert plan.collective_counts == {"all-to-all": 10}


@pytest.mark.parametrize("size", [2.7, 0, -2, "2", True, 2.0])
def test_plan_refuses_axis_sizes_that_are_not_positive_integers(size):
  w = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  with pytest.raises(ValueError, match=rf"mesh: axis 'x' has size {size!r}; axis sizes must "
                                       r"be positive integers"):
    mc.plan_muon_sharding(w, {"data": 2, "x": size})


@pytest.mark.parametrize("leaf", [1.5, "relu", 3])
def test_plan_names_the_path_of_a_leaf_that_is_not_an_array(leaf):
  params = {"layer": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32), "act": leaf}}
  with pytest.raises(ValueError, match=r"^layer/act: expected an array or a "
                                       r"jax.ShapeDtypeStruct leaf .*jnp.asarray"):
    mc.plan_muon_sharding(params, {"x": 2})
