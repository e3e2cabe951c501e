"""RoPE: each scaling against a direct float64 evaluation of its formula, and relative positions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lsm.layers import RopeScaling, apply_rope, rope_frequencies
from tests.layers.helpers import assert_close

D = 16
BASE = 500.0  # a small base puts the YaRN ramp inside D = 16 dimensions
SCALINGS = {
    "none": RopeScaling(),
    "linear": RopeScaling("linear", factor=4.0),
    "ntk": RopeScaling("ntk", factor=4.0),
    "yarn": RopeScaling("yarn", factor=8.0, original_length=64, beta_fast=8.0, beta_slow=0.5),
}


def _direct_theta(i: int, scaling: RopeScaling) -> float:
  """Frequency of pair i, written out per kind from its definition."""
  s = scaling.factor
  if scaling.kind == "ntk":
    return (BASE * s ** (D / (D - 2))) ** (-2 * i / D)
  theta = BASE ** (-2 * i / D)
  if scaling.kind == "linear":
    return theta / s
  if scaling.kind == "yarn":
    wavelength = 2 * math.pi / theta
    r = scaling.original_length / wavelength
    gamma = 0.0 if r < scaling.beta_slow else 1.0 if r > scaling.beta_fast else (
        (r - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow))
    return (1 - gamma) * theta / s + gamma * theta
  return theta


def _direct_rope(x, positions, scaling):
  mscale = 0.1 * math.log(scaling.factor) + 1 if scaling.kind == "yarn" else 1.0
  out = np.empty_like(x)
  half = D // 2
  for i in range(half):
    angle = positions[:, :, None] * _direct_theta(i, scaling)
    a, b = x[..., i], x[..., i + half]
    out[..., i] = (a * np.cos(angle) - b * np.sin(angle)) * mscale
    out[..., i + half] = (b * np.cos(angle) + a * np.sin(angle)) * mscale
  return out


@pytest.mark.parametrize("kind", SCALINGS)
def test_matches_the_formula(kind):
  scaling = SCALINGS[kind]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, D))
  positions = rng.integers(0, 300, (2, 7))  # any values, not an arange
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), base=BASE,
                   scaling=scaling)
  assert got.dtype == jnp.float32
  # float32 angles of positions up to 300 are good to ~2e-5 radians.
  np.testing.assert_allclose(got, _direct_rope(x, positions, scaling), atol=1e-4, rtol=0)


def test_yarn_keeps_high_and_interpolates_low_frequencies():
  scaling = SCALINGS["yarn"]
  plain = rope_frequencies(D, BASE)
  yarn = rope_frequencies(D, BASE, scaling)
  rotations = scaling.original_length * plain / (2 * np.pi)
  fast, slow = rotations > scaling.beta_fast, rotations < scaling.beta_slow
  between = ~fast & ~slow
  assert fast.any() and slow.any() and between.any()  # the test exercises all three bands
  np.testing.assert_allclose(yarn[fast], plain[fast], rtol=1e-12)
  np.testing.assert_allclose(yarn[slow], plain[slow] / scaling.factor, rtol=1e-12)
  assert np.all((yarn[between] < plain[between]) & (yarn[between] > plain[between] / 8))


def test_base_changes_the_frequencies():
  np.testing.assert_allclose(rope_frequencies(D, 1e6), 1e6 ** (-np.arange(0, D, 2) / D))


@pytest.mark.parametrize("kind", SCALINGS)
def test_scores_depend_only_on_the_position_difference(kind):
  scaling = SCALINGS[kind]
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, D)), jnp.float32)

  def score(m, n):
    rq = apply_rope(q, jnp.array([[m]]), base=BASE, scaling=scaling)
    rk = apply_rope(k, jnp.array([[n]]), base=BASE, scaling=scaling)
    return float(jnp.sum(rq * rk))

  for m, n in [(7, 3), (40, 40), (2, 90)]:
    ref = score(m, n)
    for shift in (1, 57, 211):
      assert abs(score(m + shift, n + shift) - ref) <= 1e-4 * max(1.0, abs(ref)), (m, n, shift)
  assert abs(score(7, 3) - score(8, 3)) > 1e-3  # ... and does depend on it


def test_bfloat16_input_keeps_its_dtype():
  x = np.random.default_rng(2).standard_normal((1, 5, 2, D))
  positions = np.arange(5)
  got = apply_rope(jnp.asarray(x, jnp.bfloat16), positions, base=BASE)
  assert got.dtype == jnp.bfloat16
  assert_close(got, _direct_rope(x, positions[None], SCALINGS["none"]), jnp.bfloat16)
