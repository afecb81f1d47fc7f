"""Newton–Schulz kernel speed against standard NS's own matmul bound.

For each GPT-2-small shape, the *matmul bound* of standard Newton–Schulz is
``steps x (t(X X^T) + t(A A) + t(B X))``, each product timed alone, jitted, in
the same run. The figure is ``bound / t(orthogonalize)``: 1.0 means as fast as
standard NS's matmuls alone; above 1 needs fewer FLOPs (the Gram path).
``optax.contrib.muon``'s Newton–Schulz is timed beside it, same coefficients
and steps.

Run: ``python -m benchmarks.newton_schulz [--rounds 7] [--dtype float32]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib._muon import orthogonalize_via_newton_schulz

from benchmarks._common import machine, median, median_ratio, paired_times, table, write_section
from muonclip_jax import orthogonalize
from muonclip_jax._coefficients import KELLER
from muonclip_jax._newton_schulz import choose_method, newton_schulz_flops

SHAPES = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
TARGETS = {(768, 768): 0.95, (768, 2304): 1.35, (768, 3072): 1.5, (3072, 768): 1.5}
STEPS = 5


def _mm(spec: str):
  return jax.jit(lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32
                                         ).astype(a.dtype))


def measure_shape(m: int, n: int, dt: jnp.dtype, rounds: int, rng: np.random.Generator
                  ) -> list[object]:
  """One table row: the matmul bound and the three kernels, timed round by round."""
  x = jnp.asarray(rng.standard_normal((m, n)), dt)
  s, big = min(m, n), max(m, n)
  wide = jnp.asarray(rng.standard_normal((s, big)), dt)
  sq = jnp.asarray(rng.standard_normal((s, s)), dt)
  gram, prod = _mm("ij,kj->ik"), _mm("ij,jk->ik")
  ours = jax.jit(lambda x: orthogonalize(x, dtype=dt))
  std = jax.jit(lambda x: orthogonalize(x, dtype=dt, method="standard"))
  coeffs = jnp.asarray(KELLER, dt)
  opt = jax.jit(lambda x: orthogonalize_via_newton_schulz(x, coeffs, STEPS))
  t = paired_times([lambda: gram(wide, wide), lambda: prod(sq, sq), lambda: prod(sq, wide),
                    lambda: ours(x), lambda: std(x), lambda: opt(x)], rounds=rounds)
  bound = [STEPS * (a + b + c) for a, b, c in zip(t[0], t[1], t[2])]
  r_ours, r_std, r_opt = (median_ratio(bound, t[i]) for i in (3, 4, 5))
  path = choose_method(m, n, STEPS)
  flop_ratio = newton_schulz_flops(m, n, STEPS, "standard") / newton_schulz_flops(
      m, n, STEPS, path)
  target = TARGETS[(m, n)]
  print(f"{m}x{n}: path={path} bound={median(bound) * 1e3:.1f} ms ours="
        f"{median(t[3]) * 1e3:.1f} ms  ratio ours {r_ours:.2f} (target >= {target}) "
        f"standard {r_std:.2f} optax {r_opt:.2f}", flush=True)
  return [f"{m}x{n}", path, f"{flop_ratio:.2f}", f"{median(bound) * 1e3:.1f}",
          f"{median(t[3]) * 1e3:.1f}", f"**{r_ours:.2f}**", f"{r_std:.2f}", f"{r_opt:.2f}",
          f"{target:.2f}", "yes" if r_ours >= target else "**no**"]


def run(rounds: int, dtype: str) -> str:
  rng = np.random.default_rng(0)
  rows = [measure_shape(m, n, jnp.dtype(dtype), rounds, rng) for m, n in SHAPES]
  return table(["shape", "path", "FLOP ratio std/ours", "matmul bound (ms)",
                "orthogonalize (ms)", "bound / ours", "bound / our standard",
                "bound / optax.contrib", "target", "met"], rows)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  md = run(args.rounds, args.dtype)
  if not args.no_write:
    write_section(
        f"newton_schulz ({args.dtype}, {jax.devices()[0].platform})",
        f"Machine: {machine()}\n\nKeller coefficients, {STEPS} steps, medians of "
        f"{args.rounds} interleaved rounds. *Matmul bound* = {STEPS} x (t(XX^T) + t(AA) + "
        f"t(BX)), each product timed alone in the same run.\n\n{md}")


if __name__ == "__main__":
  main()
