"""QK-Clip layout presets for model families whose weights Flax's detection does not cover.

Each preset is the :class:`~muonclip_jax.QKLayout` of one family's attention,
so a user names the family instead of describing the parameters:

* :func:`torch_layout`: PyTorch-style ``q_proj``/``k_proj`` with ``(out, in)``
  ``weight`` matrices (``nn.Linear``; Hugging Face checkpoints, hand-written
  JAX ports, Equinox's ``Linear``): head ``h`` owns rows ``[h*d, (h+1)*d)``.
* :func:`maxtext_layouts`: MaxText's ``Attention`` (``query``/``key``
  ``DenseGeneral`` kernels ``(embed, heads, head_dim)``) and MLA
  (``wq_b``/``wkv_b``, or ``query`` when ``q_lora_rank == 0``), scanned with
  the layer axis at ``param_scan_axis`` or unscanned.

Gemma's layouts come from :func:`muonclip_jax.gemma_layouts`, Equinox's from
:func:`muonclip_jax.equinox_layouts`.
"""

from __future__ import annotations

from typing import Any

from muonclip_jax._qk_layouts import QKLayout, mla, separate_qk


def torch_layout(num_heads: int, num_kv_heads: int | None = None, *, query: str = "q_proj",
                 key: str = "k_proj", weight: str = "weight", bias: str | None = "bias",
                 name: str = "torch") -> QKLayout:
  """Separate query/key projections with ``(out, in)`` weights, heads major in ``out``.

  Args:
    num_heads: query heads.
    num_kv_heads: key heads (GQA/MQA; default ``num_heads``).
    query: the query projection's name (relative to the attention module).
    key: the key projection's name.
    weight: the weight's name inside each projection.
    bias: the bias's name (skipped when absent); ``None`` for no bias.
    name: the layout's label in error messages.

  Returns:
    A :class:`~muonclip_jax.QKLayout`; extra leading axes of a weight are
    stacked layer axes.

  Example:
    >>> import jax.numpy as jnp
    >>> import muonclip_jax as mc
    >>> layout = mc.torch_layout(num_heads=4, num_kv_heads=2)
    >>> [(p.path, p.role) for p in layout.params if not p.optional]
    [('q_proj/weight', 'query'), ('k_proj/weight', 'key')]
  """
  return separate_qk(query, key, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     merged_heads=True, kernel=weight, bias=bias,
                     weight_layout="out_in")._replace(name=name)


def maxtext_layouts(config: Any) -> dict[str, QKLayout]:
  """QK-Clip layouts for a MaxText model, from its config.

  MaxText sows its statistic (``max_logits``, ``[batch, heads]``) on the
  parameter-less ``attention_op`` child; :func:`muonclip_jax.qk_clip` matches
  it to the nearest ancestor that owns the query/key parameters and reduces
  the batch axis. This gives that ancestor's layout: ``query``/``key``
  kernels for MHA/GQA, ``wq_b`` (or ``query``)/``wkv_b`` for MLA, with the
  layer axis at ``param_scan_axis`` when ``scan_layers``.

  Args:
    config: MaxText's ``HyperParameters`` (``pyconfig.initialize(...)``) or
      any object with its attributes: ``attention_type``, ``num_query_heads``,
      ``scan_layers``, ``param_scan_axis``, and for MLA ``q_lora_rank``,
      ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``.

  Returns:
    ``{"*": QKLayout}`` for ``qk_clip(layouts=...)``.
  """
  scan_axis = int(config.param_scan_axis) if getattr(config, "scan_layers", False) else None
  if scan_axis == 0:
    scan_axis = None  # leading: the default
  heads = int(config.num_query_heads)
  if str(getattr(config, "attention_type", "global")).lower().endswith("mla"):
    q = "wq_b" if int(getattr(config, "q_lora_rank", 0)) > 0 else "query"
    layout = mla(q, "wkv_b", num_heads=heads, qk_nope_head_dim=int(config.qk_nope_head_dim),
                 qk_rope_head_dim=int(config.qk_rope_head_dim),
                 v_head_dim=int(config.v_head_dim), scan_axis=scan_axis)
    return {"*": layout._replace(name="maxtext_mla")}
  layout = separate_qk("query", "key", num_heads=heads, bias=None, scan_axis=scan_axis)
  return {"*": layout._replace(name="maxtext")}
