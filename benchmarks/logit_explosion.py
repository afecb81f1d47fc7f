"""Study: the max attention logit under plain Muon vs MuonClip.

Setting (chosen so that plain Muon's logits grow without bound): the byte-level
transformer of ``examples/lm/model.py`` (d_model 128, 2 layers, 4 heads, RoPE) on the
standard-library corpus, Muon at a constant learning rate 0.02 after a short
warm-up, **no weight decay** (weight decay 0.1 keeps this small model's logits
below ~50; Kimi K2 saw the explosion at scale even with it). MuonClip is the
same optimiser with QK-Clip at ``tau``.

Reported per seed: the largest max logit seen by any head (pre-clip statistic
of each step's forward pass) for both, whether plain Muon passes ``3 tau``,
whether MuonClip stays at or below ``1.05 tau``, and the final validation loss
of both (target: MuonClip within 1 % of plain Muon, or better).

Writes ``benchmarks/plots/logit_explosion.png``, the ``logit_explosion`` section
of ``benchmarks/RESULTS.md`` and raw metrics to ``runs/logit_explosion.json``.

Run: ``python -m benchmarks.logit_explosion`` (about 8 minutes on 2 CPU cores);
``--quick`` for a seconds-long smoke run that writes nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import _common  # noqa: E402
from examples import lm  # noqa: E402
from examples.lm.argtypes import nonnegative_float, positive_float  # noqa: E402

PLOTS = Path(__file__).with_name("plots")


def run_pair(args: argparse.Namespace, seed: int, data: lm.ByteData
             ) -> dict[str, dict[str, Any]]:
  """Plain Muon and MuonClip from the same initialisation and batches."""
  out = {}
  for name in ("muon", "muonclip"):
    cfg = lm.RunConfig(
        model=lm.ModelConfig(d_model=args.d_model, num_layers=args.layers,
                             num_heads=args.heads),
        optim=lm.OptimConfig(name=name, lr=args.lr, tau=args.tau,
                             weight_decay=args.weight_decay, warmup=args.warmup,
                             schedule="constant", total_steps=args.steps),
        steps=args.steps, batch=args.batch, seq_len=args.seq_len, seed=seed,
        eval_every=args.eval_every, eval_batches=args.eval_batches)
    t0 = time.perf_counter()
    trainer = lm.Trainer(cfg, data)
    same_batch: list[float] = []
    if name == "muonclip":
      # After each step: the same batch's max logit with the updated, clipped weights.
      forward = jax.jit(lambda p, x, n=cfg.model.num_layers, g=trainer.graphdef:
                        lm.head_max_logits(lm.apply_model(g, p, x)[1], n))
      def on_step(tr: lm.Trainer, forward=forward, out=same_batch) -> None:
        x, _ = tr.batch(tr.step - 1)
        out.append(float(np.max(forward(tr.params, x))))
      trainer.run(on_step=on_step)
    else:
      trainer.run()
    m = trainer.metrics
    per_step = np.asarray(m["max_logit"]).max(axis=1)
    out[name] = {
        "metrics": m,
        "peak_max_logit": float(per_step.max()),
        "final_val_loss": float(m["val_loss"][-1]),
        "clip": lm.clip_telemetry(trainer.opt_state),
        "same_batch_after_step": same_batch,
        "seconds": time.perf_counter() - t0,
    }
    print(f"seed {seed} {name:8s}: peak max logit {per_step.max():9.1f}, final val loss "
          f"{m['val_loss'][-1]:.4f} ({out[name]['seconds']:.0f} s)", flush=True)
  return out


def plot(results: dict[int, dict[str, dict[str, Any]]], tau: float, path: Path) -> None:
  """Max logit (log scale, per step, max over layers) and validation loss per seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  styles = {"muon": ("C3", "plain Muon"), "muonclip": ("C0", f"MuonClip (tau={tau:g})")}
  for j, (seed, runs) in enumerate(sorted(results.items())):
    for name, r in runs.items():
      color, label = styles[name]
      m = r["metrics"]
      lab = f"{label}, seed {seed}"
      ls = "-" if j == 0 else "--"
      ax1.plot(m["step"], np.asarray(m["max_logit"]).max(axis=1), ls, color=color, label=lab,
               lw=1)
      ax2.plot(m["val_step"][1:], m["val_loss"][1:], ls, color=color, label=lab, lw=1)
  ax1.axhline(tau, color="k", lw=0.8, ls=":", label="tau")
  ax1.axhline(3 * tau, color="gray", lw=0.8, ls=":", label="3 tau")
  ax1.set(yscale="log", xlabel="step", ylabel="max pre-softmax logit (any head)",
          title="Max attention logit")
  ax2.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def report(results: dict[int, dict[str, dict[str, Any]]], args: argparse.Namespace
           ) -> tuple[str, bool]:
  """The RESULTS.md section and whether every target was met."""
  tau = args.tau
  rows = []
  ok_all = True
  for seed, runs in sorted(results.items()):
    mu, mc = runs["muon"], runs["muonclip"]
    rel = mc["final_val_loss"] / mu["final_val_loss"] - 1.0
    stat = np.asarray(mc["metrics"]["max_logit"]).max(axis=1)
    first = int(np.argmax(stat > tau)) if (stat > tau).any() else len(stat)
    after = stat[first:] / tau
    same = np.asarray(mc["same_batch_after_step"][first:]) / tau
    explode = mu["peak_max_logit"] > 3 * tau
    held = mc["peak_max_logit"] <= 1.05 * tau
    within = rel <= 0.01
    ok_all &= explode and held and within
    rows.append([
        seed, f"{mu['peak_max_logit']:.1f} ({mu['peak_max_logit'] / tau:.1f} tau)",
        f"{mc['peak_max_logit']:.2f} ({mc['peak_max_logit'] / tau:.3f} tau)",
        (f"{np.median(after):.3f} / {np.percentile(after, 99):.3f} / "
         f"{100 * np.mean(after > 1.05):.1f} %" if len(after) else "-"),
        f"{same.max():.3f}" if len(same) else "-",
        f"{mu['final_val_loss']:.4f}", f"{mc['final_val_loss']:.4f}", f"{100 * rel:+.2f} %",
        mc["clip"].get("clipped_total", 0),
        "yes" if explode and held and within else "no"])
  heads = args.layers * args.heads
  md = f"""
Plain Muon vs MuonClip (tau = {tau:g}) on the byte-level transformer of `examples/lm/model.py`
(d_model {args.d_model}, {args.layers} layers, {args.heads} heads, RoPE; batch {args.batch} x
{args.seq_len} bytes) on the standard-library corpus; learning rate {args.lr:g} constant after
{args.warmup} warm-up steps, weight decay {args.weight_decay:g}, {args.steps} steps; the two
runs of a seed share initialisation and batches. "Max logit" is the largest per-head
statistic that QK-Clip reads (each step's forward pass, before that step's clip), over all
steps and all {heads} heads. Targets: plain Muon passes 3 tau; MuonClip stays at or below
1.05 tau; MuonClip's final validation loss within 1 % of plain Muon's, or better.

{_common.table(["seed", "plain Muon max logit", "MuonClip max logit",
                "MuonClip after first clip: median / p99 (x tau) / steps > 1.05 tau",
                "MuonClip same batch after step (max, x tau)",
                "Muon final val loss", "MuonClip final val loss", "MuonClip vs Muon",
                "head-clips (total)", "targets met"], rows)}

Targets met on every seed: **{"yes" if ok_all else "no"}**. "head-clips" counts
(step, head) pairs that QK-Clip rescaled. "Same batch after step" re-measures the batch a
step was clipped on with the updated, clipped weights: QK-Clip computes its factor from the
logits *before* the update, so the update's own growth remains (the paper's algorithm). The
per-step statistic adds batch-to-batch variation of the maximum (a new batch of
{args.batch} x {args.seq_len} bytes every step).

![max logit and validation loss](plots/logit_explosion.png)

Machine: {_common.machine()}. Command: `python -m benchmarks.logit_explosion`.
"""
  return md, ok_all


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, dict[str, Any]]]:
  """Runs the study (see the module docstring); returns the per-seed results."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tau", type=positive_float, default=100.0)
  p.add_argument("--lr", type=positive_float, default=0.02)
  p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
  _common.add_study_args(p, steps=500, eval_every=25)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.d_model, args.layers, args.seq_len, args.batch = 6, 32, 1, 16, 4
    args.seeds, args.eval_every, args.eval_batches, args.tau = [0], 3, 1, 1.0

  data = lm.ByteData(lm.default_corpus(), args.seq_len)
  results = {seed: run_pair(args, seed, data) for seed in args.seeds}
  md, ok = report(results, args)
  print(md)
  if not args.quick:
    plot(results, args.tau, PLOTS / "logit_explosion.png")
    _common.write_section("logit_explosion", md)
    raw = ROOT / "runs" / "logit_explosion.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({str(s): r for s, r in results.items()}))
  return results


if __name__ == "__main__":
  main()
