"""muonclip_jax: MuonClip for JAX.

Data flow, one module each: momentum (``_momentum``) -> orthogonalise
(``_newton_schulz``) -> scale (``_shape_scaling``) -> decay and learning rate
(``_muon``, through optax) -> QK-Clip (``_qk_clip``).
"""

from muonclip_jax._coefficients import PRESETS, NSConfig, resolve_coefficients
from muonclip_jax._dimensions import MuonDimensionNumbers, default_dimension_numbers
from muonclip_jax._muon import ScaleByMuonState, muon, scale_by_muon
from muonclip_jax._newton_schulz import orthogonalize
from muonclip_jax._routing import default_label, default_param_labels

__all__ = [
    "PRESETS",
    "MuonDimensionNumbers",
    "NSConfig",
    "ScaleByMuonState",
    "default_dimension_numbers",
    "default_label",
    "default_param_labels",
    "muon",
    "orthogonalize",
    "resolve_coefficients",
    "scale_by_muon",
]
