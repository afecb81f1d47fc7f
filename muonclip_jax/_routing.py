"""Which parameters Muon takes and which go to AdamW.

Muon is for hidden weight matrices. Moonlight (arXiv 2502.16982) and Kimi K2
(arXiv 2507.20534) train everything else with AdamW: embeddings, the LM head
(unembedding), normalisation gains, biases, and every scalar or vector.

:func:`default_param_labels` labels a parameter ``"adamw"`` when

* it has fewer than two dimensions (biases, norm scales, scalars, vectors),
  not counting a declared layer axis (``layer_axis``, see
  :mod:`muonclip_jax._layer_axis`);
* its leaf name is ``bias``, ``scale`` or ``embedding``;
* a component of its path names an embedding (contains ``embed``, or is
  ``wte``, ``wpe``, ``tok_emb*``, ``pos_emb*``; Gemma's ``embedder``, whose
  ``input_embedding`` is also its tied LM head, is one);
* a component names an LM head: ``lm_head``, ``logits_dense`` (MaxText,
  T5X), ``unembed``, ``unembedding``, ``output_layer`` (Megatron),
  ``output_projection`` (fairseq), ``out_head``, ``output_head``, ``to_logits``,
  ``vocab_proj``, ``vocab_projection``, ``logits``, ``classifier``; or, outside
  any block (no ``layers``/``blocks``/``h``/attention/MLP component and no list
  index above it), ``head`` or ``output`` (Meta's Llama ``output.weight``,
  Equinox models' ``head``). BERT's ``layer/0/attention/output/dense`` stays
  a hidden matrix; or
* a component names a norm (contains ``norm``, or is ``ln``, ``ln_f``,
  ``ln_1``, ..., ``*_ln``);

and ``"muon"`` otherwise. Override it with a label tree or a callable; see
:func:`muonclip_jax.muon`. :func:`muonclip_jax.muon_routing` prints the label
of every leaf with the rule that chose it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from muonclip_jax._layer_axis import LayerAxisLike, check_layer_axis, stack_axis
from muonclip_jax._paths import lower_components, path_str

MUON = "muon"
ADAMW = "adamw"
LABELS = (MUON, ADAMW)

_EMBED = re.compile(r"embed|^wte$|^wpe$|^tok_emb|^pos_emb")
_HEAD = re.compile(
    r"^(lm_head|logits_dense|logit_dense|unembed|unembedding|unembed_proj|output_layer|"
    r"output_projection|out_head|output_head|to_logits|vocab_proj|vocab_projection|logits|"
    r"classifier)$")
# Generic names that are an LM head only outside a block.
_TOP_HEAD = re.compile(r"^(head|output)$")
_BLOCK = re.compile(r"^\d+$|^(layers?|blocks?|h)(_\d+)?$|attn|attention|mlp|ffn|ffw|"
                    r"feed_?forward|encoderblock|decoderlayer|encoderlayer")
_NORM = re.compile(r"norm|^ln$|^ln_|_ln$|^ln\d")
_ADAMW_LEAVES = ("bias", "scale", "embedding")


def label_rule(path: str, ndim: int) -> tuple[str, str]:
  """``("muon" | "adamw", rule)`` for one parameter (see the module docstring).

  Args:
    path: the ``'/'``-joined parameter path.
    ndim: the parameter's rank, not counting a declared layer axis.

  Returns:
    The label and the rule that chose it, in words.
  """
  if ndim < 2:
    return ADAMW, "rank < 2"
  comps = lower_components(path)
  if comps and comps[-1] in _ADAMW_LEAVES:
    return ADAMW, f"leaf name {comps[-1]!r}"
  for i, c in enumerate(comps):
    if _EMBED.search(c):
      return ADAMW, f"name: embedding {c!r}"
    if _HEAD.match(c):
      return ADAMW, f"name: LM head {c!r}"
    if _TOP_HEAD.match(c) and not any(_BLOCK.search(a) for a in comps[:i]):
      return ADAMW, f"name: LM head {c!r} (outside any block)"
    if _NORM.search(c):
      return ADAMW, f"name: norm {c!r}"
  return MUON, "hidden matrix"


def default_label(path: str, ndim: int) -> str:
  """``"muon"`` or ``"adamw"`` for one parameter (see the module docstring).

  Args:
    path: the ``'/'``-joined parameter path.
    ndim: the parameter's rank (not counting a declared layer axis).

  Returns:
    ``"muon"`` or ``"adamw"``.

  Example:
    >>> from muonclip_jax import default_label
    >>> default_label("blocks/0/attn/query/kernel", 3), default_label("embed/embedding", 2)
    ('muon', 'adamw')
    >>> default_label("decoder/logits_dense/kernel", 2)
    'adamw'
  """
  return label_rule(path, ndim)[0]


def matrix_rank(path: str, shape: tuple[int, ...], layer_axis: LayerAxisLike) -> int:
  """The rank of a leaf without its declared layer axis (if any)."""
  if len(shape) < 2:
    return len(shape)
  return len(shape) - (stack_axis(path, shape, layer_axis) is not None)


def default_param_labels(params: Any, *, layer_axis: LayerAxisLike = None) -> Any:
  """A tree of ``"muon"``/``"adamw"`` labels with ``params``'s structure.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    layer_axis: the declared layer axis of scanned stacks (see
      :func:`muonclip_jax.muon`); a stacked vector counts as rank 1.

  Returns:
    The labels, one per leaf, by :func:`default_label`.

  References:
    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025 (AdamW for embeddings, head,
    norms and vectors).
  """
  layer_axis = check_layer_axis(layer_axis)

  def label(p, x):
    path = path_str(p)
    shape = tuple(x.shape)
    return default_label(path, matrix_rank(path, shape, layer_axis))

  return jax.tree_util.tree_map_with_path(label, params)


def resolve_labels(params: Any, param_labels: Any | Callable[[Any], Any] | None, *,
                   layer_axis: LayerAxisLike = None) -> Any:
  """Labels for ``params``: the default, a given tree, or a callable's tree.

  Raises:
    ValueError: a label other than ``"muon"``/``"adamw"``, or a parameter of
      rank < 2 labelled ``"muon"``; the message names the parameter's path.
  """
  if param_labels is None:
    return default_param_labels(params, layer_axis=layer_axis)
  labels = param_labels(params) if callable(param_labels) else param_labels

  def check(path, label, x):
    name = path_str(path)
    if label not in LABELS:
      raise ValueError(f"param_labels at {name}: expected 'muon' or 'adamw', got {label!r}")
    if label == MUON and len(x.shape) < 2:
      raise ValueError(f"param_labels at {name}: a parameter of shape {tuple(x.shape)} "
                       "(rank < 2) cannot be trained by Muon; label it 'adamw'")
    return label

  try:
    return jax.tree_util.tree_map_with_path(check, labels, params)
  except ValueError as e:
    if "param_labels at" in str(e):
      raise
    raise ValueError(f"param_labels: the label tree does not match the parameters' "
                     f"structure: {e}") from e
