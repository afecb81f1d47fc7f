"""Cost of sowing per-head max logits: a jitted train step with and without.

A small pre-LN Flax (linen) transformer LM, one jitted step: forward, backward
and an ``optax.adamw`` update. *Sowing*: every ``MultiHeadDotProductAttention``
uses ``muonclip_jax.dot_product_attention`` with ``sow_weights=True`` and the
step returns the ``'intermediates'`` collection (as a QK-Clip step would pass
it on). *Default*: Flax's own attention, nothing sown. Same parameters, same
batch. The figure is the median of per-round ratios of interleaved runs (the order
rotates every round); a third variant, our ``dot_product_attention`` without
sowing, compiles to the same program as Flax's default, so its ratio shows the
noise floor of the machine.

Run: ``python -m benchmarks.qk_stats_overhead [--layers 4] [--d-model 256]
[--seq-len 256] [--batch 4] [--rounds 21]``.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks._common import block, machine, median, median_ratio, table, write_section
from examples.lm.config import add_size_args
from muonclip_jax import dot_product_attention

TARGET = 1.03


class Block(nn.Module):
  d_model: int
  heads: int
  ours: bool
  sow: bool

  @nn.compact
  def __call__(self, x, mask):
    fn = dot_product_attention if self.ours else nn.dot_product_attention
    attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d_model,
                                           attention_fn=fn, name="attn")
    x = x + attn(nn.LayerNorm()(x), mask=mask, sow_weights=self.sow)
    h = nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))
    return x + nn.Dense(self.d_model)(nn.gelu(h))


class LM(nn.Module):
  vocab: int
  d_model: int
  heads: int
  layers: int
  ours: bool
  sow: bool

  @nn.compact
  def __call__(self, tok):
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tok)
    mask = nn.make_causal_mask(tok)
    for i in range(self.layers):
      x = Block(self.d_model, self.heads, self.ours, self.sow, name=f"block_{i}")(x, mask)
    return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm()(x))


def rotated_paired_times(fns: Sequence[Callable[[], object]], rounds: int,
                         warmup: int = 2) -> list[list[float]]:
  """Times each function once per round; the order rotates every round (no position bias)."""
  for _ in range(warmup):
    for f in fns:
      block(f())
  out: list[list[float]] = [[] for _ in fns]
  n = len(fns)
  for r in range(rounds):
    for j in range(n):
      i = (j + r) % n
      t0 = time.perf_counter()
      block(fns[i]())
      out[i].append(time.perf_counter() - t0)
  return out


def make_step(model: LM, tx: optax.GradientTransformation):
  def loss_fn(params, tok):
    logits, state = model.apply({"params": params}, tok[:, :-1], mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
    return loss, state.get("intermediates", {})

  @jax.jit
  def step(params, opt_state, tok):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tok)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, stats

  return step


def _program(step, *args) -> str:
  """StableHLO text without metadata and numbered names, for comparing programs."""
  text = re.sub(r"metadata=\{[^}]*\}|loc\([^)]*\)", "", step.lower(*args).as_text())
  return re.sub(r"[%.\w-]+\.\d+", "X", text)


def _reduce_shapes(step, *args) -> list[str]:
  """Output shapes of the reduce ops in the compiled (optimised) HLO."""
  text = step.lower(*args).compile().as_text()
  return re.findall(r"= (\w+\[[0-9,]*\])[^ ]* reduce\(", text)


def run(layers: int, d_model: int, heads: int, seq: int, batch: int, vocab: int,
        rounds: int) -> tuple[str, float]:
  tok = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)), jnp.int32)
  variants = {"default": (False, False), "ours_off": (True, False), "sowing": (True, True)}
  models = {name: LM(vocab, d_model, heads, layers, *v) for name, v in variants.items()}
  params = models["default"].init(jax.random.key(0), tok[:, :-1])["params"]
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  steps = {name: make_step(m, tx) for name, m in models.items()}
  n_stats = len(jax.tree.leaves(steps["sowing"](params, opt_state, tok)[3]))
  assert n_stats == layers, n_stats
  assert not jax.tree.leaves(steps["default"](params, opt_state, tok)[3])
  assert not jax.tree.leaves(steps["ours_off"](params, opt_state, tok)[3])
  same_program = _program(steps["default"], params, opt_state, tok) == _program(
      steps["ours_off"], params, opt_state, tok)
  reduces = {n: _reduce_shapes(steps[n], params, opt_state, tok) for n in ("default", "sowing")}
  extra = sorted(set(reduces["sowing"]) - set(reduces["default"]))
  n_extra = len(reduces["sowing"]) - len(reduces["default"])
  fns = [lambda s=steps[n]: s(params, opt_state, tok) for n in ("default", "ours_off", "sowing")]
  load0 = os.getloadavg()[0]
  t_default, t_off, t_sowing = rotated_paired_times(fns, rounds=rounds)
  load1 = os.getloadavg()[0]
  ratio = median_ratio(t_sowing, t_default)
  r_off = median_ratio(t_off, t_default)
  print(f"default {median(t_default) * 1e3:.1f} ms, ours (no sow) {median(t_off) * 1e3:.1f} ms, "
        f"sowing {median(t_sowing) * 1e3:.1f} ms; ratio sowing/default {ratio:.4f} "
        f"(target <= {TARGET}), ours-no-sow/default {r_off:.4f}", flush=True)
  rows = [["Flax default attention", f"{median(t_default) * 1e3:.1f}", "1"],
          ["dot_product_attention, sow_weights=False", f"{median(t_off) * 1e3:.1f}",
           f"{r_off:.4f}"],
          ["dot_product_attention, max logits sown", f"{median(t_sowing) * 1e3:.1f}",
           f"**{ratio:.4f}**"]]
  md = (table(["train step", "time (ms, median)", "ratio to default (median per round)"],
              rows)
        + f"\n\nThe second row lowers to {'the same' if same_program else 'a different'} "
        f"StableHLO as the first (compared modulo metadata and names)"
        + (", so its ratio is the run's noise floor." if same_program else ".")
        + f"\n\nCompiled (XLA) program: the sowing step has {n_extra:+d} reduce ops "
        f"(new output shapes: {', '.join(extra) or 'none'}); the statistic reuses the "
        f"softmax's row maxima.\n\nRatio sowing / default: **{ratio:.4f}** (target <= {TARGET}: "
        f"{'met' if ratio <= TARGET else '**not met**'}); per-round ratios min "
        f"{min(a / b for a, b in zip(t_sowing, t_default)):.4f}, max "
        f"{max(a / b for a, b in zip(t_sowing, t_default)):.4f}. 1-minute load average "
        f"{load0:.1f} before and {load1:.1f} after the timed rounds "
        f"({os.cpu_count()} CPUs; other jobs share the machine).")
  return md, ratio


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  add_size_args(ap, batch=4, seq_len=256, d_model=256, layers=4, heads=4)
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--rounds", type=int, default=21)
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  md, _ = run(args.layers, args.d_model, args.heads, args.seq_len, args.batch, args.vocab,
              args.rounds)
  if not args.no_write:
    write_section(
        f"qk_stats_overhead ({jax.devices()[0].platform})",
        f"Machine: {machine()}\n\nPre-LN linen transformer LM: {args.layers} layers, "
        f"d_model {args.d_model}, {args.heads} heads, sequence {args.seq_len}, batch "
        f"{args.batch}, vocab {args.vocab}, f32, causal mask. One jitted step (forward, "
        f"backward, optax.adamw); the sowing step also returns the statistics. Medians of "
        f"{args.rounds} interleaved rounds.\n\n{md}")


if __name__ == "__main__":
  main()
