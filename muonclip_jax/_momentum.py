"""Heavy-ball momentum with an optional Nesterov look-ahead (Muon's first stage).

Kimi K2 (arXiv 2507.20534, Algorithm 1) and Moonlight (arXiv 2502.16982):

.. math::
  M_t = \\mu M_{t-1} + G_t, \\qquad
  \\text{direction} = G_t + \\mu M_t \\ (\\text{Nesterov}) \\ \\text{or} \\ M_t.

The EMA form ``M_t = \\mu M_{t-1} + (1-\\mu) G_t`` used by torch and optax
differs by a constant factor, which the Frobenius normalisation of
Newton–Schulz removes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def momentum_step(grad: jax.Array, mu: jax.Array, beta: jax.typing.ArrayLike,
                  nesterov: bool) -> tuple[jax.Array, jax.Array]:
  """Returns ``(new_mu, direction)`` for one leaf; ``new_mu`` keeps ``mu``'s dtype."""
  g = grad.astype(jnp.promote_types(grad.dtype, mu.dtype))
  new_mu = beta * mu.astype(g.dtype) + g
  direction = g + beta * new_mu if nesterov else new_mu
  return new_mu.astype(mu.dtype), direction
