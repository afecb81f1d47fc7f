"""muonclip_jax: MuonClip for JAX.

Data flow, one module each: momentum (``_momentum``) -> orthogonalise
(``_newton_schulz``; on a mesh ``_sharding``, placed by ``_mesh_placement``)
-> scale (``_shape_scaling``) -> decay and learning rate (``_muon``, through
optax) -> QK-Clip (``_qk_clip``; statistics gathered by ``_qk_statistics``,
layers found by ``_qk_discovery``, factors by ``_qk_factors``; telemetry
``_qk_clip_metrics``). Parameter names: ``_paths``; which leaves Muon takes
and how it views them: ``_routing``, ``_dimensions``, ``_layer_axis``, printed
by ``_routing_report``.

The house drawing: modules by layer; an import only runs down or sideways,
never up, and there is no cycle (``tests/test_architecture.py`` checks both
against the same table)::

  5  __init__ (the public API)
  4  _muonclip
  3  _muon  _qk_clip  _qk_clip_metrics
  2  _mesh_plan  _sharding  _mesh_cost  _routing_report
     _qk_statistics  _qk_discovery  _qk_factors
     _presets  _equinox  _gemma  _maxtext  _tape (adapters for other libraries)
  1  _momentum  _newton_schulz  _shape_scaling  _dimensions  _routing
     _mesh_placement  _qk_layouts  _attention  _flash_attention
  0  _paths  _statistic  _coefficients  _layer_axis  _view_sharding  _tokamax
     _checkpoint

The attention side (``_attention``, ``_flash_attention``) produces the
statistic and the optimizer side (``_qk_clip``) consumes it; they meet only
in ``_statistic``.
"""

from muonclip_jax._attention import (
  MaxLogitMultiHeadAttention,
  MaxLogitMultiHeadDotProductAttention,
  dot_product_attention,
  head_max_logits,
  max_logits_blockwise,
  sow_max_logits,
)
from muonclip_jax._checkpoint import (
  CheckpointError,
  make_checkpoint_manager,
  restore_checkpoint,
  restore_latest_valid,
  save_checkpoint,
  verify_checkpoint,
)
from muonclip_jax._coefficients import PRESETS, NSConfig, resolve_coefficients
from muonclip_jax._dimensions import MuonDimensionNumbers, default_dimension_numbers
from muonclip_jax._equinox import (
  equinox_attention,
  equinox_layout,
  equinox_layouts,
  equinox_max_logits,
)
from muonclip_jax._flash_attention import flash_attention
from muonclip_jax._gemma import gemma_layouts, gemma_max_logits
from muonclip_jax._maxtext import maxtext_record_max_logits
from muonclip_jax._mesh_plan import MuonShardingPlan, muon_sharding_summary, plan_muon_sharding
from muonclip_jax._muon import ScaleByMuonState, muon, scale_by_muon
from muonclip_jax._muonclip import muonclip
from muonclip_jax._newton_schulz import NewtonSchulz, orthogonalize
from muonclip_jax._presets import maxtext_layouts, torch_layout
from muonclip_jax._qk_clip import QKClipState, qk_clip
from muonclip_jax._qk_clip_metrics import qk_clip_metrics
from muonclip_jax._qk_layouts import (
  QKLayout,
  QKParam,
  flax_attention,
  fused_qkv,
  mla,
  qk_norm,
  separate_qk,
)
from muonclip_jax._qk_statistics import (
  accumulate_max_logits,
  collect_max_logits,
  reduce_max_logits,
)
from muonclip_jax._routing import default_label, default_param_labels
from muonclip_jax._routing_report import MuonRouting, RoutedLeaf, muon_routing
from muonclip_jax._sharding import mesh_orthogonalizer
from muonclip_jax._tape import MaxLogitsTape, max_logits_tape, record_max_logits

__all__ = [
    "accumulate_max_logits",
    "CheckpointError",
    "collect_max_logits",
    "default_dimension_numbers",
    "default_label",
    "default_param_labels",
    "dot_product_attention",
    "equinox_attention",
    "equinox_layout",
    "equinox_layouts",
    "equinox_max_logits",
    "flax_attention",
    "flash_attention",
    "fused_qkv",
    "gemma_layouts",
    "gemma_max_logits",
    "head_max_logits",
    "make_checkpoint_manager",
    "max_logits_tape",
    "max_logits_blockwise",
    "MaxLogitMultiHeadAttention",
    "MaxLogitMultiHeadDotProductAttention",
    "MaxLogitsTape",
    "maxtext_layouts",
    "maxtext_record_max_logits",
    "mesh_orthogonalizer",
    "mla",
    "muon",
    "muon_routing",
    "muon_sharding_summary",
    "muonclip",
    "MuonDimensionNumbers",
    "MuonRouting",
    "MuonShardingPlan",
    "NewtonSchulz",
    "NSConfig",
    "orthogonalize",
    "plan_muon_sharding",
    "PRESETS",
    "qk_clip",
    "qk_clip_metrics",
    "qk_norm",
    "QKClipState",
    "QKLayout",
    "QKParam",
    "record_max_logits",
    "reduce_max_logits",
    "resolve_coefficients",
    "restore_checkpoint",
    "restore_latest_valid",
    "RoutedLeaf",
    "save_checkpoint",
    "scale_by_muon",
    "ScaleByMuonState",
    "separate_qk",
    "sow_max_logits",
    "torch_layout",
    "verify_checkpoint",
]
