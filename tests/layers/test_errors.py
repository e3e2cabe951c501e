"""Bad arguments raise ValueError/TypeError naming the argument, before the attention op is
reached (it is replaced by a tripwire to prove it)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import (Attention, DenseKVCache, Embed, RMSNorm, RingKVCache, RopeScaling, SwiGLU,
                        apply_rope)
from lsm.layers import attention as attention_module

B, T, D = 2, 6, 16


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
  def reached(*args, **kwargs):
    raise AssertionError("the attention op was reached before the argument check")

  monkeypatch.setattr(attention_module, "attention", reached)


def _attention(**kwargs):
  return Attention(D, **{**dict(num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0)), **kwargs})


def _x(t=T):
  return jnp.zeros((B, t, D), jnp.float32)


def _positions(t=T):
  return jnp.broadcast_to(jnp.arange(t), (B, t))


def _call(layer=None, x=None, cache=None, **kwargs):
  layer = layer or _attention()
  x = _x() if x is None else x
  return layer(x, cache=cache, **kwargs)


CONSTRUCTION = [
    ("heads_not_multiple", lambda: _attention(num_heads=4, num_kv_heads=3), ValueError,
     r"num_heads must be a multiple of num_kv_heads, got num_heads=4 and num_kv_heads=3"),
    ("window_zero", lambda: _attention(window=0), ValueError,
     r"window must be a positive int or None, got 0"),
    ("window_negative", lambda: _attention(window=-4), ValueError, r"window must be .*got -4"),
    ("window_float", lambda: _attention(window=2.5), ValueError, r"window must be .*got 2\.5"),
    ("window_bool", lambda: _attention(window=True), ValueError, r"window must be .*got True"),
    ("sinks_without_window", lambda: _attention(sink_tokens=2), ValueError,
     r"sink_tokens=2 needs a window"),
    ("sinks_negative", lambda: _attention(window=4, sink_tokens=-1), ValueError,
     r"sink_tokens must be a non-negative int or None, got -1"),
    ("odd_head_dim", lambda: _attention(head_dim=7), ValueError, r"head_dim must be even"),
    ("d_model_not_divisible", lambda: Attention(18, 4, 2, rngs=nnx.Rngs(0)), ValueError,
     r"d_model=18 is not a multiple of num_heads=4; give head_dim"),
    ("implementation", lambda: _attention(implementation="cuda"), ValueError,
     r"implementation must be one of .* or None, got 'cuda'"),
    ("dtype", lambda: _attention(dtype=jnp.int32), TypeError,
     r"dtype must be a floating dtype .* got int32"),
    ("soft_cap", lambda: _attention(logits_soft_cap=-1.0), ValueError,
     r"logits_soft_cap must be a positive finite number or None, got -1\.0"),
    ("rope_scaling_type", lambda: _attention(rope_scaling="yarn"), TypeError,
     r"rope_scaling must be a RopeScaling, got str"),
    ("rope_kind", lambda: RopeScaling(kind="dynamic"), ValueError,
     r"kind must be one of \('none', 'linear', 'ntk', 'yarn'\), got 'dynamic'"),
    ("rope_yarn_length", lambda: RopeScaling("yarn", factor=4.0), ValueError,
     r"kind='yarn' needs original_length"),
    ("rope_factor_below_one", lambda: RopeScaling("linear", factor=0.5), ValueError,
     r"factor must be >= 1"),
    ("rope_factor_without_kind", lambda: RopeScaling(factor=2.0), ValueError,
     r"factor must be 1\.0 with kind='none', got 2\.0"),
    ("rope_betas", lambda: RopeScaling("yarn", 2.0, 64, beta_fast=1.0, beta_slow=2.0),
     ValueError, r"beta_slow must be < beta_fast"),
    ("rmsnorm_dim", lambda: RMSNorm(0), ValueError, r"RMSNorm: dim must be a positive int"),
    ("swiglu_mlp_dim", lambda: SwiGLU(8, 0, rngs=nnx.Rngs(0)), ValueError,
     r"SwiGLU: mlp_dim must be a positive int, got 0"),
    ("embed_vocab", lambda: Embed(-1, 8, rngs=nnx.Rngs(0)), ValueError,
     r"Embed: vocab_size must be a positive int, got -1"),
    ("init_cache_length", lambda: _attention().init_cache(B, 0), ValueError,
     r"max_length must be a positive int, got 0"),
    ("ring_window", lambda: RingKVCache.create(B, 2, 4, window=0), ValueError,
     r"RingKVCache: window must be a positive int, got 0"),
]

CALLS = [
    ("x_width", lambda: _call(x=jnp.zeros((B, T, D + 1))), ValueError,
     r"x must have shape \[\.\.\., \.\.\., 16\], got shape \(2, 6, 17\)"),
    ("x_integer", lambda: _call(x=jnp.zeros((B, T, D), jnp.int32)), TypeError,
     r"x must have a floating dtype"),
    ("positions_shape", lambda: _call(positions=jnp.zeros((B, T + 1), jnp.int32)), ValueError,
     r"positions must have shape \[6\] or \[2, 6\] to match the input, got \(2, 7\)"),
    ("positions_dtype", lambda: _call(positions=jnp.zeros((B, T))), TypeError,
     r"positions must have an integer dtype, got float"),
    ("segment_ids_shape", lambda: _call(segment_ids=np.zeros((3, T), np.int32)), ValueError,
     r"segment_ids must have shape \[6\] or \[2, 6\] to match the input, got \(3, 6\)"),
    ("cache_without_positions", lambda: _call(cache=_attention().init_cache(B, 8)), ValueError,
     r"positions are required with a cache"),
    ("cache_too_short", lambda: _call(cache=_attention().init_cache(B, 4),
                                      positions=_positions()), ValueError,
     r"cannot write 6 tokens into a cache of max_length=4 with 0 slots filled"),
    ("cache_full", lambda: _call(
        cache=_attention().init_cache(B, 8).replace(length=jnp.int32(3)), positions=_positions()),
     ValueError, r"cannot write 6 tokens into a cache of max_length=8 with 3 slots filled"),
    ("cache_type", lambda: _call(cache={"keys": None}, positions=_positions()), TypeError,
     r"Attention: cache must be a DenseKVCache, .*SelectKVCache \(from init_cache\), got dict"),
    ("cache_batch", lambda: _call(cache=DenseKVCache.create(B + 1, 8, 2, 4),
                                  positions=_positions()), ValueError,
     r"cache must have \(batch, kv heads, head dim\) = \(2, 2, 4\) .* got \(3, 2, 4\)"),
    ("ring_of_another_window", lambda: _call(
        _attention(window=4), cache=RingKVCache.create(B, 2, 4, window=3),
        positions=_positions()), ValueError,
     r"RingKVCache must have the layer's window=4 and sink_tokens=0, got window=3"),
    ("rope_positions", lambda: apply_rope(jnp.zeros((B, T, 2, 8)), jnp.arange(T + 1)),
     ValueError, r"apply_rope: positions must have shape \[6\] or \[2, 6\]"),
    ("rope_odd_dim", lambda: apply_rope(jnp.zeros((B, T, 2, 7)), jnp.arange(T)), ValueError,
     r"head_dim must be even"),
    ("embed_float_tokens", lambda: Embed(8, 4, rngs=nnx.Rngs(0))(jnp.zeros((B, T))), TypeError,
     r"Embed: tokens must have an integer dtype"),
    ("embed_token_rank", lambda: Embed(8, 4, rngs=nnx.Rngs(0))(jnp.zeros(T, jnp.int32)),
     ValueError, r"Embed: tokens must have shape \[B, T\], got \(6,\)"),
    ("norm_width", lambda: RMSNorm(8)(jnp.zeros((B, 7))), ValueError,
     r"RMSNorm: x must have shape \[\.\.\., 8\], got shape \(2, 7\)"),
]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in CONSTRUCTION + CALLS],
                         ids=[c[0] for c in CONSTRUCTION + CALLS])
def test_bad_argument_raises_naming_it(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()
