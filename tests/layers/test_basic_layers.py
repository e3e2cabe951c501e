"""RMSNorm, SwiGLU and Embed against their formulas in float64, and in bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import Embed, RMSNorm, SwiGLU
from tests.layers.helpers import assert_close


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape)


def _silu(z):
  return z / (1.0 + np.exp(-z))


def test_rmsnorm_formula_and_dtype():
  norm = RMSNorm(12, eps=1e-5)
  scale = _normal(0, 12)
  norm.scale[...] = jnp.asarray(scale, jnp.float32)
  x = _normal(1, (2, 5, 12)) * 3.0
  ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale
  assert_close(norm(jnp.asarray(x, jnp.float32)), ref)
  y16 = norm(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, ref, jnp.bfloat16)


def test_swiglu_formula():
  mlp = SwiGLU(8, 20, rngs=nnx.Rngs(0))
  x = _normal(2, (2, 7, 8))
  gate, up, down = (np.asarray(p[...], np.float64) for p in (mlp.gate, mlp.up, mlp.down))
  ref = (_silu(x @ gate) * (x @ up)) @ down
  assert_close(mlp(jnp.asarray(x, jnp.float32)), ref)


def test_embed_lookup_and_tied_attend():
  embed = Embed(50, 16, rngs=nnx.Rngs(1))
  table = np.asarray(embed.embedding[...], np.float64)
  tokens = np.random.default_rng(3).integers(0, 50, (2, 9))
  np.testing.assert_array_equal(embed(jnp.asarray(tokens)), table[tokens].astype(np.float32))
  x = _normal(4, (2, 9, 16))
  logits = embed.attend(jnp.asarray(x, jnp.float32))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 9, 50)
  assert_close(logits, x @ table.T)


@pytest.mark.parametrize("make", [
    lambda dtype: SwiGLU(16, 40, rngs=nnx.Rngs(5), dtype=dtype),
    lambda dtype: Embed(30, 16, rngs=nnx.Rngs(6), dtype=dtype),
], ids=["swiglu", "embed_attend"])
def test_bfloat16_compute_with_float32_params(make):
  x = jnp.asarray(_normal(7, (2, 6, 16)), jnp.float32)
  layers = {dtype: make(dtype) for dtype in (jnp.float32, jnp.bfloat16)}
  for layer in layers.values():
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  run = lambda layer: layer.attend(x) if isinstance(layer, Embed) else layer(x)
  low, high = run(layers[jnp.bfloat16]), run(layers[jnp.float32])
  assert low.dtype == (jnp.float32 if isinstance(layers[jnp.float32], Embed) else jnp.bfloat16)
  assert_close(low, high, jnp.bfloat16)
