"""Muon on 8 host devices: ours (``mesh=``) vs optax.contrib.muon under XLA's SPMD.

A GPT-2-small-shaped tree (per layer 768x2304, 768x768, 768x3072, 3072x768;
all leaves to Muon in both optimizers; Keller coefficients, 5 steps, f32,
consistent RMS 0.2, weight decay 0.1) is sharded FSDP-style on an 8-device
``AxisType.Auto`` mesh (``optax.contrib.muon`` fails on explicit meshes), by
rows ``P('fsdp', None)`` or by columns ``P(None, 'fsdp')``. From the compiled
per-device program of one jitted update:

* per-device FLOPs over the ideal (each optimizer's single-device FLOPs / 8);
* bytes of collective results per device, over the momentum's bytes (whole
  momentum: the issue's reading; and over one device's shard);
* wall time: median of per-round ratios of interleaved runs.

The 8 "devices" share the host's cores (2 here), so wall time is indicative
only; FLOPs and bytes are the evidence.

Run: ``python -m benchmarks.sharded_muon [--layers 12] [--rounds 3]``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks._common import (  # noqa: E402
    machine,
    median,
    median_ratio,
    paired_times,
    table,
    write_section,
)
from benchmarks.hlo import collective_stats, compiled_flops  # noqa: E402
from muonclip_jax import muon, muon_sharding_summary  # noqa: E402

LAYER = {"attn_qkv": (768, 2304), "attn_proj": (768, 768), "mlp_fc": (768, 3072),
         "mlp_proj": (3072, 768)}
SHARDINGS = {"FSDP rows": P("fsdp", None), "FSDP cols": P(None, "fsdp")}


def make_tree(layers: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {f"h{i}": {k: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32)
                    for k, s in LAYER.items()} for i in range(layers)}


def optimizers(mesh=None) -> dict[str, optax.GradientTransformation]:
  labels = lambda params: jax.tree.map(lambda _: "muon", params)
  return {"ours": muon(1e-3, weight_decay=0.1, param_labels=labels, mesh=mesh),
          "optax": optax.contrib.muon(1e-3, weight_decay=0.1, consistent_rms=0.2)}


def run(layers: int, rounds: int) -> str:
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  params, grads = make_tree(layers), make_tree(layers, seed=1)
  mom_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  single = {}
  for name, tx in optimizers().items():
    state = tx.init(params)
    single[name] = compiled_flops(jax.jit(tx.update).lower(grads, state, params).compile())
  rows, notes = [], []
  for label, spec in SHARDINGS.items():
    put = lambda t, spec=spec: jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, spec)), t)
    sp, sg = put(params), put(grads)
    steps = {}
    for name, tx in optimizers(mesh).items():
      state = tx.init(sp)
      step = jax.jit(tx.update)
      compiled = step.lower(sg, state, sp).compile()
      stats = collective_stats(compiled.as_text())
      flops = compiled_flops(compiled)
      steps[name] = lambda step=step, state=state, sg=sg, sp=sp: step(sg, state, sp)
      ops = ", ".join(f"{v} {k}" for k, v in stats.counts.items() if v)
      rows.append([label, name, f"{flops / 1e9:.2f}", f"{flops / (single[name] / n):.3f}",
                   f"{stats.total_bytes / mom_bytes:.3f}",
                   f"{stats.total_bytes / (mom_bytes / n):.2f}", ops or "none"])
      print(label, name, rows[-1][2:], flush=True)
    t = paired_times([steps["ours"], steps["optax"]], rounds=rounds)
    ratio = median_ratio(t[0], t[1])
    rows[-2].append(f"{median(t[0]) * 1e3:.0f}")
    rows[-1].append(f"{median(t[1]) * 1e3:.0f}")
    rows[-2].append(f"**{ratio:.2f}**")
    rows[-1].append("1")
    print(f"{label}: ours {median(t[0]):.2f} s, optax {median(t[1]):.2f} s, ratio {ratio:.3f}",
          flush=True)
    if label == "FSDP rows":
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), sp)
      notes.append(muon_sharding_summary(shapes, mesh).splitlines()[0])
  headers = ["sharding", "optimizer", "per-device GFLOP", "FLOPs / ideal",
             "collective bytes / momentum", "... / momentum shard", "collectives",
             "update (ms, median)", "time ratio ours/optax"]
  return (table(headers, rows) + "\n\nIdeal = the optimizer's own single-device FLOPs / "
          f"{n} (single device: ours {single['ours'] / 1e9:.2f} GFLOP, optax "
          f"{single['optax'] / 1e9:.2f} GFLOP). Collective bytes: result bytes of every "
          "all-gather/all-reduce/all-to-all/collective-permute/reduce-scatter in the per-device "
          f"program; momentum = {mom_bytes / 2**20:.1f} MiB (f32).\n\nOur plan (rows): "
          + "; ".join(notes))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  md = run(args.layers, args.rounds)
  if not args.no_write:
    write_section(
        "sharded_muon (8 host devices)",
        f"Machine: {machine()}\n\n{args.layers} GPT-2-small layers (768x2304, 768x768, "
        f"768x3072, 3072x768 each), one jitted update on an 8-device `AxisType.Auto` mesh, "
        f"f32, medians of {args.rounds} interleaved rounds. The 8 devices share the host's "
        f"cores: wall time is indicative; FLOPs and bytes come from the compiled HLO.\n\n{md}")


if __name__ == "__main__":
  main()
