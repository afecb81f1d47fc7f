"""Helpers shared by the QK-Clip tests (test_qk_clip.py, test_qk_layouts.py).

Reference computations (brute-force float64 max logits, the predicted
factors ``gamma``) and checks (hot heads land on ``tau``, cool heads and every
other parameter bitwise unchanged) that do not depend on any one layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import muonclip_jax as mc
from muonclip_jax._paths import leaves_with_paths
from support.arrays import causal_mask

RTOL = 2e-5  # float32 logits of order 10-100, recomputed after rescaling


E, L, B = 16, 6, 2


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
  return {p: np.asarray(v) for p, v in leaves_with_paths(tree)[0]}


def stats_of(stats) -> dict[tuple[str, ...], np.ndarray]:
  return {p[:-1]: v for p, v in flat(stats).items() if p[-1] == "max_logits"}


def x_input(seed: int = 1, scale: float = 2.0) -> jax.Array:
  # jax.random.normal(key, (B, L, E)) bit for bit (the threefry counter is a reshaped iota),
  # drawn flat: XLA:CPU takes seconds to compile the rank-3 draw.
  return jax.random.normal(jax.random.key(seed), (B * L * E,)).reshape(B, L, E) * scale


def pick_tau(stats) -> float:
  """A tau between the statistics so some heads are hot and some cool."""
  v = np.concatenate([np.ravel(a) for a in stats_of(stats).values()])
  v = np.sort(v[v > 0])
  i = len(v) // 2
  return float((v[i - 1] + v[i]) / 2)


def gammas(s: np.ndarray, tau: float) -> np.ndarray:
  s = np.asarray(s, np.float64)
  hot = np.isfinite(s) & (s > 0) & (s > tau)
  return np.where(hot, tau / np.where(hot, s, 1.0), 1.0)


def group_min(g: np.ndarray, kv: int) -> np.ndarray:
  h = g.shape[-1]
  m = g.reshape(g.shape[:-1] + (kv, h // kv)).min(-1)
  return np.repeat(m, h // kv, axis=-1)


def predicted(s: np.ndarray, tau: float, mode: str, kv: int | None = None) -> np.ndarray:
  """The statistic after clipping, by the sharing rule."""
  g = gammas(s, tau)
  if mode in ("mha", "query"):
    return np.minimum(s, tau)
  if mode == "shared":
    return s * g.min(-1, keepdims=True)
  gm = group_min(g, kv)
  if mode == "group":
    return s * gm
  if mode == "split":
    return s * np.sqrt(g * gm)
  raise ValueError(mode)


def clip_step(params, stats, tau: float, **kw):
  """One MuonClip step at learning rate 0 (jitted); returns new params and state.

  At learning rate 0 Muon's update is exactly zero however many Newton–Schulz steps make
  its direction, so the step runs one (it compiles in half the time of the default five).
  """
  tx = mc.muonclip(0.0, tau=tau, steps=1, **kw)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  updates, state = jax.jit(tx.update)(grads, state, params, max_logits=stats)
  return optax.apply_updates(params, updates), state[-1]


def check_others_bitwise(old, new, may_change) -> None:
  fo, fn = flat(old), flat(new)
  assert fo.keys() == fn.keys()
  for p in fo:
    if p not in may_change:
      np.testing.assert_array_equal(fo[p], fn[p], err_msg=f"{p} changed")


def check_heads(old, new, path, view, changed: np.ndarray) -> None:
  """Per head slot (``view`` -> ``[lead..., slots, rest]``): unchanged iff not ``changed``."""
  o, n = np.asarray(view(flat(old)[path])), np.asarray(view(flat(new)[path]))
  same = np.all(o == n, axis=-1)
  np.testing.assert_array_equal(same, ~changed, err_msg=f"{path}: heads touched {~same}")


def per_head(a, axis: int, n_lead: int = 0):
  """Moves ``axis`` (of size heads) right after the lead axes and flattens the rest."""
  a = np.moveaxis(np.asarray(a), axis, n_lead)
  return a.reshape(a.shape[:n_lead + 1] + (-1,))


def merged(a, heads: int, n_lead: int = 0):
  """``[lead..., in, heads*dim]`` -> ``[lead..., heads, in*dim]``."""
  a = np.asarray(a)
  a = a.reshape(a.shape[:-1] + (heads, -1))
  return per_head(a, -2, n_lead)


def causal() -> jax.Array:
  return causal_mask(L)


def qk_logits(q, k):
  rep = q.shape[-2] // k.shape[-2]
  k = jnp.repeat(k, rep, axis=-2)
  return jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])


def sgd_clip(tau, **kw):
  return optax.chain(optax.sgd(0.1), mc.qk_clip(tau, **kw))


def mlp_params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.standard_normal((E, E)), jnp.float32)}}


def brute_head_max(wq, wk, x) -> np.ndarray:
  """float64 per-head max of causal ``q . k / sqrt(d)``; wq ``(E, H, D)``, wk ``(E, K, D)``."""
  x = np.asarray(x, np.float64)
  q = np.einsum("bte,ehd->bthd", x, np.asarray(wq, np.float64))
  k = np.einsum("bte,ehd->bthd", x, np.asarray(wk, np.float64))
  k = np.repeat(k, q.shape[-2] // k.shape[-2], axis=-2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(np.asarray(causal()), logits, -np.inf)
  return logits.max(axis=(0, 2, 3))


def check_clip_against_brute(before, after, tau):
  """Hot heads land on tau (1e-5 relative); returns the hot mask."""
  hot = before > tau
  assert hot.any() and (~hot).any()
  np.testing.assert_allclose(after[hot], tau, rtol=1e-5)
  np.testing.assert_array_equal(after[~hot], before[~hot])
  return hot


def sgd0_clip(params, stats, tau, **kw):
  tx = optax.chain(optax.sgd(0.0), mc.qk_clip(tau, **kw))
  grads = jax.tree.map(jnp.ones_like, params)
  upd, state = jax.jit(tx.update)(grads, tx.init(params), params, max_logits=stats)
  return optax.apply_updates(params, upd), state[-1]
