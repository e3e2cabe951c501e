"""The attention mixer: the float64 definition, the DESIGN.md invariants (packing, decoding) with
both cache kinds, causality and the window, and bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import Attention, DenseKVCache, RingKVCache, RopeScaling, rope_frequencies
from tests.layers.helpers import assert_close, cached as _cached, forward as _forward

D_MODEL = 16
# Two configs use the op's default implementation (the blockwise XLA path on CPU, with traced
# positions and empty cache slots); two use "reference", which compiles in half the time.
CONFIGS = {
    "dense": dict(num_heads=4, num_kv_heads=2),
    "dense_mqa_qknorm_softcap_yarn": dict(
        num_heads=4, num_kv_heads=1, qk_norm=True, logits_soft_cap=3.0, rope_base=300.0,
        rope_scaling=RopeScaling("yarn", factor=4.0, original_length=8),
        implementation="reference"),
    "ring": dict(num_heads=4, num_kv_heads=2, window=5, implementation="reference"),
    "ring_sinks": dict(num_heads=2, num_kv_heads=2, window=6, sink_tokens=3),
}


def _layer(name, **overrides):
  kwargs = dict(head_dim=8, rngs=nnx.Rngs(sum(map(ord, name))), **CONFIGS[name])
  layer = Attention(D_MODEL, **{**kwargs, **overrides})
  if layer.query_norm is not None:  # non-trivial norm scales, so the test sees them
    for norm, seed in ((layer.query_norm, 1), (layer.key_norm, 2)):
      norm.scale[...] = jnp.asarray(1 + 0.3 * np.random.default_rng(seed).standard_normal(8),
                                    jnp.float32)
  return layer


def _x(seed, t, b=2):
  return np.random.default_rng(seed).standard_normal((b, t, D_MODEL))


def _definition(layer: Attention, x, positions, segment_ids):
  """The layer written out in float64 numpy, scores materialised."""
  p = lambda v: np.asarray(v[...], np.float64)
  q = np.einsum("btd,dhk->bthk", x, p(layer.query))
  k = np.einsum("btd,dhk->bthk", x, p(layer.key))
  v = np.einsum("btd,dhk->bthk", x, p(layer.value))
  if layer.query_norm is not None:
    rms = lambda z, scale: z / np.sqrt(np.mean(z * z, -1, keepdims=True) + 1e-6) * scale
    q, k = rms(q, p(layer.query_norm.scale)), rms(k, p(layer.key_norm.scale))
  theta = rope_frequencies(layer.head_dim, layer.rope_base, layer.rope_scaling)
  angle = positions[:, :, None, None] * theta
  half = layer.head_dim // 2

  def rotate(z):
    a, b = z[..., :half], z[..., half:]
    rotated = np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                              b * np.cos(angle) + a * np.sin(angle)], -1)
    return rotated * layer.rope_scaling.attention_factor

  q, k = rotate(q), rotate(k)
  group = layer.num_heads // layer.num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(layer.head_dim)
  if layer.logits_soft_cap is not None:
    scores = layer.logits_soft_cap * np.tanh(scores / layer.logits_soft_cap)
  qp, kp = positions[:, None, :, None], positions[:, None, None, :]
  visible = kp <= qp
  if layer.window is not None:
    visible &= (kp >= qp - layer.window) | (kp < layer.sink_tokens)
  visible &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  scores = np.where(visible, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p(layer.out))


def _packed(lengths):
  """Segment ids and restarting positions of documents of ``lengths`` packed in one row."""
  segments = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  return positions, segments


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# Shapes are shared between tests (B = 2, T in {9, 15, 24}) so each compiles once per config.
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_float64_definition(name):
  layer = _layer(name)
  positions, segments = (np.repeat(z, 2, 0) for z in _packed([11, 3, 10]))
  x = _x(0, 24)
  got = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  assert got.dtype == jnp.float32
  assert_close(got, _definition(layer, x, positions, segments))


@pytest.mark.parametrize("name", CONFIGS)
def test_packing_equals_separate_documents(name):
  layer = _layer(name)
  a, b = _x(1, 9), _x(2, 15)
  positions, segments = (np.repeat(z, 2, 0) for z in _packed([9, 15]))
  packed = _forward(layer, _f32(np.concatenate([a, b], 1)), jnp.asarray(positions),
                    jnp.asarray(segments))
  alone = [_forward(layer, _f32(doc), None, None) for doc in (a, b)]  # default positions
  assert_close(packed, jnp.concatenate(alone, 1), what="packed vs separate")


def _decode(layer, x, cache, chunks, *, positions, segment_ids):
  """Feeds x through the cache in prefill chunks of the given lengths, then one token at a time."""
  t = x.shape[1]
  edges = np.cumsum([0, *chunks, *[1] * (t - sum(chunks))])
  outputs = []
  for start, stop in zip(edges[:-1], edges[1:]):
    y, cache = _cached(layer, _f32(x[:, start:stop]), jnp.asarray(positions[:, start:stop]),
                       jnp.asarray(segment_ids[:, start:stop]), cache)
    outputs.append(y)
  return jnp.concatenate(outputs, 1), cache


# Prefill splits of a 24-token sequence; 13 is longer than both rings (5 and 3 + 6 slots).
DECODE_CASES = [("dense", [4, 13]), ("dense_mqa_qknorm_softcap_yarn", [13]), ("ring", [4, 13]),
                ("ring", []), ("ring_sinks", [13])]


@pytest.mark.parametrize("name, chunks", DECODE_CASES,
                         ids=[f"{n}-{'_'.join(map(str, c)) or 'none'}" for n, c in DECODE_CASES])
def test_prefill_then_decode_equals_one_forward(name, chunks):
  layer = _layer(name)
  t = 24
  x = _x(3, t)
  # Row 1 starts at position 5: positions need not start at 0.
  positions = np.stack([np.arange(t), np.arange(5, 5 + t)])
  segments = np.zeros((2, t), np.int32)
  full = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  cache = layer.init_cache(2, 32)
  assert isinstance(cache, RingKVCache if layer.window else DenseKVCache)
  got, cache = _decode(layer, x, cache, chunks, positions=positions, segment_ids=segments)
  assert_close(got, full, what="decoded vs full forward")
  if isinstance(cache, DenseKVCache):
    assert int(cache.length) == t
  else:  # O(window) memory, whatever max_length says
    assert cache.keys.shape[1] == layer.window + layer.sink_tokens


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_prefill_then_decode_continues_the_last_document(name):
  """Prefill of a ‖ b (segment ids, restarting positions) into a cache gives a's and b's own
  outputs, and decoding c after it gives what b ‖ c alone gives."""
  layer = _layer(name)
  a, b, c = _x(4, 9), _x(5, 10), _x(6, 5)
  positions, segments = _packed([9, 10])
  positions = np.repeat(np.concatenate([positions, np.arange(10, 15)[None]], 1), 2, 0)
  segments = np.repeat(np.concatenate([segments, np.full((1, 5), 2)], 1), 2, 0)
  got, _ = _decode(layer, np.concatenate([a, b, c], 1), layer.init_cache(2, 32), [19],
                   positions=positions, segment_ids=segments)
  alone_a = _forward(layer, _f32(a), None, None)
  alone_bc = _forward(layer, _f32(np.concatenate([b, c], 1)), None, None)
  assert_close(got, jnp.concatenate([alone_a, alone_bc], 1), what="packed cache vs alone")


@pytest.mark.parametrize("name", ["dense", "ring_sinks"])
def test_outputs_depend_exactly_on_the_visible_inputs(name):
  """d y[i] / d x[j] is exactly zero for future j (and, with a window, for j outside the window
  and the sinks), and nonzero for every visible j."""
  layer = _layer(name)
  t = 13
  x = _f32(_x(7, t, b=1))
  jacobian = jax.jit(jax.jacrev(lambda x: layer(x)))(x)  # [1, T, D, 1, T, D]
  dependence = np.abs(np.asarray(jacobian)).sum(axis=(0, 2, 3, 5))  # [i, j]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = j <= i
  if layer.window is not None:
    visible &= (j >= i - layer.window) | (j < layer.sink_tokens)
  assert np.all(dependence[~visible] == 0.0)
  assert np.all(dependence[visible] > 0.0)


def test_bfloat16_compute_is_close_to_float32():
  name = "dense_mqa_qknorm_softcap_yarn"
  high, low = _layer(name), _layer(name, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
  x = _x(8, 24)
  positions, segments = np.broadcast_to(np.arange(24), (2, 24)), np.zeros((2, 24), np.int32)
  ref = _forward(high, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  y = _forward(low, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  assert y.dtype == jnp.bfloat16
  assert_close(y, ref, jnp.bfloat16)
  cache = low.init_cache(2, 32)
  assert cache.keys.dtype == jnp.bfloat16
  got, _ = _decode(low, x, cache, [13], positions=positions, segment_ids=segments)
  assert_close(got, ref, jnp.bfloat16)


def test_dense_cache_overflow_under_jit_gives_nan():
  """Under jit the fill count is unknown while tracing; the overflowing write is poisoned."""
  layer = _layer("dense")
  cache = layer.init_cache(1, 4)
  x = _f32(_x(9, 3, b=1))
  y, cache = _cached(layer, x, jnp.arange(3)[None], jnp.zeros((1, 3), jnp.int32), cache)
  assert np.all(np.isfinite(y))
  y, cache = _cached(layer, x, jnp.arange(3, 6)[None], jnp.zeros((1, 3), jnp.int32), cache)
  assert np.all(np.isnan(np.asarray(y)))
