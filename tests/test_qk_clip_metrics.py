"""qk_clip_metrics: QK-Clip's telemetry found under optax wrappers and nnx.Optimizer."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import muonclip_jax as mc


def _params():
  attn = {n: {"kernel": jnp.ones((8, 2, 4))} for n in ("query", "key", "value")}
  attn["out"] = {"kernel": jnp.ones((2, 4, 8))}
  return {"layer0": {"attn": attn}, "layer1": {"attn": attn}}


STATS = {"layer0": {"attn": {"max_logits": (jnp.array([3.0, 0.5]),)}},
         "layer1": {"attn": {"max_logits": (jnp.array([jnp.nan, 2.0]),)}}}
WRAPPERS = {
    "plain": lambda: mc.muonclip(1e-3, tau=1.0),
    "inject_hyperparams": lambda: optax.inject_hyperparams(mc.muonclip)(
        learning_rate=1e-3, tau=1.0),
    "apply_if_finite": lambda: optax.apply_if_finite(mc.muonclip(1e-3, tau=1.0), 3),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), mc.muonclip(1e-3, tau=1.0)),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_metrics_are_the_state_flattened(wrapper):
  params = _params()
  tx = WRAPPERS[wrapper]()
  state = tx.init(params)
  before = mc.qk_clip_metrics(state)
  assert float(before["qk_clip/max_logit"]) == -jnp.inf
  _, state = tx.update(params, state, params, max_logits=STATS)
  m = mc.qk_clip_metrics(state)
  assert set(m) == {"qk_clip/max_logit", "qk_clip/max_logit/layer0/attn",
                    "qk_clip/max_logit/layer1/attn", "qk_clip/heads_clipped",
                    "qk_clip/heads_clipped_total", "qk_clip/skipped", "qk_clip/skipped_total"}
  assert all(jnp.ndim(v) == 0 for v in m.values())
  assert float(m["qk_clip/max_logit/layer0/attn"]) == 3.0
  # Head 0 of layer 1 is NaN: skipped, never clipped; head 1 (2.0 > tau) is clipped.
  assert int(m["qk_clip/heads_clipped"]) == 2 and int(m["qk_clip/skipped"]) == 1
  assert int(m["qk_clip/heads_clipped_total"]) == 2 and int(m["qk_clip/skipped_total"]) == 1


def test_nnx_optimizer_state():
  model = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                 rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mc.muonclip(1e-3, tau=1.0), wrt=nnx.Param)
  m = mc.qk_clip_metrics(optimizer.opt_state)
  assert float(m["qk_clip/max_logit"]) == -jnp.inf and int(m["qk_clip/heads_clipped"]) == 0


def test_no_or_two_states_is_an_error():
  params = _params()
  with pytest.raises(ValueError, match="found 0"):
    mc.qk_clip_metrics(optax.adamw(1e-3).init(params))
  two = optax.chain(mc.qk_clip(1.0), mc.qk_clip(1.0)).init(params)
  with pytest.raises(ValueError, match="found 2"):
    mc.qk_clip_metrics(two)


def test_metrics_jit():
  params = _params()
  tx = mc.muonclip(1e-3, tau=1.0)
  state = tx.init(params)
  _, state = tx.update(params, state, params, max_logits=STATS)
  chex_like = jax.jit(mc.qk_clip_metrics)(state)
  assert float(chex_like["qk_clip/max_logit"]) == 3.0


def test_one_update_call_serves_muon_adamw_and_muonclip():
  """No branch on the optimizer's name: all three take (and two ignore) max_logits=."""
  params = _params()
  for tx in (mc.muon(1e-3), optax.adamw(1e-3), mc.muonclip(1e-3, tau=1.0)):
    state = tx.init(params)
    updates, _ = tx.update(params, state, params, max_logits=STATS)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
