"""MaxText (NNX): make every ``AttentionOp`` record its max logits, no model change.

MaxText's ``AttentionOp`` can record the per-head max logit itself
(``record_max_logits=True``: an ``nnx.Intermediate`` named ``max_logits``,
``[batch, heads]``, on the parameter-less ``attention_op`` child), but only
MLA asks for it, and only with ``use_qk_clip=True``, which its config refuses
for any other ``attention_type``. :func:`maxtext_record_max_logits` switches it
on for every ``AttentionOp`` of a built model, llama-style included, by giving
each instance a subclass whose ``__call__`` passes ``record_max_logits=True``
(NNX modules are plain Python objects; the parameters do not change).

Read the statistics with ``nnx.pop(model, nnx.Intermediate)`` after the
forward pass: MaxText *assigns* the Intermediate (``self.max_logits =
nnx.Intermediate(...)``) instead of calling ``sow``, so ``nnx.capture``
returns ``{}``. :func:`muonclip_jax.qk_clip` matches ``attention_op`` to its
nearest ancestor with query/key parameters and max-reduces the batch axis.
"""

from __future__ import annotations

from typing import Any

_RECORDING: dict[type, type] = {}


def _recording_class(cls: type) -> type:
  if cls not in _RECORDING:
    def __call__(self, *args, **kwargs):  # noqa: N807 - the wrapped module's call
      kwargs["record_max_logits"] = True
      return cls.__call__(self, *args, **kwargs)
    _RECORDING[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
  return _RECORDING[cls]


def maxtext_record_max_logits(model: Any) -> int:
  """Makes every MaxText ``AttentionOp`` in ``model`` record ``max_logits``.

  Args:
    model: a MaxText NNX model (``maxtext.models.models.Transformer``,
      ``NNXDecoder``, or any module holding ``AttentionOp`` children).

  Returns:
    The number of ``AttentionOp`` modules switched on.

  Raises:
    ImportError: MaxText is not installed.
    ValueError: the model has no ``AttentionOp``, or one soft-caps its logits
      (MaxText records the max after the cap; QK-Clip needs it before).
  """
  from flax import nnx  # noqa: PLC0415
  try:
    from maxtext.layers.attention_op import AttentionOp  # noqa: PLC0415 (optional)
  except ImportError as e:
    raise ImportError("maxtext_record_max_logits needs MaxText (Python >= 3.12: "
                      "pip install maxtext)") from e
  n = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, AttentionOp):
      if getattr(node, "attn_logits_soft_cap", None):
        raise ValueError(
            f"maxtext_record_max_logits: the AttentionOp at "
            f"{'/'.join(map(str, path)) or '<root>'!r} soft-caps its logits "
            f"(attn_logits_soft_cap={node.attn_logits_soft_cap}) and MaxText records the "
            f"max after the cap; QK-Clip needs it before (Kimi K2, §2.1), so the clip "
            f"would act on the wrong value. Disable the soft-cap to use QK-Clip.")
      if type(node) not in _RECORDING.values():
        node.__class__ = _recording_class(type(node))
      n += 1
  if not n:
    raise ValueError("maxtext_record_max_logits: the model has no MaxText AttentionOp")
  return n
