"""Newton–Schulz kernel against the exact polar factor (SVD) and between its paths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from muonclip_jax import orthogonalize, resolve_coefficients
from muonclip_jax._coefficients import BANDS
from muonclip_jax._newton_schulz import choose_method, orthogonalize_jit


def with_spectrum(rng, m, n, svals):
  k = len(svals)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return (u * svals) @ v.T


def polar(x):
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  return u @ vt


SHAPES = [(32, 128), (128, 32), (64, 64), (48, 200), (200, 48)]


@pytest.mark.parametrize("preset", sorted(BANDS))
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_presets_land_in_documented_band(preset, method):
  """At condition number <= 100 every singular value lands in the preset's band,
  and the output is that close to the exact polar factor U V^T (spectral norm)."""
  lo, hi = BANDS[preset]
  rng = np.random.default_rng(1)
  for m, n in SHAPES:
    k = min(m, n, 64)
    x = with_spectrum(rng, m, n, np.logspace(0, -2, k))
    y = np.asarray(orthogonalize(jnp.asarray(x, jnp.float32), coeffs=preset, method=method))
    s = np.linalg.svd(y, compute_uv=False)[:k]
    assert lo <= s.min() and s.max() <= hi, (preset, m, n, s.min(), s.max())
    dist = np.linalg.norm(y - polar(x), ord=2)
    assert dist <= max(1 - lo, hi - 1) + 1e-3, (preset, m, n, dist)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 48)])
def test_polar_express_8_steps_near_one_at_condition_1e3(method, shape):
  rng = np.random.default_rng(2)
  k = min(shape)
  x = with_spectrum(rng, *shape, np.logspace(0, -3, k))
  y = np.asarray(orthogonalize(jnp.asarray(x, jnp.float32), coeffs="polar_express", steps=8,
                               method=method))
  s = np.linalg.svd(y, compute_uv=False)[:k]
  assert np.max(np.abs(s - 1)) < 0.03, (s.min(), s.max())
  assert np.linalg.norm(y - polar(x), ord=2) < 0.03


@pytest.mark.parametrize("preset", ["keller", "polar_express", "dion", "aol"])
@pytest.mark.parametrize("shape", [(64, 320), (320, 64), (3, 96, 160)])
def test_gram_matches_standard_f32(preset, shape):
  """Stated tolerance: f32, condition number 1e3, max |gram - standard| <= rtol * max|standard|
  with rtol 1e-3 (Keller, Dion, AOL) and 5e-3 (Polar Express, whose first coefficient 8.3
  amplifies rounding in the Gram matrix; 8 or more steps restart and are tighter)."""
  rtol = 5e-3 if preset == "polar_express" else 1e-3
  rng = np.random.default_rng(3)
  m, n = shape[-2:]
  k = min(m, n)
  xs = [with_spectrum(rng, m, n, np.logspace(0, -3, k)) for _ in range(int(np.prod(shape[:-2])))]
  x = jnp.asarray(np.reshape(np.stack(xs), shape), jnp.float32)
  std = orthogonalize(x, coeffs=preset, method="standard")
  gram = orthogonalize(x, coeffs=preset, method="gram")
  err = float(jnp.max(jnp.abs(gram - std)))
  assert err <= rtol * float(jnp.max(jnp.abs(std))), err


@pytest.mark.parametrize("preset", ["keller", "polar_express"])
def test_gram_bf16_no_worse_than_standard_bf16(preset):
  """Stated tolerance: in bf16, Gram's error to the f32 result is at most 1.25x standard NS's."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(with_spectrum(rng, 96, 384, np.logspace(0, -3, 96)), jnp.float32)
  ref = orthogonalize(x, coeffs=preset, method="standard")
  err = {}
  for method in ("standard", "gram"):
    y = orthogonalize(x, coeffs=preset, method=method, dtype=jnp.bfloat16)
    assert y.dtype == jnp.float32
    err[method] = float(jnp.max(jnp.abs(y - ref)))
  assert err["gram"] <= 1.25 * err["standard"], err


def test_auto_picks_gram_only_where_it_saves_flops():
  assert choose_method(768, 768, 5) == "standard"
  assert choose_method(768, 2304, 5) == "gram"
  assert choose_method(3072, 768, 5) == "gram"
  assert choose_method(768, 900, 5) == "standard"


