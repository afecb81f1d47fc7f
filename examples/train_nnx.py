"""Train a small byte-level transformer with MuonClip in Flax NNX: a loop to copy.

The model's attention calls ``muonclip_jax.dot_product_attention(..., module=self)``,
which sows each head's largest pre-softmax logit; the train step captures those
statistics and hands them to the optimizer, whose QK-Clip rescales the query and
key weights of every head whose max logit passed ``tau``. The text is a fixed
set of Python standard-library files (no download).

Run: ``python examples/train_nnx.py [--steps 300] [--tau 100] [--optimizer muonclip]``.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import muonclip_jax as mc

CORPUS = ("this.py", "functools.py", "collections/__init__.py", "string.py", "textwrap.py",
          "heapq.py", "bisect.py", "random.py", "fractions.py", "statistics.py")


def load_corpus(max_bytes: int = 1 << 20) -> np.ndarray:
  """Bytes of a fixed list of standard-library files, as ``uint8`` tokens."""
  root = Path(sysconfig.get_paths()["stdlib"])
  text = b"".join((root / name).read_bytes() for name in CORPUS if (root / name).is_file())
  if not text:
    raise FileNotFoundError(f"no standard-library sources under {root}")
  return np.frombuffer(text[:max_bytes], np.uint8)


def batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int):
  """Endless random windows: inputs and next-byte targets, ``[batch, seq_len]`` each."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    yield jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


def rope(x: jax.Array) -> jax.Array:
  """Rotary position embedding of ``[batch, seq, heads, head_dim]`` (half split)."""
  seq, half = x.shape[-3], x.shape[-1] // 2
  angles = jnp.arange(seq)[:, None] * 10_000.0 ** (-jnp.arange(half) / half)
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Causal self-attention with RoPE that sows per-head max logits for QK-Clip.

  ``query``/``key``/``value`` ``(d, heads, head_dim)`` and ``out``
  ``(heads, head_dim, d)`` are Flax's attention layout: QK-Clip finds them next
  to the sown statistic without configuration.
  """

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    hd = d // heads
    self.query = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.key = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.value = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.out = nnx.LinearGeneral((heads, hd), d, axis=(-2, -1), use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = rope(self.query(x)), rope(self.key(x)), self.value(x)
    y = mc.dot_product_attention(q, k, v, is_causal=True, module=self)  # sows max_logits
    return self.out(y)


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
    self.attn = Attention(d, heads, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
    self.fc_in = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
    self.fc_out = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.fc_out(jax.nn.gelu(self.fc_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  def __init__(self, d: int, layers: int, heads: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.final_norm = nnx.RMSNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, 256, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.final_norm(x))


def loss_fn(model: Transformer, x: jax.Array, y: jax.Array):
  logits, stats = nnx.capture(model, nnx.Intermediate)(x)  # stats holds every max_logits
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, stats


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
  (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
  # Muon and AdamW ignore max_logits=; MuonClip's QK-Clip reads it.
  optimizer.update(model, grads, max_logits=stats)
  return loss, mc.qk_clip_metrics(optimizer.opt_state) if has_qk_clip(optimizer) else {}


def has_qk_clip(optimizer: nnx.Optimizer) -> bool:
  is_state = lambda x: isinstance(x, mc.QKClipState)
  return any(is_state(x) for x in jax.tree.leaves(optimizer.opt_state, is_leaf=is_state))


def make_optimizer(name: str, lr: float, tau: float) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1)
  if name == "muon":
    return mc.muon(lr, weight_decay=0.1)
  return mc.muonclip(lr, tau=tau, weight_decay=0.1)


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (sizes, steps, intervals), refused at parse time."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return value


def positive_float(text: str) -> float:
  """argparse type: a finite number > 0 (learning rate, tau); ``nan`` is refused."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
  return value


def check_finite(loss: float, step: int, lr: float) -> None:
  """Stops a run whose loss went NaN/inf: its max logits mean nothing (exit status 1)."""
  if not math.isfinite(loss):
    raise SystemExit(f"Diverged: the loss is {loss} at step {step}; lower --lr (was {lr:g}).")


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip")
  p.add_argument("--steps", type=positive_int, default=300)
  p.add_argument("--lr", type=positive_float, default=0.01)
  p.add_argument("--tau", type=positive_float, default=100.0)
  p.add_argument("--batch", type=positive_int, default=16)
  p.add_argument("--seq-len", type=positive_int, default=128)
  p.add_argument("--d-model", type=positive_int, default=128)
  p.add_argument("--layers", type=positive_int, default=4)
  p.add_argument("--heads", type=positive_int, default=4)
  p.add_argument("--log-every", type=positive_int, default=50)
  args = p.parse_args(argv)

  model = Transformer(args.d_model, args.layers, args.heads, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_optimizer(args.optimizer, args.lr, args.tau),
                            wrt=nnx.Param)
  data = batches(load_corpus(), args.batch, args.seq_len, seed=0)
  clipped, top = 0, -float("inf")
  for step in range(1, args.steps + 1):
    loss, metrics = train_step(model, optimizer, *next(data))
    if metrics:
      clipped, top = int(metrics["qk_clip/heads_clipped_total"]), max(
          top, float(metrics["qk_clip/max_logit"]))
    if step % args.log_every == 0 or step == args.steps:  # NaN stays NaN: checked here
      check_finite(float(loss), step, args.lr)
      line = f"step {step:4d}  loss {float(loss):.3f}"
      if metrics:
        line += f"  max logit {float(metrics['qk_clip/max_logit']):.1f}  clipped {clipped}"
      print(line, flush=True)
  if args.optimizer != "muonclip":
    print(f"QK-Clip: off ({args.optimizer}).")
  elif clipped == 0:
    print(f"QK-Clip: max logit {top:.1f} stayed below tau = {args.tau:g}, no head clipped. "
          f"To see clipping, lower tau below it (e.g. --tau {max(top / 2, 1.0):.0f}).")
  else:
    print(f"QK-Clip: {clipped} head-steps clipped to tau = {args.tau:g} "
          f"(largest logit before clipping {top:.1f}).")
  return {"loss": float(loss), "max_logit": top, "clipped": clipped}


if __name__ == "__main__":
  main()
