"""MuonClip on MaxText's real NNX decoder: llama-style and DeepSeek MLA, scanned and not.

MaxText needs Python >= 3.12, so this is not part of the test suite. Run it in
a 3.12 virtual environment::

  python3.12 -m venv /tmp/mt && /tmp/mt/bin/pip install maxtext==0.2.5 \\
      jax flax optax omegaconf pydantic absl-py jaxtyping etils packaging \\
      pathwaysutils jinja2 qwix aqtp tensorboardx pillow tiktoken sentencepiece sympy \\
      transformers chex orbax-checkpoint
  /tmp/mt/bin/pip install --no-deps -e .      # this repository
  /tmp/mt/bin/python -m benchmarks.maxtext_models            # --write: RESULTS.md

(``pip install maxtext==0.2.5`` declares no dependencies outside its extras;
the list above is what importing its model code needs, on CPU.)

Per configuration (llama-style GQA and MLA; unscanned, scanned with
``param_scan_axis`` 0 and 1) it builds MaxText's ``NNXDecoder`` with random
weights, runs one ``muonclip`` step at learning rate 0 (only QK-Clip acts),
and measures: the statistic MaxText sows (``attention_op/max_logits``,
``[batch, heads]``, read with ``nnx.pop``) against a brute-force max over
the logits MaxText's own ``AttentionOp.qk_product`` computes; the clipped and
cool heads after the step, recomputed on the same layer inputs; Muon's
routing leaf by leaf.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import muonclip_jax as mc

B, T = 2, 8


def config(attention: str, scan: bool, scan_axis: int) -> Any:
  import maxtext  # noqa: PLC0415
  from maxtext.configs import pyconfig  # noqa: PLC0415

  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  kw = dict(per_device_batch_size=1.0, run_name="muonclip_probe", enable_checkpointing=False,
            base_num_decoder_layers=2, attention="dot_product", max_target_length=T,
            base_emb_dim=64, base_num_query_heads=4, base_num_kv_heads=2, base_mlp_dim=128,
            head_dim=16, max_prefill_predict_length=4, scan_layers=scan,
            param_scan_axis=scan_axis, vocab_size=128, dtype="float32",
            weight_dtype="float32", matmul_precision="highest", dropout_rate=0.0)
  if attention == "mla":
    kw.update(attention_type="mla", decoder_block="deepseek", first_num_dense_layers=2,
              q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
              v_head_dim=16, base_num_kv_heads=4, use_qk_clip=True, num_experts=1,
              base_moe_mlp_dim=128)
  return pyconfig.initialize([sys.argv[0], base], override_model_config=True, **kw)


def build(cfg: Any) -> Any:
  from jax.sharding import Mesh  # noqa: PLC0415
  from maxtext.layers import quantizations  # noqa: PLC0415
  from maxtext.models import models  # noqa: PLC0415
  from maxtext.utils import maxtext_utils  # noqa: PLC0415

  mesh = Mesh(maxtext_utils.create_device_mesh(cfg), cfg.mesh_axes)
  quant = quantizations.configure_quantization(cfg)
  return models.Transformer(cfg, mesh, quant, rngs=nnx.Rngs(params=0, dropout=1))


def probe(model: Any, tokens: Any, pos: Any, seg: Any) -> list[np.ndarray]:
  """Per attention layer, the max per head of MaxText's own masked logits.

  The logits are the output of MaxText's ``apply_mask_to_logits`` (``[b, n_kv,
  g, t, s]``, after ``qk_product``, its scale, soft-cap and mask), sent out of
  the remat/scan traces in layer order with an ordered debug callback.
  """
  from maxtext.layers import attention_op  # noqa: PLC0415

  brute: list[np.ndarray] = []
  orig_mask = attention_op.apply_mask_to_logits

  def mask(logits, m):
    out = orig_mask(logits, m)
    if out.ndim == 5:
      per_head = jnp.max(out.astype(jnp.float32), axis=(-2, -1)).reshape(out.shape[0], -1)
      jax.debug.callback(lambda v: brute.append(np.asarray(v).max(0)), per_head,
                         ordered=True)
    return out

  attention_op.apply_mask_to_logits = mask
  try:
    model(tokens, pos, decoder_segment_ids=seg, enable_dropout=False)
    jax.effects_barrier()
  finally:
    attention_op.apply_mask_to_logits = orig_mask
  nnx.pop(model, nnx.Intermediate)
  return brute


def _layer_of(path: tuple[str, ...]) -> int | None:
  for c in path:
    if c.startswith(("layers_", "dense_layers_")) and c.rsplit("_", 1)[1].isdigit():
      return int(c.rsplit("_", 1)[1])
  return None


def only_layer(old: Any, new: Any, layer: int, scan_axis: int | None) -> Any:
  """``old`` parameters with layer ``layer``'s entries taken from ``new``."""
  def pick(path, o, n):
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if scan_axis is not None and any(c in ("layers", "dense_layers") for c in names):
      idx = jnp.arange(o.shape[scan_axis]).reshape(
          [-1 if a == scan_axis else 1 for a in range(o.ndim)])
      return jnp.where(idx == layer, n, o)
    return n if _layer_of(names) == layer else o
  return jax.tree_util.tree_map_with_path(pick, old, new)


