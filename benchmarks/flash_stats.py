"""The cost of QK-Clip's statistic beside fused attention, read off compiled programs (CPU).

Two ways to get the per-head max logit when attention runs in a fused kernel:

* **recompute**: :func:`muonclip_jax.max_logits_blockwise` computes ``q k^T``
  a second time, in key blocks;
* **fused**: :func:`muonclip_jax.flash_attention` takes the kernel's own row
  maxima (tokamax ``return_residuals``) and reduces them per head.

From XLA's cost analysis of the compiled programs (per call, forward):

* extra FLOPs of the statistic: ``flops(attention + statistic) - flops(attention)``
  for the fused path (tokamax's XLA kernel with and without residuals), and
  ``flops(max_logits_blockwise)`` for the recompute path (counted with one key
  block: the cost analysis counts a loop body once); both as a fraction of the
  attention's own FLOPs;
* peak temporary memory (``memory_analysis().temp_size_in_bytes``) of the
  statistic at long context, against the ``T x T`` logits it must not
  allocate: ``max_logits_blockwise`` alone, and the fused path's extra over
  the attention.

Shapes: batch 1, 8 heads of 128, sequence ``T`` (causal). Nothing is run at
long context, only compiled. Timings on a GPU (kernel statistic vs none vs
recompute) need a GPU machine; none was lent to the session that wrote this.

Run: ``python -m benchmarks.flash_stats [--lengths 4096 8192 32768] [--no-write]``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks._common import machine, table, write_section
from benchmarks.hlo import compiled_flops
from muonclip_jax import max_logits_blockwise
from muonclip_jax._flash_attention import head_max_from_rows
from muonclip_jax._tokamax import load

HEADS, DEPTH = 8, 128


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def measure(t: int, dtype=jnp.float32) -> dict[str, float]:
  q = jax.ShapeDtypeStruct((1, t, HEADS, DEPTH), dtype)
  op = load().base.DotProductAttention()
  attn = lambda q, k, v: op(q, k, v, is_causal=True)

  def attn_stat(q, k, v):
    out, (rows, _) = op(q, k, v, is_causal=True, return_residuals=True)
    return out, head_max_from_rows(rows, None)

  blockwise = functools.partial(max_logits_blockwise, is_causal=True, block_size=512)
  c_attn = _compile(attn, q, q, q)
  c_fused = _compile(attn_stat, q, q, q)
  c_block = _compile(blockwise, q, q)
  # XLA's cost analysis counts a loop body once: count the FLOPs with one block.
  c_block_flops = _compile(functools.partial(blockwise, block_size=t), q, q)
  f_attn = compiled_flops(c_attn)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  return dict(
      t=t, attn_flops=f_attn,
      fused_extra=(compiled_flops(c_fused) - f_attn) / f_attn,
      recompute_extra=compiled_flops(c_block_flops) / f_attn,
      logits_bytes=HEADS * t * t * jnp.dtype(jnp.float32).itemsize,
      block_temp=temp(c_block),
      fused_extra_temp=temp(c_fused) - temp(c_attn),
      attn_temp=temp(c_attn))


def report(rows: list[dict[str, float]]) -> str:
  head = ["T", "attention GFLOP", "fused statistic: extra FLOPs",
          "recompute (max_logits_blockwise): extra FLOPs", "T x T logits (MiB)",
          "blockwise temp (MiB)", "fused: extra temp (MiB)", "attention temp (MiB)"]
  mib = lambda b: f"{b / 2**20:.2f}"
  body = [[r["t"], f"{r['attn_flops'] / 1e9:.1f}", f"{r['fused_extra']:.2e}",
           f"{r['recompute_extra']:.3f}", mib(r["logits_bytes"]), mib(r["block_temp"]),
           mib(r["fused_extra_temp"]), mib(r["attn_temp"])] for r in rows]
  return table(head, body)


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
  p.add_argument("--no-write", action="store_true")
  args = p.parse_args(argv)
  md = report([measure(t) for t in args.lengths])
  print(md)
  if not args.no_write:
    write_section(
        "flash_stats (statistic beside fused attention, compiled on CPU)",
        f"Machine: {machine()}\n\nBatch 1, {HEADS} heads of {DEPTH}, causal, f32; forward "
        "programs compiled (not run) with jax.jit; FLOPs from XLA's cost analysis, memory "
        "from `memory_analysis()`. Fused: tokamax's XLA attention with "
        "`return_residuals=True` and a per-head max of the row maxima, minus the same "
        "attention without. Recompute: `max_logits_blockwise` (512-key blocks). No GPU "
        "was lent to this session: the GPU figures the issue asks for (train step with "
        "the kernel's statistic vs without, target <= 1.01x, and vs recompute; bf16 "
        f"`newton_schulz` / `muon_step`) are not measured.\n\n{md}")
  return md


if __name__ == "__main__":
  main()
