"""One jitted Muon update of a GPT-2-small-shaped layer stack vs optax.contrib.muon.

Per layer: 768x2304 (qkv), 768x768 (attention out), 768x3072 (MLP in),
3072x768 (MLP out); all leaves go to Muon in both optimizers; Keller
coefficients, 5 steps, f32, consistent RMS 0.2, weight decay 0.1. The figure is
the median of per-round ratios of interleaved (paired) runs; ``optax.adamw``
is timed beside them as the elementwise floor.

Run: ``python -m benchmarks.muon_step [--layers 12] [--rounds 5]``; ``--quick`` for a
seconds-long smoke run (matrices 1/8 the size, same aspect ratios and so the same
Newton–Schulz paths) that writes nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import machine, median, median_ratio, paired_times, table, write_section
from muonclip_jax import muon

LAYER = {"attn_qkv": (768, 2304), "attn_proj": (768, 768), "mlp_fc": (768, 3072),
         "mlp_proj": (3072, 768)}
QUICK_LAYER = {k: (m // 8, n // 8) for k, (m, n) in LAYER.items()}
TARGET = 0.45


def make_tree(layers: int, seed: int = 0, shapes: dict[str, tuple[int, int]] = LAYER) -> dict:
  rng = np.random.default_rng(seed)
  return {f"h{i}": {k: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32)
                    for k, s in shapes.items()} for i in range(layers)}


def run(layers: int, rounds: int, shapes: dict[str, tuple[int, int]] = LAYER) -> str:
  params = make_tree(layers, shapes=shapes)
  grads = make_tree(layers, seed=1, shapes=shapes)
  labels = jax.tree.map(lambda _: "muon", params)
  ours = muon(1e-3, weight_decay=0.1, param_labels=labels)
  ref = optax.contrib.muon(1e-3, weight_decay=0.1, consistent_rms=0.2)
  adamw = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
  txs = {"muonclip_jax.muon": ours, "optax.contrib.muon": ref, "optax.adamw": adamw}
  steps = {}
  for name, tx in txs.items():
    state = tx.init(params)
    step = jax.jit(tx.update)
    steps[name] = (lambda step=step, state=state: step(grads, state, params))
  names = list(steps)
  t = paired_times([steps[n] for n in names], rounds=rounds)
  times = dict(zip(names, t))
  r_ref = median_ratio(times["muonclip_jax.muon"], times["optax.contrib.muon"])
  r_adam = median_ratio(times["muonclip_jax.muon"], times["optax.adamw"])
  print(f"layers={layers}: ours {median(times['muonclip_jax.muon']):.3f} s, optax.contrib.muon "
        f"{median(times['optax.contrib.muon']):.3f} s, adamw {median(times['optax.adamw']):.4f} s"
        f"; ratio to optax.contrib.muon {r_ref:.3f} (target <= {TARGET}), to adamw {r_adam:.1f}",
        flush=True)
  rows = [[n, f"{median(times[n]) * 1e3:.1f}"] for n in names]
  return (table(["optimizer", "update (ms, median)"], rows)
          + f"\n\nRatio ours / optax.contrib.muon: **{r_ref:.3f}** (target <= {TARGET}: "
          f"{'met' if r_ref <= TARGET else '**not met**'}). Ratio ours / optax.adamw: "
          f"{r_adam:.1f}.")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run on 1/8-size matrices; leaves RESULTS.md alone")
  args = ap.parse_args()
  md = run(args.layers, args.rounds, QUICK_LAYER if args.quick else LAYER)
  if not (args.no_write or args.quick):
    write_section(
        f"muon_step ({jax.devices()[0].platform})",
        f"Machine: {machine()}\n\n{args.layers} GPT-2-small layers (768x2304, 768x768, "
        f"768x3072, 3072x768 each), one jitted update, f32, medians of {args.rounds} "
        f"interleaved rounds.\n\n{md}")


if __name__ == "__main__":
  main()
