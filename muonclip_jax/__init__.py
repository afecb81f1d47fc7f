"""muonclip_jax: MuonClip for JAX."""
from muonclip_jax._coefficients import NSConfig, resolve_coefficients
from muonclip_jax._newton_schulz import orthogonalize

__all__ = ["NSConfig", "orthogonalize", "resolve_coefficients"]
