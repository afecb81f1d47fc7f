"""DeepMind's real ``gm.nn.Transformer`` under ``mc.gemma_max_logits`` (full gemma install).

The suite tests Gemma's real attention modules from the pinned wheel, without
TensorFlow (``benchmarks/_gemma_wheel.py``). This checks the whole
``gm.nn.Transformer`` (``nn.jit``-wrapped ``__call__``, its ``Output``) in an
environment with ``pip install gemma==3.3.0`` (TensorFlow through kauldron):
a tiny Gemma-3-like config (GQA, QK-norm, sliding window) trains one muonclip
step with the statistics collected, prints the routing report, and shows that
the ``nn.jit`` cache trap is refused.

Usage: ``python -m benchmarks.gemma_transformer``.
"""
import jax

import muonclip_jax as mc


def main() -> None:
  from gemma import gm  # noqa: PLC0415
  from gemma.gm.nn import _modules  # noqa: PLC0415

  kinds = (_modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL)
  cfg = gm.nn.config.TransformerConfig(
      num_embed=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=kinds, attn_logits_soft_cap=None, sliding_window_size=4,
      transpose_gating_einsum=True, use_qk_norm=True)
  model = gm.nn.Transformer(config=cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = mc.muonclip(0.0, tau=1e-3, layouts=mc.gemma_layouts(params))

  def loss_fn(params):
    with mc.gemma_max_logits():
      out, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    return out.logits.mean(), state["intermediates"]

  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  _, state = tx.update(grads, tx.init(params), params, max_logits=stats)
  print("statistics:", {"/".join(k): v.tolist()
                        for k, v in mc.collect_max_logits(stats).items()})
  print("heads clipped at tau=1e-3:", int(state[-1].num_clipped))
  print(mc.muon_routing(params))
  # The trap: a trace cached by nn.jit without the interceptor is refused.
  model2 = gm.nn.Transformer(config=cfg)
  model2.apply({"params": params}, tokens[:, :4], mutable=["intermediates"])
  try:
    with mc.gemma_max_logits():
      model2.apply({"params": params}, tokens[:, :4], mutable=["intermediates"])
    print("nn.jit trap: NOT DETECTED")
  except RuntimeError as e:
    print("nn.jit trap refused:", str(e).split(".")[0])


if __name__ == "__main__":
  main()
