"""Plan a Kimi K2-sized Muon step at pod scale, without the pod.

The parameter tree is a Kimi K2-shaped MLA + MoE transformer built from
``jax.ShapeDtypeStruct`` leaves on a :class:`jax.sharding.AbstractMesh` (no
devices). Configuration (Kimi K2 tech report, arXiv 2507.20534, §2 and
Table 2: 1.04T total / 32.6B activated parameters, 384 experts, 8 active, 64
heads; the remaining sizes as in the public ``moonshotai/Kimi-K2`` config,
cross-checked against a public Megatron-LM launch script for kimi-k2): 61
layers, the first dense; hidden 7168; MLA with q-LoRA 1536, kv-LoRA 512,
qk-nope 128, rope 64, v 128; 384 routed experts of intermediate 2048 plus 1
shared; dense intermediate 18432; vocabulary 163,840.

Layout (FSDP x expert parallelism on a ``('fsdp', 'expert')`` mesh): expert
weights ``(384, ., .)`` have their expert axis on ``'expert'`` and their
hidden (7168) axis on ``'fsdp'``; every other matrix has its hidden axis (or
its first axis) on ``'fsdp'`` and the other axis on ``'expert'`` (2-D FSDP).
Embedding, LM head, norms go to AdamW (the default routing).

Per mesh (256, 1,024 and 2,048 devices) it reports, for ``muon(mesh=...)``'s
plan (:func:`muonclip_jax.plan_muon_sharding`) and for XLA's automatic
partitioning of the same Newton–Schulz (the ``optax.contrib.muon`` way,
modelled per matrix from what XLA compiles on 8 host devices, and checked
against that HLO here with ``--validate``):

* busiest-device Newton–Schulz FLOPs / ideal (total / devices);
* bytes each device sends per step in the optimizer's collectives;
* Newton–Schulz seconds per step at a bf16 peak and efficiency (TPU v5p
  459 TFLOP/s, Google Cloud TPU v5p documentation; H100 SXM 989 TFLOP/s dense,
  NVIDIA H100 datasheet; both at 50% of peak), and that time as a fraction of
  one training step of a 4M-token batch (``6 x active params x tokens`` FLOPs
  at the same peak and efficiency). Collective time is not turned into
  seconds (it depends on the interconnect); the bytes are reported.

Run: ``python -m benchmarks.scale_plan [--no-validate] [--no-write]``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks._common import machine, table, write_section  # noqa: E402
from muonclip_jax import default_param_labels, plan_muon_sharding  # noqa: E402
from muonclip_jax._newton_schulz import newton_schulz_flops  # noqa: E402
from muonclip_jax._view_sharding import Axes, entry_axes  # noqa: E402

K2 = dict(layers=61, dense_layers=1, hidden=7168, heads=64, q_lora=1536, kv_lora=512,
          qk_nope=128, rope=64, v=128, experts=384, active_experts=8, shared_experts=1,
          expert_ffn=2048, dense_ffn=18432, vocab=163_840)
MESHES = {256: {"fsdp": 32, "expert": 8}, 1024: {"fsdp": 64, "expert": 16},
          2048: {"fsdp": 64, "expert": 32}}
PEAKS = {"TPU v5p": 459e12, "H100 SXM": 989e12}
EFFICIENCY = 0.5
TOKENS = 4 * 2**20
NS_STEPS = 5


def k2_shapes(cfg: dict = K2) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """``{path: (shape, spec entries)}`` of the Kimi K2-shaped tree."""
  h, nh = cfg["hidden"], cfg["heads"]
  two_d = ("fsdp", "expert")
  out = {"embed/embedding": ((cfg["vocab"], h), (None, "fsdp")),
         "lm_head/kernel": ((h, cfg["vocab"]), ("fsdp", None)),
         "final_norm/scale": ((h,), (None,))}
  for i in range(cfg["layers"]):
    p = f"layers_{i}"
    out |= {
        f"{p}/attn_norm/scale": ((h,), (None,)),
        f"{p}/attn/q_a_proj/kernel": ((h, cfg["q_lora"]), two_d),
        f"{p}/attn/q_a_norm/scale": ((cfg["q_lora"],), (None,)),
        f"{p}/attn/q_b_proj/kernel": ((cfg["q_lora"], nh * (cfg["qk_nope"] + cfg["rope"])), two_d),
        f"{p}/attn/kv_a_proj/kernel": ((h, cfg["kv_lora"] + cfg["rope"]), two_d),
        f"{p}/attn/kv_a_norm/scale": ((cfg["kv_lora"],), (None,)),
        f"{p}/attn/kv_b_proj/kernel": ((cfg["kv_lora"], nh * (cfg["qk_nope"] + cfg["v"])),
                                       two_d),
        f"{p}/attn/o_proj/kernel": ((nh * cfg["v"], h), ("expert", "fsdp")),
        f"{p}/mlp_norm/scale": ((h,), (None,)),
    }
    if i < cfg["dense_layers"]:
      f = cfg["dense_ffn"]
      out |= {f"{p}/mlp/{k}/kernel": (s, sp) for k, s, sp in (
          ("gate", (h, f), two_d), ("up", (h, f), two_d), ("down", (f, h), ("expert", "fsdp")))}
      continue
    e, f = cfg["experts"], cfg["expert_ffn"]
    out |= {
        f"{p}/moe/router/kernel": ((h, e), two_d),
        f"{p}/moe/experts/gate": ((e, h, f), ("expert", "fsdp", None)),
        f"{p}/moe/experts/up": ((e, h, f), ("expert", "fsdp", None)),
        f"{p}/moe/experts/down": ((e, f, h), ("expert", None, "fsdp")),
    }
    fs = cfg["shared_experts"] * f
    out |= {f"{p}/moe/shared/{k}/kernel": (s, sp) for k, s, sp in (
        ("gate", (h, fs), two_d), ("up", (h, fs), two_d), ("down", (fs, h), ("expert", "fsdp")))}
  return out


def nest(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    *head, last = k.split("/")
    d = out
    for part in head:
      d = d.setdefault(part, {})
    d[last] = v
  return out


def abstract_tree(sizes: dict[str, int], dtype=jnp.float32) -> dict:
  """The K2-shaped tree as ``ShapeDtypeStruct`` leaves sharded on an AbstractMesh."""
  mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
  return nest({k: jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, P(*sp)))
               for k, (s, sp) in k2_shapes().items()})


def param_counts(cfg: dict = K2) -> tuple[int, int]:
  """(total, activated) parameters: routed experts count ``active / experts``."""
  total = active = 0
  for path, (shape, _) in k2_shapes(cfg).items():
    n = math.prod(shape)
    total += n
    active += n * cfg["active_experts"] // cfg["experts"] if "/experts/" in path else n
  return total, active


# -- XLA's automatic partitioning, modelled per matrix ------------------------------------


class XlaCost(NamedTuple):
  """Per device, per optimizer step: Newton–Schulz FLOPs and bytes sent, by collective."""

  flops: float
  result_bytes: dict[str, float]
  moved_bytes: float


def _axes(entries: tuple, dims: tuple[int, ...]) -> Axes:
  return tuple(a for d in dims for a in entry_axes(entries[d] if d < len(entries) else None))


def xla_matrix_cost(shape: tuple[int, ...], entries: tuple, sizes: dict[str, int],
                    item: int = 4, steps: int = NS_STEPS) -> XlaCost:
  """What XLA's SPMD partitioner does with ``optax.contrib.muon``'s Newton–Schulz.

  Read off the compiled HLO on 8 host devices (``--validate`` checks it), for
  a batch of ``B`` matrices ``m x n`` (``m <= n``; the last two axes, as
  optax orients them): the batch axes' sharding splits the matrices; then per
  Newton–Schulz step and matrix,

  * short side sharded over ``g_r`` devices: ``X`` and then the product are
    all-gathered (``2 m n + m^2`` elements per step), FLOPs split ``1/g_r``;
  * long side sharded over ``g_c``: ``X X^T`` is all-reduced (``m^2``), the
    ``m x m`` products run replicated (``2 m^3`` per step on every device);
  * both: ``2 m n / g_c`` all-gathered over ``g_r``, ``m^2`` all-reduced over
    ``g_c`` and ``m^2 / g_c`` permuted, FLOPs split ``1/(g_r g_c)``;

  plus one all-reduce of the Frobenius norms. Mesh axes that shard nothing
  replicate the work. Bytes sent: an all-gather sends ``(g-1)/g`` of its
  result, a ring all-reduce ``2 (g-1)/g``, a permute all of it.
  """
  *batch, a, b = shape
  tall = a > b
  m, n = min(a, b), max(a, b)
  short, long = (len(shape) - 1, len(shape) - 2) if tall else (len(shape) - 2, len(shape) - 1)
  bax = _axes(entries, tuple(range(len(batch))))
  r, c = _axes(entries, (short,)), _axes(entries, (long,))
  size = lambda axes: math.prod(sizes[x] for x in axes)
  local = math.prod(batch) // size(bax) if batch else 1
  gr, gc = size(r), size(c)
  full = 4 * m * m * n + 2 * m**3
  gather = reduce = permute = 0.0
  if r and c:
    flops = full / (gr * gc)
    gather, reduce, permute = 2 * m * n / gc, m * m, m * m / gc
  elif r:
    flops, gather = full / gr, 2 * m * n + m * m
  elif c:
    flops, reduce = 4 * m * m * n / gc + 2 * m**3, m * m
  else:
    flops = full
  res = {"all-gather": gather * item * steps * local,
         "all-reduce": reduce * item * steps * local + (4 * local if r or c else 0),
         "collective-permute": permute * item * steps * local}
  moved = (res["all-gather"] * (gr - 1) / max(gr, 1)
           + res["all-reduce"] * 2 * (gc - 1) / max(gc, 1)
           + res["collective-permute"])
  return XlaCost(flops * steps * local, res, moved)


def xla_cost(params, sizes: dict[str, int]) -> tuple[float, float, float]:
  """(busiest FLOPs, ideal FLOPs, bytes sent per device) of XLA's partitioning.

  Every device runs the same program, so the busiest device is any device.
  """
  labels = default_param_labels(params)
  flops = ideal = moved = 0.0
  n = math.prod(sizes.values())
  for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
    if label != "muon":
      continue
    entries = tuple(x.sharding.spec)
    cost = xla_matrix_cost(tuple(x.shape), entries, sizes, x.dtype.itemsize)
    flops += cost.flops
    moved += cost.moved_bytes
    *batch, a, b = x.shape
    ideal += math.prod(batch) * newton_schulz_flops(a, b, NS_STEPS, "standard") / n
  return flops, ideal, moved


# -- the study ------------------------------------------------------------------------------


def study(devices: int) -> dict:
  sizes = MESHES[devices]
  params = abstract_tree(sizes)
  t0 = time.perf_counter()
  plan = plan_muon_sharding(params, sizes, method="standard")
  seconds = time.perf_counter() - t0
  x_flops, x_ideal, x_moved = xla_cost(params, sizes)
  _, active = param_counts()
  train = 6 * active * TOKENS / devices  # per device
  return dict(devices=devices, sizes=sizes, plan_seconds=seconds, ratio=plan.flops_ratio,
              busiest=plan.busiest_flops, moved=plan.moved_bytes,
              collectives=sum(plan.collective_counts.values()), x_ratio=x_flops / x_ideal,
              x_busiest=x_flops, x_moved=x_moved, train=train,
              operands=len(plan.mesh_plan.arrays))


def validate() -> list[list[object]]:
  """The XLA model against the compiled HLO of ``optax.contrib.muon`` on 8 host devices."""
  import optax

  from benchmarks.hlo import collective_stats, compiled_flops

  rows = []
  m8 = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  m24 = jax.make_mesh((2, 4), ("fsdp", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cases = [((256, 1024), m8, P("fsdp", None)), ((256, 1024), m8, P(None, "fsdp")),
           ((1024, 256), m8, P(None, "fsdp")), ((256, 1024), m24, P("fsdp", "expert")),
           ((8, 256, 1024), m8, P("fsdp", None, None)),
           ((4, 1024, 256), m24, P("expert", "fsdp", None))]
  dims = lambda p: jax.tree.map(lambda x: optax.contrib.MuonDimensionNumbers(x.ndim - 2,
                                                                             x.ndim - 1), p)
  for shape, mesh, spec in cases:
    tx = optax.contrib.muon(1e-3, weight_decay=0.0, consistent_rms=0.2,
                            muon_weight_dimension_numbers=dims)
    x = jax.device_put(jnp.ones(shape, jnp.float32), NamedSharding(mesh, spec))
    compiled = jax.jit(tx.update).lower({"w": x}, tx.init({"w": x}), {"w": x}).compile()
    stats = collective_stats(compiled.as_text())
    model = xla_matrix_cost(shape, tuple(spec), dict(mesh.shape))
    got = sum(stats.bytes[k] for k in ("all-gather", "all-reduce", "collective-permute"))
    want = sum(model.result_bytes.values())
    *batch, a, b = shape
    ns = math.prod(batch) * newton_schulz_flops(a, b, NS_STEPS, "standard") / mesh.size
    rows.append([f"{'x'.join(map(str, shape))} {spec}", f"{got / 2**20:.3f}",
                 f"{want / 2**20:.3f}", f"{compiled_flops(compiled) / ns:.3f}",
                 f"{model.flops / ns:.3f}"])
  return rows


def report(results: list[dict], seconds_to_plan: bool = True) -> str:
  total, active = param_counts()
  head = ["devices (fsdp x expert)", "way", "NS FLOPs busiest / ideal", "GB sent / device",
          "collectives"]
  head += [f"NS s @ {k}" for k in PEAKS] + ["NS / train step"]
  rows = []
  for r in results:
    mesh = f"{r['devices']} ({r['sizes']['fsdp']} x {r['sizes']['expert']})"
    for way, busiest, ratio, moved, colls in (
        ("muonclip_jax (plan)", r["busiest"], r["ratio"], r["moved"], r["collectives"]),
        ("XLA auto (optax.contrib.muon)", r["x_busiest"], r["x_ratio"], r["x_moved"],
         "~5 per matrix and NS step")):
      secs = [busiest / (peak * EFFICIENCY) for peak in PEAKS.values()]
      step = [r["train"] / (peak * EFFICIENCY) for peak in PEAKS.values()]
      # At one efficiency for both, the fraction does not depend on the peak.
      rows.append([mesh, way, f"{ratio:.3f}", f"{moved / 1e9:.2f}", colls]
                  + [f"{s:.3f}" for s in secs] + [f"{secs[0] / step[0]:.1%}"])
  md = table(head, rows)
  plan_t = ", ".join(f"{r['devices']}: {r['plan_seconds']:.1f} s" for r in results)
  md += (f"\n\nParameters: {total / 1e12:.3f}T total, {active / 1e9:.1f}B activated "
         f"(paper: 1.04T / 32.6B). Training step: 6 x {active / 1e9:.1f}B x "
         f"{TOKENS / 2**20:.0f}M tokens. Newton–Schulz: 5 steps, standard path (Keller), bf16 "
         f"compute, f32 momentum on the wire. Efficiency {EFFICIENCY:.0%} of peak for both. "
         f"Seconds to plan the whole tree: {plan_t}.")
  return md


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--no-validate", action="store_true")
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  results = [study(d) for d in MESHES]
  md = report(results)
  print(md)
  if not args.no_validate:
    check = table(["matrix, sharding (8 host devices)", "HLO MiB", "model MiB",
                   "HLO FLOPs / ideal", "model FLOPs / ideal"], validate())
    print(check)
    md += ("\n\nThe XLA model against the compiled HLO of `optax.contrib.muon` (5 steps, f32) "
           "on 8 host devices (collective result bytes per device; FLOPs include the "
           f"elementwise work):\n\n{check}")
  if not args.no_write:
    write_section("scale_plan (Kimi K2-shaped tree, modelled)",
                  f"Machine: {machine()}\n\n{md}")


if __name__ == "__main__":
  main()
