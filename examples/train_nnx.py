"""Train a small byte-level transformer with MuonClip in Flax NNX: a loop to copy.

The model's attention calls ``muonclip_jax.dot_product_attention(..., module=self)``,
which sows each head's largest pre-softmax logit; the train step captures those
statistics and hands them to the optimizer, whose QK-Clip rescales the query and
key weights of every head whose max logit passed ``tau``. The text is a fixed
set of Python standard-library files (no download).

The model, the corpus and the optimiser come from ``examples/lm/`` (the pod trainer,
which adds a mesh, several processes and checkpoints to this loop).

Run, from the repository root with the package installed:
``python -m examples.train_nnx [--steps 300] [--tau 100] [--optimizer muonclip]``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import muonclip_jax as mc
from examples.lm.argtypes import positive_float, positive_int
from examples.lm.config import add_size_args
from examples.lm.input_pipeline import ByteData, default_corpus
from examples.lm.model import ModelConfig, Transformer
from examples.lm.optim import OptimConfig, make_optimizer, qk_clip_report

# The model (examples/lm/model.py) is a pre-norm transformer with RoPE whose attention calls
# mc.dot_product_attention(q, k, v, is_causal=True, module=self): that call sows each head's
# largest pre-softmax logit as an nnx.Intermediate named max_logits, next to the query and key
# kernels, where QK-Clip finds them without configuration.


def loss_fn(model: Transformer, x: jax.Array, y: jax.Array):
  """Mean next-byte cross-entropy and the sown statistics (every layer's ``max_logits``)."""
  logits, stats = nnx.capture(model, nnx.Intermediate)(x)  # stats holds every max_logits
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, stats


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
  """One step; returns the loss, the largest logit of the batch and QK-Clip's counters."""
  (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
  # Muon and AdamW ignore max_logits=; MuonClip's QK-Clip reads it.
  optimizer.update(model, grads, max_logits=stats)
  top = jnp.max(jnp.stack([jnp.max(v) for v in jax.tree.leaves(stats)]))
  return loss, top, mc.qk_clip_metrics(optimizer.opt_state) if has_qk_clip(optimizer) else {}


def has_qk_clip(optimizer: nnx.Optimizer) -> bool:
  """Whether the optimiser state holds QK-Clip's (MuonClip; not Muon or AdamW)."""
  is_state = lambda x: isinstance(x, mc.QKClipState)
  return any(is_state(x) for x in jax.tree.leaves(optimizer.opt_state, is_leaf=is_state))


def check_finite(loss: float, step: int, lr: float) -> None:
  """Stops a run whose loss went NaN/inf: its max logits mean nothing (exit status 1)."""
  if not math.isfinite(loss):
    raise SystemExit(f"Diverged: the loss is {loss} at step {step}; lower --lr (was {lr:g}).")


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip")
  p.add_argument("--lr", type=positive_float, default=None,
                 help="peak learning rate (default 0.01; 3e-3 for AdamW)")
  p.add_argument("--tau", type=positive_float, default=100.0)
  add_size_args(p, steps=300, batch=16, seq_len=128, d_model=128, layers=4, heads=4)
  p.add_argument("--log-every", type=positive_int, default=50)
  args = p.parse_args(argv)
  lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.01)

  model = Transformer(ModelConfig(d_model=args.d_model, num_layers=args.layers,
                                  num_heads=args.heads), rngs=nnx.Rngs(0))
  tx = make_optimizer(OptimConfig(name=args.optimizer, lr=lr, tau=args.tau,
                                  total_steps=args.steps))  # warm-up, then cosine decay
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  data = ByteData(default_corpus(), args.seq_len)  # training head, validation tail
  clipped, top = 0, -math.inf
  for step in range(1, args.steps + 1):
    x, y = data.train_batch(seed=0, step=step, batch=args.batch)  # a function of the step
    loss, max_logit, metrics = train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
    top = max(top, float(max_logit))
    if metrics:
      clipped = int(metrics["qk_clip/heads_clipped_total"])
    if step % args.log_every == 0 or step == args.steps:  # NaN stays NaN: checked here
      check_finite(float(loss), step, lr)
      line = f"step {step:4d}  loss {float(loss):.3f}  max logit {float(max_logit):.1f}"
      print(line + (f"  clipped {clipped}" if metrics else ""), flush=True)
  print(qk_clip_report(args.optimizer, args.tau, top, clipped if has_qk_clip(optimizer)
                       else None))
  return {"loss": float(loss), "max_logit": top, "clipped": clipped}

if __name__ == "__main__":
  main()