def expect(path: str, shape: tuple[int, ...], scan_axis: int | None) -> tuple[str, Any]:
  """The Muon view a MaxText parameter should get: ``(label, (batch, fan_in, fan_out))``."""
  comps = path.split("/")
  stacked = scan_axis is not None and any(c in ("layers", "dense_layers") for c in comps)
  per = list(shape)
  lead = per.pop(scan_axis) if stacked else 1
  if (len(per) < 2 or any(w in path for w in ("norm", "embed", "logits_dense"))
      or comps[-1] == "scale"):
    return "adamw", None
  if comps[-2] == "out":                      # (N, Hd, E)
    return "muon", (lead, per[0] * per[1], per[2])
  return "muon", (lead, per[0], int(np.prod(per[1:])))


def run(attention: str, scan: bool, scan_axis: int) -> dict[str, Any]:
  cfg = config(attention, scan, scan_axis)
  model = build(cfg)
  if attention != "mla":
    mc.maxtext_record_max_logits(model)  # glue: llama-style (MaxText records only for MLA)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.ones((B, T), jnp.int32)

  brute = probe(model, tokens, pos, seg)
  old = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  allv = np.sort(np.concatenate(brute))
  tau = float(allv[len(allv) // 2 - 1] + allv[len(allv) // 2]) / 2
  layer_axis = cfg.param_scan_axis if cfg.scan_layers else None
  tx = mc.muonclip(0.0, tau=tau, layouts=mc.maxtext_layouts(cfg), layer_axis=layer_axis)  # glue
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model):
    logits = model(tokens, pos, decoder_segment_ids=seg, enable_dropout=False)
    stats = nnx.pop(model, nnx.Intermediate)  # MaxText assigns; nnx.capture sees nothing
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return loss.mean(), stats

  @nnx.jit
  def step(model, optimizer):
    (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, max_logits=stats)
    return stats

  stats = step(model, optimizer)
  new = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  axis = cfg.param_scan_axis if cfg.scan_layers else None
  after = []
  for layer in range(len(brute)):   # each layer's new q/k on that layer's old inputs
    nnx.update(model, only_layer(old, new, layer, axis))
    after.append(probe(model, tokens, pos, seg)[layer])
  clipped, cool, n_hot, n_cool = 0.0, 0.0, 0, 0
  for s0, s1 in zip(brute, after, strict=True):
    hot = s0 > tau
    n_hot, n_cool = n_hot + int(hot.sum()), n_cool + int((~hot).sum())
    if hot.any():
      clipped = max(clipped, float(np.max(np.abs(s1[hot] - tau) / tau)))
    if (~hot).any():
      cool = max(cool, float(np.max(np.abs(s1[~hot] - s0[~hot]) / np.abs(s0[~hot]))))
  report = mc.muon_routing(new, layer_axis=layer_axis)
  bad = [f"{leaf.path} {leaf.shape}: {leaf.label} {leaf.matrix}" for leaf in report.leaves
         if (lambda e: leaf.label != e[0] or (e[0] == "muon" and tuple(leaf.matrix) != e[1]))(
             expect(leaf.path, leaf.shape, axis))]
  collected = {"/".join(k): np.asarray(v) for k, v in mc.collect_max_logits(stats).items()}
  flat = []
  for _, v in sorted(collected.items()):
    v = v.reshape(-1, B, v.shape[-1]) if scan else v.reshape(1, B, -1)
    flat += list(v.max(axis=1))
  stat_err = max(float(np.max(np.abs(a - b) / np.abs(b))) for a, b in zip(flat, brute,
                                                                           strict=True))
  return dict(config=f"{attention}, " + (f"scanned, param_scan_axis={scan_axis}" if scan
                                         else "unscanned"),
              stat_rel=stat_err, clipped=clipped, n_hot=n_hot, cool=cool, n_cool=n_cool,
              routing=f"{len(report.leaves) - len(bad)}/{len(report.leaves)}", bad=bad,
              glue=2 if attention != "mla" else 1)


def main(argv: list[str] | None = None) -> None:
  from importlib.metadata import version  # noqa: PLC0415

  from benchmarks import _common  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
  args = p.parse_args(argv)
  rows = []
  for attention in ("llama", "mla"):
    for scan, axis in ((False, 0), (True, 0), (True, 1)):
      try:
        r = run(attention, scan, axis)
        print(r)
        rows.append([f"MaxText ({r['config']})", 0, r["glue"], f"{r['stat_rel']:.1e}",
                     f"{r['clipped']:.1e} ({r['n_hot']} heads)",
                     f"{r['cool']:.1e} ({r['n_cool']} heads)", r["routing"]])
      except Exception as e:  # noqa: BLE001 - report every configuration
        print(attention, scan, axis, "FAILED:", type(e).__name__, str(e)[:2000])
        rows.append([f"MaxText ({attention}, scan={scan}, axis={axis})", "-", "-",
                     f"FAILED: {type(e).__name__}", "-", "-", "-"])
  md = (f"Python {sys.version.split()[0]}, maxtext {version('maxtext')}, jax "
        f"{jax.__version__}, flax {version('flax')}; {_common.machine()}. Statistic: "
        "MaxText's own `attention_op/max_logits` (`[batch, heads]`, via `nnx.pop`) "
        "against the max of the masked logits its `apply_mask_to_logits` returns; "
        "after the step each layer is recomputed with only its own new weights, so on "
        "its old inputs.\n\n" + _common.table(
            ["configuration", "model lines changed", "glue lines",
             "statistic vs brute force (rel)", "clipped heads: distance from tau (rel)",
             "cool heads: change (rel)", "Muon routing checked"], rows))
  print(md)
  if args.write:
    _common.write_section("MuonClip on MaxText (issue 16)", md)


if __name__ == "__main__":
  main()
