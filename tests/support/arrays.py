"""Small helpers shared by test files (import-safe: no jax set-up here)."""

import jax
import jax.numpy as jnp
import numpy as np


def rand(rng: np.random.Generator, shape, scale: float = 1.0) -> jax.Array:
  """A float32 array of standard normals times ``scale``."""
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def causal_mask(n: int) -> jax.Array:
  """``[n, n]`` boolean lower-triangular mask (``True`` is attended)."""
  return jnp.tril(jnp.ones((n, n), jnp.bool_))
