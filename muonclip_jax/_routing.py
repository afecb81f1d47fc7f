"""Which parameters Muon takes and which go to AdamW.

Muon is for hidden weight matrices. Moonlight (arXiv 2502.16982) and Kimi K2
(arXiv 2507.20534) train everything else with AdamW: embeddings, the LM head
(unembedding), normalisation gains, biases, and every scalar or vector.

:func:`default_param_labels` labels a parameter ``"adamw"`` when

* it has fewer than two dimensions (biases, norm scales, scalars, vectors);
* its leaf name is ``bias``, ``scale`` or ``embedding``; or
* a component of its path names an embedding (contains ``embed``, ``wte``,
  ``wpe``), a head (``lm_head``, ``head``, ``unembed``, ``unembedding``,
  ``output``, ``classifier``, ``logits``) or a norm (contains ``norm``, or is
  ``ln``, ``ln_f``, ``ln_1``, ..., ``*_ln``);

and ``"muon"`` otherwise. Override it with a label tree or a callable; see
:func:`muonclip_jax.muon`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from muonclip_jax._paths import lower_components, path_str

MUON = "muon"
ADAMW = "adamw"
LABELS = (MUON, ADAMW)

_EMBED = re.compile(r"embed|^wte$|^wpe$|^tok_emb|^pos_emb")
_HEAD = re.compile(r"^(lm_head|head|unembed|unembedding|output|classifier|logits|output_head)$")
_NORM = re.compile(r"norm|^ln$|^ln_|_ln$|^ln\d")
_ADAMW_LEAVES = ("bias", "scale", "embedding")


def default_label(path: str, ndim: int) -> str:
  """``"muon"`` or ``"adamw"`` for one parameter (see the module docstring).

  Args:
    path: the ``'/'``-joined parameter path.
    ndim: the parameter's rank.

  Returns:
    ``"muon"`` or ``"adamw"``.

  Example:
    >>> from muonclip_jax import default_label
    >>> default_label("blocks/0/attn/query/kernel", 3), default_label("embed/embedding", 2)
    ('muon', 'adamw')
  """
  if ndim < 2:
    return ADAMW
  comps = lower_components(path)
  if comps and comps[-1] in _ADAMW_LEAVES:
    return ADAMW
  for c in comps:
    if _EMBED.search(c) or _HEAD.match(c) or _NORM.search(c):
      return ADAMW
  return MUON


def default_param_labels(params: Any) -> Any:
  """A tree of ``"muon"``/``"adamw"`` labels with ``params``'s structure.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    The labels, one per leaf, by :func:`default_label`.

  References:
    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025 (AdamW for embeddings, head,
    norms and vectors).
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: default_label(path_str(p), len(x.shape)), params)


def resolve_labels(params: Any, param_labels: Any | Callable[[Any], Any] | None) -> Any:
  """Labels for ``params``: the default, a given tree, or a callable's tree.

  Raises:
    ValueError: a label other than ``"muon"``/``"adamw"``, or a parameter of
      rank < 2 labelled ``"muon"``; the message names the parameter's path.
  """
  if param_labels is None:
    return default_param_labels(params)
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
