"""The MuonClip training step with Flax linen.

A small byte-level transformer built from ``flax.linen.MultiHeadDotProductAttention``
with ``attention_fn=muonclip_jax.dot_product_attention``. Calling the layer with
``sow_weights=True`` makes it sow each head's max pre-softmax logit into the
``'intermediates'`` collection; the step collects it with
``mutable=['intermediates']`` and hands it to the optimiser::

  (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params, max_logits=inter)
  params = optax.apply_updates(params, updates)

QK-Clip finds the ``query``/``key`` kernels next to each sown statistic by
name. Data and optimiser: ``examples/lm/`` (the corpus, ``make_optimizer``).

Run, from the repository root: ``python -m examples.train_linen --steps 100``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import muonclip_jax
from examples.lm.argtypes import positive_float
from examples.lm.config import add_size_args
from examples.lm.input_pipeline import ByteData, default_corpus
from examples.lm.optim import OptimConfig, make_optimizer
from examples.train_nnx import check_finite


class Block(nn.Module):
  """Pre-norm block: LayerNorm, max-logit-sowing attention, LayerNorm, MLP."""

  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="attn_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_fn=muonclip_jax.dot_product_attention,
        use_bias=False, name="attn")(h, mask=mask, sow_weights=True)
    h = nn.LayerNorm(name="mlp_norm")(x)
    h = nn.Dense(4 * self.d_model, use_bias=False, name="fc_in")(h)
    return x + nn.Dense(self.d_model, use_bias=False, name="fc_out")(nn.gelu(h))


class LinenLM(nn.Module):
  """Byte-level decoder: ``embed``, learned ``pos_embed``, blocks, ``final_norm``, ``lm_head``."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  seq_len: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(256, self.d_model, name="embed")(tokens)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    for i in range(self.num_layers):
      x = Block(self.d_model, self.num_heads, name=f"block{i}")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(256, use_bias=False, name="lm_head")(x)


def make_train_step(model: LinenLM, tx: optax.GradientTransformation
                    ) -> Callable[..., tuple[Any, optax.OptState, jax.Array, jax.Array]]:
  """The jitted step ``(params, opt_state, x, y) -> (params, opt_state, loss, max_logit)``."""

  def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state["intermediates"]

  @jax.jit
  def train_step(params: Any, opt_state: optax.OptState, x: jax.Array, y: jax.Array
                 ) -> tuple[Any, optax.OptState, jax.Array, jax.Array]:
    (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=inter)
    params = optax.apply_updates(params, updates)
    max_logit = jnp.max(jnp.stack([jnp.max(v) for v in jax.tree.leaves(inter)]))
    return params, opt_state, loss, max_logit

  return train_step


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains for ``--steps``; returns first/last loss and the last max logit."""
  p = argparse.ArgumentParser(description="MuonClip with Flax linen.")
  p.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), default="muonclip")
  p.add_argument("--lr", type=positive_float, default=0.01)
  p.add_argument("--tau", type=positive_float, default=100.0)
  add_size_args(p, steps=100, batch=16, seq_len=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  data = ByteData(default_corpus(), args.seq_len)
  batch = lambda step: tuple(map(jnp.asarray, data.train_batch(args.seed, step, args.batch)))
  model = LinenLM(seq_len=args.seq_len)
  params = model.init(jax.random.key(args.seed), batch(0)[0])["params"]
  tx = make_optimizer(OptimConfig(name=args.optimizer, lr=args.lr, tau=args.tau,
                                  schedule="constant", warmup=0, total_steps=args.steps))
  opt_state = tx.init(params)
  step = make_train_step(model, tx)  # muon and adamw ignore max_logits=
  losses, max_logit = [], float("nan")
  for i in range(args.steps):
    params, opt_state, loss, ml = step(params, opt_state, *batch(i))
    losses.append(float(loss))
    check_finite(losses[-1], i, args.lr)
    max_logit = float(ml)
    if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  loss {losses[-1]:.3f}  max logit {max_logit:.2f}", flush=True)
  return {"first_loss": losses[0] if losses else None,
          "last_loss": float(np.mean(losses[-5:])) if losses else None,
          "max_logit": max_logit}


if __name__ == "__main__":
  main()
