"""The model: a small byte-level decoder-only transformer in Flax NNX.

:class:`Transformer` is pre-norm, with RoPE, optional GQA (``num_kv_heads``),
a GELU MLP and an untied LM head. Attention is hand-written: the projections are
``nnx.LinearGeneral`` modules named ``query``/``key``/``value``/``out`` (the
layout of Flax's own attention), and the logits go through
:func:`muonclip_jax.dot_product_attention` with ``module=self``, which sows the
per-head max logit ``max_logits`` where QK-Clip finds the query and key kernels
next to it. Module names route the embedding (``embed``), the LM head
(``lm_head``) and the norms (``*norm*``) to AdamW under
:func:`muonclip_jax.default_param_labels`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import muonclip_jax


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Size of :class:`Transformer`.

  Attributes:
    vocab_size: 256 for bytes.
    d_model: residual width.
    num_layers: transformer blocks.
    num_heads: query heads; ``d_model`` must be a multiple.
    num_kv_heads: key/value heads (GQA/MQA); ``None`` means ``num_heads``.
    mlp_ratio: MLP hidden width over ``d_model``.
    rope_base: RoPE frequency base.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_ratio: int = 4
  rope_base: float = 10_000.0

  @property
  def kv_heads(self) -> int:
    """Key/value heads (``num_heads`` unless GQA/MQA)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_dim(self) -> int:
    """Width of one head."""
    return self.d_model // self.num_heads

  def validate(self) -> ModelConfig:
    """Returns ``self``; raises ``ValueError`` on inconsistent sizes."""
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads "
                       f"({self.num_heads})")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    return self


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of ``x`` ``[batch, seq, heads, head_dim]`` (half split)."""
  seq, dim = x.shape[-3], x.shape[-1]
  half = dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and GQA that sows per-head max logits.

  Parameters ``query`` ``(d, H, hd)``, ``key``/``value`` ``(d, H_kv, hd)``,
  ``out`` ``(H, hd, d)``: Flax's attention layout, which QK-Clip detects next
  to the sown ``max_logits`` without configuration.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    self.rope_base = cfg.rope_base
    self.query = nnx.LinearGeneral(d, (h, hd), use_bias=False, rngs=rngs)
    self.key = nnx.LinearGeneral(d, (kv, hd), use_bias=False, rngs=rngs)
    self.value = nnx.LinearGeneral(d, (kv, hd), use_bias=False, rngs=rngs)
    self.out = nnx.LinearGeneral((h, hd), d, axis=(-2, -1), use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q = rope(self.query(x), self.rope_base)
    k = rope(self.key(x), self.rope_base)
    v = self.value(x)
    y = muonclip_jax.dot_product_attention(q, k, v, is_causal=True, module=self)
    return self.out(y)


class Block(nnx.Module):
  """Pre-norm transformer block: RMSNorm, attention, RMSNorm, GELU MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    d = cfg.d_model
    self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
    self.fc_in = nnx.Linear(d, cfg.mlp_ratio * d, use_bias=False, rngs=rngs)
    self.fc_out = nnx.Linear(cfg.mlp_ratio * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.fc_out(jax.nn.gelu(self.fc_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  """Byte-level decoder-only transformer: ``embed``, ``blocks``, ``final_norm``, ``lm_head``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    cfg.validate()
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.final_norm(x))


def init_model(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """The model's graph definition and its parameters as a plain nested dict."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def apply_model(graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array
                ) -> tuple[jax.Array, dict[str, Any]]:
  """Logits ``[batch, seq, vocab]`` and the sown statistics (a plain dict)."""
  model = nnx.merge(graphdef, params)
  logits, stats = nnx.capture(model, nnx.Intermediate)(tokens)
  return logits, nnx.to_pure_dict(stats)


def head_max_logits(stats: dict[str, Any], num_layers: int) -> jax.Array:
  """Per-layer, per-head max logits ``[layers, heads]`` from :func:`apply_model`'s stats."""
  return jnp.stack([stats["blocks"][i]["attn"]["max_logits"] for i in range(num_layers)])


def count_params(params: Any) -> int:
  """Number of scalars in ``params``."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def loss_fn(graphdef: nnx.GraphDef, params: dict[str, Any], x: jax.Array, y: jax.Array
            ) -> tuple[jax.Array, dict[str, Any]]:
  """Mean next-byte cross-entropy (nats) and the sown statistics."""
  logits, stats = apply_model(graphdef, params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  return loss.mean(), stats
