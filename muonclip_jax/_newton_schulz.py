"""Orthogonalisation by Newton–Schulz iteration: standard and Gram paths.

Muon (Jordan et al. 2024; Liu et al., arXiv 2502.16982) replaces each matrix
update ``M`` by an approximation of its polar factor ``U V^T`` (``M = U S V^T``)
computed with a few steps of the quintic iteration

.. math::
  X_0 = M / \\|M\\|_F, \\qquad
  X_{k+1} = a_k X_k + b_k R_k X_k + c_k R_k^2 X_k, \\qquad R_k = X_k X_k^\\top.

Every step is ``X_{k+1} = P_k X_k`` with ``P_k = a_k I + b_k R_k + c_k R_k^2`` a
polynomial in the small Gram matrix, so the whole iteration can run on the
``m x m`` Gram matrix alone (Gram Newton–Schulz, Dao AI Lab 2026):

.. math::
  Q_{k+1} = P_k Q_k, \\qquad R_{k+1} = P_k R_k P_k, \\qquad X_K = Q_K X_0.

For an ``m x n`` matrix (``m <= n``) the standard path costs
``K (4 m^2 n + 2 m^3)`` FLOPs and the Gram path ``4 m^2 n + (4K - 3) 2 m^3``:
fewer once ``n`` is about 1.5x ``m`` or more (5 steps). ``method="auto"`` picks
the cheaper one per shape. Both give the same result up to rounding; low
precision Gram iterations are restarted (``X <- QX; R <- XX^T; Q <- I``) to
stop rounding in ``R`` from compounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from muonclip_jax._coefficients import CoeffsLike, NSConfig, resolve_coefficients

Method = Literal["auto", "standard", "gram"]
_METHODS = ("auto", "standard", "gram")
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                   jnp.dtype(jnp.float64))


class NSOptions(NamedTuple):
  """Static Newton–Schulz options shared by every matrix of an update.

  Attributes:
    config: the coefficients, one triple per step.
    dtype: compute dtype (``None``: each matrix's own).
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    restarts: Gram-path restarts (``None``: :func:`default_restarts`).
    eps: added to the Frobenius norm (may be an array under
      ``optax.inject_hyperparams``).
  """

  config: NSConfig
  dtype: jnp.dtype | None
  method: str
  restarts: tuple[int, ...] | None
  eps: jax.typing.ArrayLike


class NewtonSchulz(NamedTuple):
  """The Newton–Schulz options of :func:`muonclip_jax.scale_by_muon`, in one object.

  Pass it as ``newton_schulz=`` to :func:`muonclip_jax.scale_by_muon`,
  :func:`muonclip_jax.muon` or :func:`muonclip_jax.muonclip`; they forward it
  unchanged, so a new option is a new field here and nowhere else. A field
  left ``None`` takes the value of the matching keyword (``coeffs``,
  ``steps``, ``ns_dtype``, ``method``, ``restarts``), which those functions
  keep for backward compatibility; setting both a field and its keyword to
  a value other than the keyword's default is refused (a keyword left at its
  default cannot be told from one not passed, and the field wins). Every
  field is static: none becomes an ``optax.inject_hyperparams``
  hyperparameter (``eps`` stays a keyword, and one, for that reason).

  Attributes:
    coeffs: a preset name or coefficients (see :func:`orthogonalize`).
    steps: number of steps (default: the preset's).
    dtype: compute dtype (default: each matrix's own).
    method: ``"auto"``, ``"standard"`` or ``"gram"``.
    restarts: Gram-path restarts (default: :func:`default_restarts`).

  Example:
    >>> from muonclip_jax import NewtonSchulz, muon
    >>> tx = muon(0.02, newton_schulz=NewtonSchulz(coeffs="polar_express", steps=8))
  """

  coeffs: CoeffsLike | None = None
  steps: int | None = None
  dtype: jax.typing.DTypeLike | None = None
  method: str | None = None
  restarts: Sequence[int] | None = None


# The keyword form of each NewtonSchulz field, and the keyword's default.
_KEYWORDS = {"coeffs": ("coeffs", "keller"), "steps": ("steps", None),
             "dtype": ("ns_dtype", None), "method": ("method", "auto"),
             "restarts": ("restarts", None)}


def _is_default(value: object, default: object) -> bool:
  return value is default or (isinstance(value, str) and value == default)


def newton_schulz_options(newton_schulz: NewtonSchulz | None, *, coeffs: CoeffsLike,
                          steps: int | None, ns_dtype: jax.typing.DTypeLike | None,
                          method: str, restarts: Sequence[int] | None,
                          eps: jax.typing.ArrayLike) -> NSOptions:
  """Checked, resolved :class:`NSOptions` from ``newton_schulz`` and the keywords.

  Raises:
    TypeError: ``newton_schulz`` is not a :class:`NewtonSchulz`.
    ValueError: a field of ``newton_schulz`` and its keyword are both set, or
      an unknown preset, method or dtype.
  """
  given = {"coeffs": coeffs, "steps": steps, "dtype": ns_dtype, "method": method,
           "restarts": restarts}
  if newton_schulz is not None:
    if not isinstance(newton_schulz, NewtonSchulz):
      raise TypeError(f"newton_schulz: expected a muonclip_jax.NewtonSchulz, got "
                      f"{type(newton_schulz).__name__}")
    for field, value in newton_schulz._asdict().items():
      if value is None:
        continue
      keyword, default = _KEYWORDS[field]
      if not _is_default(given[field], default):
        raise ValueError(
            f"newton_schulz: {field} is set both in newton_schulz=NewtonSchulz({field}=...) "
            f"and as the keyword {keyword}=; set it in one place only")
      given[field] = value
  return NSOptions(
      config=resolve_coefficients(given["coeffs"], given["steps"]),
      dtype=(None if given["dtype"] is None
             else resolve_compute_dtype(given["dtype"], jnp.float32)),
      method=check_method(given["method"]),
      restarts=None if given["restarts"] is None else tuple(int(r) for r in given["restarts"]),
      eps=eps,  # May be an array under optax.inject_hyperparams.
  )


def newton_schulz_flops(m: int, n: int, steps: int, method: str,
                        restarts: Sequence[int] = ()) -> int:
  """Matmul FLOPs of one ``m x n`` orthogonalisation (``m <= n`` after transposing)."""
  m, n = min(m, n), max(m, n)
  if method == "standard":
    return steps * (4 * m * m * n + 2 * m**3)
  n_restarts = len([r for r in restarts if 0 < r < steps])
  gram_mm = 4 * steps - 3 - n_restarts  # m x m products
  return 4 * m * m * n * (1 + n_restarts) + 2 * m**3 * gram_mm


def choose_method(m: int, n: int, steps: int, restarts: Sequence[int] = ()) -> str:
  """The path ``method="auto"`` takes: Gram when it saves at least 10% of FLOPs."""
  gram = newton_schulz_flops(m, n, steps, "gram", restarts)
  std = newton_schulz_flops(m, n, steps, "standard")
  return "gram" if gram < 0.9 * std else "standard"


def default_restarts(steps: int) -> tuple[int, ...]:
  """Gram restarts: none up to 5 steps, then before every third step (3, 6, ...)."""
  if steps <= 5:
    return ()
  return tuple(range(3, steps, 3))


def _matmul(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
  """Batched product with f32 (or wider) accumulation, cast back to ``a``'s dtype."""
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(a.dtype)


def _normalise(x: jax.Array, norm_scale: float, eps: float) -> jax.Array:
  """``X / (norm_scale ||X||_F + eps)`` per matrix, safe for tiny and huge inputs.

  The input is first divided by its largest magnitude, so the Frobenius norm
  neither overflows (huge entries) nor underflows (tiny or subnormal ones); the
  zero matrix stays zero.
  """
  amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  x = x / jnp.where(amax > 0, amax, 1.0)
  norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
  return x / (norm * norm_scale + eps)


def _aol_scale(r: jax.Array, eps: float) -> jax.Array:
  """Turbo-Muon row scales ``(sum_j |R_ij|)^(-1/2)``; zero rows get scale 0."""
  rowsum = jnp.sum(jnp.abs(r.astype(jnp.float32)), axis=-1)
  return jnp.where(rowsum > eps, jax.lax.rsqrt(jnp.maximum(rowsum, eps)), 0.0)


def _standard(x: jax.Array, cfg: NSConfig, wide: bool, eps: float) -> jax.Array:
  gram_spec = "...ij,...kj->...ik" if wide else "...ji,...jk->...ik"
  for i, (a, b, c) in enumerate(cfg.triples):
    r = _matmul(x, x, gram_spec)
    if i == 0 and cfg.aol:
      s = _aol_scale(r, eps).astype(x.dtype)
      x = x * (s[..., :, None] if wide else s[..., None, :])
      r = r * s[..., :, None] * s[..., None, :]
    poly = b * r + c * _matmul(r, r, "...ij,...jk->...ik")
    if wide:
      x = a * x + _matmul(poly, x, "...ij,...jk->...ik")
    else:
      x = a * x + _matmul(x, poly, "...ij,...jk->...ik")
  return x


def _gram(x: jax.Array, cfg: NSConfig, wide: bool, eps: float,
          restarts: Sequence[int]) -> jax.Array:
  gram_spec = "...ij,...kj->...ik" if wide else "...ji,...jk->...ik"
  mm = "...ij,...jk->...ik"

  def apply(q: jax.Array | None, x: jax.Array) -> jax.Array:
    if q is None:
      return x
    q = q.astype(x.dtype)
    return _matmul(q, x, mm) if wide else _matmul(x, q, mm)

  # The m x m side runs in at least f32: in 16-bit, rounding in R compounds
  # through the polynomial and blows up (restarts alone do not cure it).
  side = jnp.promote_types(x.dtype, jnp.float32)
  r = jnp.einsum(gram_spec, x, x, preferred_element_type=side)
  q = None  # None stands for the identity.
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  steps = len(cfg.triples)
  for i, (a, b, c) in enumerate(cfg.triples):
    if i in restarts and q is not None:
      x = apply(q, x)
      r = jnp.einsum(gram_spec, x, x, preferred_element_type=side)
      q = None
    if i == 0 and cfg.aol:
      s = _aol_scale(r, eps)
      x = x * (s[..., :, None] if wide else s[..., None, :]).astype(x.dtype)
      r = r * s[..., :, None] * s[..., None, :]
    z = b * r + c * _matmul(r, r, mm)            # P = a I + Z
    q = z + a * eye if q is None else a * q + _matmul(q, z, mm)
    if i + 1 < steps:
      pr = a * r + _matmul(z, r, mm)             # P R
      r = a * pr + _matmul(z, pr, mm)            # P R P = P (P R)
  return apply(q, x)


def orthogonalize_traced(x: jax.Array, cfg: NSConfig, compute_dtype: jnp.dtype, method: str,
                         restarts: tuple[int, ...] | None, eps: float) -> jax.Array:
  """Traceable body of :func:`orthogonalize` (no jit, static configuration)."""
  out_dtype = x.dtype
  m, n = x.shape[-2], x.shape[-1]
  wide = m <= n
  steps = len(cfg.triples)
  if restarts is None:
    restarts = default_restarts(steps)
  if method == "auto":
    method = choose_method(m, n, steps, restarts)
  work = jnp.promote_types(compute_dtype, jnp.float32)
  xw = x.astype(work)
  if cfg.aol:
    amax = jnp.max(jnp.abs(xw), axis=(-2, -1), keepdims=True)
    xw = xw / jnp.where(amax > 0, amax, 1.0)
  else:
    xw = _normalise(xw, cfg.norm_scale, eps)
  xc = xw.astype(compute_dtype)
  if method == "gram":
    y = _gram(xc, cfg, wide, eps, restarts)
  else:
    y = _standard(xc, cfg, wide, eps)
  return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def orthogonalize_jit(x, cfg, compute_dtype, method, restarts, eps):
  return orthogonalize_traced(x, cfg, compute_dtype, method, restarts, eps)


def resolve_compute_dtype(dtype, x_dtype) -> jnp.dtype:
  """The compute dtype: ``dtype`` if given, else the input's (f32 for non-floats)."""
  if dtype is None:
    d = jnp.dtype(x_dtype)
    return d if d in _COMPUTE_DTYPES else jnp.dtype(jnp.float32)
  d = jnp.dtype(dtype)
  if d not in _COMPUTE_DTYPES:
    raise ValueError(f"dtype: Newton–Schulz compute dtype must be one of "
                     f"{[str(t) for t in _COMPUTE_DTYPES]}, got {d}")
  return d


def check_method(method: str) -> str:
  if method not in _METHODS:
    raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
  return method


def orthogonalize(
    x: jax.typing.ArrayLike,
    *,
    coeffs: CoeffsLike = "keller",
    steps: int | None = None,
    dtype: jax.typing.DTypeLike | None = None,
    method: Method = "auto",
    restarts: Sequence[int] | None = None,
    eps: float = 1e-7,
) -> jax.Array:
  """Approximates the polar factor ``U V^T`` of the last two axes of ``x``.

  Leading axes are a batch (stacked layers, heads): each matrix is normalised
  and orthogonalised on its own. Tall matrices are handled as their transpose,
  so the Gram matrix is always the small ``min(m, n)`` square one.

  Args:
    x: an array of rank >= 2.
    coeffs: a preset name (``"keller"``, ``"polar_express"``, ``"dion"``,
      ``"aol"``), a triple ``(a, b, c)``, or a per-step list of triples.
    steps: number of steps (default: the preset's, 5; 4 for ``"aol"``).
    dtype: compute dtype of the iteration (``float32``, ``bfloat16``; default
      the input's). Products accumulate in f32; the result has ``x``'s dtype.
    method: ``"standard"``, ``"gram"``, or ``"auto"`` (the cheaper in FLOPs).
    restarts: Gram-path steps before which the iteration restarts from
      ``X = QX``; default :func:`default_restarts` (none up to 5 steps, then
      before every third step), whatever the dtype.
    eps: added to the Frobenius norm (the zero matrix maps to zero).

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    ValueError: for rank < 2, an unknown preset or method, or ``steps < 1``.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024 (the quintic
    iteration and the ``"keller"`` coefficients).

    Amsel et al., `The Polar Express
    <https://arxiv.org/abs/2505.16932>`_, 2025 (``"polar_express"``).

  Example:
    >>> import jax.numpy as jnp
    >>> from muonclip_jax import orthogonalize
    >>> x = jnp.arange(12.0).reshape(3, 4) + jnp.eye(3, 4)
    >>> o = orthogonalize(x, coeffs="polar_express", steps=8)
    >>> bool(jnp.allclose(o @ o.T, jnp.eye(3), atol=0.05))
    True
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"x: orthogonalize needs an array of rank >= 2, got shape {x.shape}")
  cfg = resolve_coefficients(coeffs, steps)
  compute = resolve_compute_dtype(dtype, x.dtype)
  check_method(method)
  rs = None if restarts is None else tuple(int(r) for r in restarts)
  return orthogonalize_jit(x, cfg, compute, method, rs, float(eps))


@runtime_checkable
class Orthogonalizer(Protocol):
  """Orthogonalises the matrices of one Muon update: the interface :func:`scale_by_muon` calls.

  ``fn(mats, ns, specs=None)`` maps a list of ``(batch, fan_in, fan_out)``
  arrays to their orthogonalisations (same shapes and dtypes). ``specs`` are
  their view shardings where known (``None`` entries where not); an
  implementation that does not shard ignores them.

  Implementations: :class:`LocalOrthogonalizer` (one device) and
  :class:`muonclip_jax._sharding.MeshOrthogonalizer` (a mesh; it also
  carries the ``init``/``update`` hooks a mesh needs, which
  :func:`muonclip_jax.scale_by_muon` calls only on a mesh).
  """

  def __call__(self, mats: Sequence[jax.Array], ns: NSOptions,
               specs: Sequence[object] | None = None) -> list[jax.Array]:
    ...


class LocalOrthogonalizer:
  """The :class:`Orthogonalizer` on one device: each matrix orthogonalised in turn."""

  def __call__(self, mats: Sequence[jax.Array], ns: NSOptions,
               specs: Sequence[object] | None = None) -> list[jax.Array]:
    del specs
    out = []
    for m in mats:
      dtype = resolve_compute_dtype(ns.dtype, m.dtype)
      out.append(orthogonalize_traced(m, ns.config, dtype, ns.method, ns.restarts, ns.eps))
    return out
