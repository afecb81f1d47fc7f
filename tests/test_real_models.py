"""MuonClip on real third-party models (issue 16): Gemma, Equinox, hand-written JAX.

Each family goes through a real ``muonclip`` step at learning rate 0 (only
QK-Clip acts), on a tiny config, one compile per model. Checked against
independent references: the statistic against a brute-force max over the
library's own logits; after the step, each layer's logits recomputed on the
same inputs (clipped heads at ``tau``, cool heads unchanged); Muon's routing
leaf by leaf; and the lines a user changes against what the guide says.
Gemma's modules are the real ones, from the installed package or the pinned
3.3.0 wheel (see benchmarks/_gemma_wheel.py).
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muonclip_jax as mc
from benchmarks import real_models as rm

GUIDE = Path(__file__).parents[1] / "docs" / "guides" / "qk_clip_for_your_model.md"


def _documented_lines() -> dict[str, tuple[int, int]]:
  """``{family: (model lines, glue lines)}`` from the guide's summary table."""
  out = {}
  for line in GUIDE.read_text().splitlines():
    m = re.match(r"\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", line)
    if m:
      out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
  return out


def _check(row: rm.Row, family: str) -> None:
  assert row.stat_rel <= 1e-5, row
  assert row.n_clipped > 0 and row.n_cool > 0, row
  assert row.clipped_rel <= 1e-3, row
  assert row.cool_rel <= 1e-6, row
  assert row.routing_ok == row.routing_total, row.note
  assert _documented_lines()[family] == (row.model_lines, row.glue_lines), row


@pytest.fixture(scope="module")
def gemma():
  from benchmarks import _gemma_wheel  # noqa: PLC0415
  return _gemma_wheel.load()


def test_gemma(gemma):
  _check(rm.gemma_row(*gemma), "Gemma")


def test_gemma_nn_jit_trap_is_refused(gemma):
  modules, _ = gemma
  model = rm.gemma_model(modules)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  # Traced and cached by nn.jit without the interceptor (an eval step, say)...
  model.apply(params, tokens, mutable=["intermediates"])
  # ...so the same call inside the block reuses that trace: refused, not silent.
  with pytest.raises(RuntimeError, match="nn.jit"):
    with mc.gemma_max_logits():
      model.apply(params, tokens, mutable=["intermediates"])


def test_gemma_layouts_refuse_a_tree_without_gemma_attention():
  with pytest.raises(ValueError, match="no Gemma attention"):
    mc.gemma_layouts({"dense": {"kernel": jnp.zeros((4, 4))}})


def test_equinox():
  _check(rm.equinox_row(), "Equinox")


def test_equinox_statistics_errors():
  model = rm.equinox_model(jax.random.key(0))
  with pytest.raises(ValueError, match=r"expected \(batch\.\.\., 2, 4\)"):
    mc.equinox_max_logits(model, jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="1 attention modules"):
    mc.equinox_max_logits(model, [jnp.zeros((2, 4)), jnp.zeros((2, 4))])
  with pytest.raises(TypeError, match="MultiheadAttention"):
    mc.equinox_attention(model.embed, jnp.zeros((2, 4)), None, None)
  tree = mc.equinox_max_logits(model, jnp.arange(24.0).reshape(3, 2, 4))
  np.testing.assert_array_equal(tree["blocks"]["attn"]["max_logits"],
                                np.arange(24.0).reshape(3, 2, 4).max(0))


def test_hand_written():
  _check(rm.torch_row(), "Hand-written (PyTorch-style)")


def test_record_max_logits_refuses_parameters_it_cannot_name():
  params = {"attn": {"q_proj": {"weight": jnp.ones((4, 4))}}}
  with mc.max_logits_tape(params):
    with pytest.raises(ValueError, match="not \\(all\\) leaves"):
      mc.record_max_logits({"w": jnp.ones((4, 4))}, jnp.zeros((1, 2, 3, 3)))
  with mc.max_logits_tape(params) as tape:
    mc.record_max_logits(params["attn"], jnp.ones((1, 2, 3, 3)))
  assert set(tape.max_logits["attn"]) == {"max_logits"}


def test_maxtext_layouts_follow_the_config():
  class Config:
    attention_type, num_query_heads, scan_layers, param_scan_axis = "global", 4, True, 1
  layout = mc.maxtext_layouts(Config())["*"]
  assert {p.scan_axis for p in layout.params} == {1}
  assert [p.path for p in layout.params] == ["query/kernel", "key/kernel"]
  Config.attention_type, Config.q_lora_rank = "mla", 8
  Config.qk_nope_head_dim, Config.qk_rope_head_dim, Config.v_head_dim = 8, 4, 8
  Config.scan_layers = False
  layout = mc.maxtext_layouts(Config())["*"]
  assert layout.name == "maxtext_mla"
  assert {p.path for p in layout.params} == {"wq_b/kernel", "wkv_b/kernel"}
  assert {p.scan_axis for p in layout.params} == {None}