shape_st = st.one_of(
    st.tuples(st.just(1), st.integers(1, 40)),
    st.tuples(st.integers(1, 40), st.just(1)),
    st.integers(1, 40).map(lambda n: (n, n)),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 24)),
)


@given(shape=shape_st, dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
       method=st.sampled_from(["auto", "standard", "gram"]), seed=st.integers(0, 2**16))
def test_property_shapes_dtypes_scales(shape, dtype, scale, method, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * scale).astype(np.float32)
  y = orthogonalize(jnp.asarray(x, dtype), method=method)
  chex.assert_shape(y, shape)
  assert y.dtype == dtype
  y = np.asarray(y, np.float32)
  assert np.all(np.isfinite(y))
  mats = y.reshape((-1,) + shape[-2:])
  xs = x.reshape((-1,) + shape[-2:])
  tol = 0.05 if dtype == jnp.bfloat16 else 1e-3
  for xm, ym in zip(xs, mats):
    s = np.linalg.svd(ym, compute_uv=False)
    assert s.max() <= BANDS["keller"][1] + tol
    if min(xm.shape) == 1:  # rank one: a single singular value, in the band, same direction.
      assert s[0] >= BANDS["keller"][0] - tol
      xu = xm.astype(np.float64) / np.max(np.abs(xm))  # f32 norms of 1e-30 entries underflow
      cos = np.sum(xu * ym) / (np.linalg.norm(xu) * np.linalg.norm(ym))
      assert cos > 0.99


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (2, 6, 6)])
def test_zero_matrix_maps_to_zero(dtype, shape):
  y = orthogonalize(jnp.zeros(shape, dtype))
  chex.assert_trees_all_equal(y, jnp.zeros(shape, dtype))


def test_leading_axes_are_a_batch():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 3, 16, 40)), jnp.float32)
  y = orthogonalize(x)
  for i in range(2):
    for j in range(3):
      chex.assert_trees_all_close(y[i, j], orthogonalize(x[i, j]), atol=1e-6)


class JitVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_under_outer_jit(self):
    x = jnp.asarray(np.random.default_rng(6).standard_normal((24, 80)), jnp.float32)
    ref = orthogonalize(x)
    out = self.variant(lambda x: orthogonalize(x, coeffs="dion"))(x)
    chex.assert_trees_all_close(out, orthogonalize(x, coeffs="dion"), atol=1e-6)
    assert not np.allclose(np.asarray(out), np.asarray(ref))


def test_no_recompilation_for_repeated_shapes():
  rng = np.random.default_rng(7)
  orthogonalize(jnp.asarray(rng.standard_normal((12, 30)), jnp.float32))
  before = orthogonalize_jit._cache_size()
  for _ in range(3):
    orthogonalize(jnp.asarray(rng.standard_normal((12, 30)), jnp.float32))
  assert orthogonalize_jit._cache_size() == before


def test_custom_triple_and_list():
  x = jnp.asarray(np.random.default_rng(8).standard_normal((16, 48)), jnp.float32)
  a = orthogonalize(x, coeffs=(3.4445, -4.7750, 2.0315))
  chex.assert_trees_all_close(a, orthogonalize(x, coeffs="keller"), atol=0)
  cfg = resolve_coefficients([(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)], steps=4)
  assert cfg.triples[2:] == ((1.5, -0.5, 0.0),) * 2
  pe = resolve_coefficients("polar_express", steps=10)
  assert pe.triples[8:] == (pe.triples[7],) * 2 and pe.norm_scale == 1.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(coeffs="nope"), "unknown Newton–Schulz preset"),
    (dict(steps=0), "steps"),
    (dict(coeffs=(1.0, 2.0)), "triple"),
    (dict(method="fast"), "method"),
    (dict(dtype=jnp.int32), "dtype"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    orthogonalize(jnp.ones((4, 4)), **kwargs)


def test_rank_one_input_rejected():
  with pytest.raises(ValueError, match="rank >= 2"):
    orthogonalize(jnp.ones((4,)))


def test_jit_traceable_inside_user_function():
  f = jax.jit(lambda x: orthogonalize(x) * 2.0)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((8, 20)), jnp.float32)
  chex.assert_trees_all_close(f(x), 2.0 * orthogonalize(x), atol=1e-6)
