"""The sparse-attention mixer: the float64 definition (with LM-Infinite's distance cap), the
DESIGN.md invariants (packing, decoding) for every pattern, argument errors and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import ConfigError, ModelConfig, from_dict
from lsm.kernels.attention import patterns
from lsm.layers import BlockMemoryPolicy, DenseKVCache, RingKVCache, SparseAttention
from lsm.layers import rope_frequencies
from lsm.models import make_mixer
from tests.kernels.attention.test_patterns import dense_definition
from tests.layers.helpers import assert_close, cached as _cached, forward as _forward

D_MODEL = 16
T = 24
CONFIGS = {
    "sink_window": dict(pattern="sink_window", window=5, sink_tokens=2),
    "lambda": dict(pattern="lambda", window=5, global_tokens=3, distance_cap=4, qk_norm=True),
    "bigbird": dict(pattern="bigbird", block=4, num_local_blocks=2, num_global_blocks=1,
                    num_random_blocks=1, max_length=32, seed=3),
    "strided": dict(pattern="strided", block=4, local_blocks=1, stride=3, max_length=32),
}


def _layer(name, **overrides):
  kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(sum(map(ord, name))),
                **CONFIGS[name])
  layer = SparseAttention(D_MODEL, **{**kwargs, **overrides})
  if layer.query_norm is not None:  # non-trivial norm scales, so the test sees them
    for norm, seed in ((layer.query_norm, 1), (layer.key_norm, 2)):
      norm.scale[...] = jnp.asarray(1 + 0.3 * np.random.default_rng(seed).standard_normal(8),
                                    jnp.float32)
  return layer


def _x(seed, t, b=2):
  return np.random.default_rng(seed).standard_normal((b, t, D_MODEL))


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _definition(layer: SparseAttention, name, x, positions, segment_ids):
  """The layer in float64 numpy: one softmax over the pattern's pairs (from the pattern's
  definition written pair by pair); lambda scores its global keys with the query rotated at
  ``min(position, distance_cap)``."""
  p = lambda v: np.asarray(v[...], np.float64)
  q = np.einsum("btd,dhk->bthk", x, p(layer.query))
  k = np.einsum("btd,dhk->bthk", x, p(layer.key))
  v = np.einsum("btd,dhk->bthk", x, p(layer.value))
  if layer.query_norm is not None:
    rms = lambda z, scale: z / np.sqrt(np.mean(z * z, -1, keepdims=True) + 1e-6) * scale
    q, k = rms(q, p(layer.query_norm.scale)), rms(k, p(layer.key_norm.scale))
  theta = rope_frequencies(layer.head_dim, layer.rope_base)
  half = layer.head_dim // 2

  def rotate(z, at):
    angle = at[:, :, None, None] * theta
    a, b = z[..., :half], z[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], -1)

  group = layer.num_heads // layer.num_kv_heads
  k_rot = np.repeat(rotate(k, positions), group, axis=2)
  v = np.repeat(v, group, axis=2)
  scores = np.einsum("bqhk,bshk->bhqs", rotate(q, positions), k_rot)
  params = {key: value for key, value in CONFIGS[name].items()
            if key not in ("pattern", "distance_cap", "qk_norm")}
  if name == "lambda":
    capped = np.einsum("bqhk,bshk->bhqs", rotate(q, np.minimum(positions, layer.distance_cap)),
                       k_rot)
    is_global = positions[:, None, None, :] < params["global_tokens"]
    scores = np.where(is_global, capped, scores)
  scores /= np.sqrt(layer.head_dim)
  visible = np.stack([dense_definition(CONFIGS[name]["pattern"], params, row, row)
                      for row in positions])[:, None]
  visible &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  scores = np.where(visible, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p(layer.out))


def _packed(lengths, batch=2):
  """Segment ids and restarting positions of documents of ``lengths`` packed in each row."""
  segments = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  return np.repeat(positions, batch, 0), np.repeat(segments, batch, 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_match_the_float64_definition_and_each_alone(name):
  layer = _layer(name)
  a, b = _x(1, 9), _x(2, 15)
  positions, segments = _packed([9, 15])
  x = np.concatenate([a, b], 1)
  packed = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  assert packed.dtype == jnp.float32
  assert_close(packed, _definition(layer, name, x, positions, segments))
  alone = [_forward(layer, _f32(doc), None, None) for doc in (a, b)]  # default positions
  assert_close(packed, jnp.concatenate(alone, 1), what="packed vs separate")


def _decode(layer, x, cache, prefill, *, positions, segment_ids):
  """Prefill of ``x[:, :prefill]`` into the cache, then one token at a time."""
  edges = [0, prefill, *range(prefill + 1, x.shape[1] + 1)]
  outputs = []
  for start, stop in zip(edges[:-1], edges[1:]):
    y, cache = _cached(layer, _f32(x[:, start:stop]), jnp.asarray(positions[:, start:stop]),
                       jnp.asarray(segment_ids[:, start:stop]), cache)
    outputs.append(y)
  return jnp.concatenate(outputs, 1), cache


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_equals_one_forward(name):
  """Row 1 starts at position 5, and 13 prefill tokens overrun the rings (2 + 5, 3 + 5 slots)."""
  layer = _layer(name)
  x = _x(3, T)
  positions = np.stack([np.arange(T), np.arange(5, 5 + T)])
  segments = np.zeros((2, T), np.int32)
  full = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  cache = layer.init_cache(2, 32)
  ring = name in ("sink_window", "lambda")
  assert isinstance(cache, RingKVCache if ring else DenseKVCache)
  got, cache = _decode(layer, x, cache, 13, positions=positions, segment_ids=segments)
  assert_close(got, full, what="decoded vs full forward")
  if ring:  # O(window) memory
    assert cache.keys.shape[1] == layer.window + layer.sink_tokens


def test_lambda_without_a_binding_cap_is_sink_window():
  """distance_cap >= every position: LM-Infinite's two merged parts are StreamingLLM's one mask."""
  def make(**kwargs):  # the same weights each time
    return SparseAttention(D_MODEL, 4, 2, 8, window=5, rngs=nnx.Rngs(0), **kwargs)

  lam = make(pattern="lambda", global_tokens=3, distance_cap=T)
  sink = make(pattern="sink_window", sink_tokens=3)
  capped = make(pattern="lambda", global_tokens=3)
  assert capped.distance_cap == 5  # the window by default
  x = _f32(_x(4, T))
  reference = np.asarray(_forward(sink, x, None, None))
  assert_close(_forward(lam, x, None, None), reference,
               what="lambda (cap >= length) vs sink_window")
  # The cap changes the outputs of the queries farther than it from the global tokens only.
  diff = np.abs(np.asarray(_forward(capped, x, None, None)) - reference).max(axis=(0, 2))
  diff /= np.abs(reference).max()
  assert np.all(diff[:6] <= 1e-5) and np.all(diff[6:] > 1e-3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pattern="dilated"), ValueError,
     r"SparseAttention: pattern must be one of \('sink_window', 'lambda', 'bigbird', 'strided', "
     r"'select', 'routing'\), got 'dilated'"),
    (dict(pattern="sink_window", window=4), ValueError,
     r"SparseAttention: pattern_mask: pattern 'sink_window' needs sink_tokens, got window"),
    (dict(pattern="strided", block=4, local_blocks=1, stride=2, max_length=16, window=4),
     ValueError, r"window=4 is not a parameter of pattern 'strided'"),
    (dict(pattern="bigbird", block=4, num_local_blocks=0, num_global_blocks=1,
          num_random_blocks=1, max_length=16), ValueError,
     r"SparseAttention: bigbird: num_local_blocks must be a positive int, got 0"),
    (dict(pattern="lambda", window=4, global_tokens=2, distance_cap=0), ValueError,
     r"SparseAttention: distance_cap must be a positive int or None, got 0"),
    (dict(pattern="sink_window", window=4, sink_tokens=2, distance_cap=8), ValueError,
     r"distance_cap=8 applies to pattern 'lambda' only, got pattern='sink_window'"),
    (dict(pattern="sink_window", window=4, sink_tokens=2, num_heads=4, num_kv_heads=3),
     ValueError, r"num_heads must be a multiple of num_kv_heads, got num_heads=4 and "
                 r"num_kv_heads=3"),
])
def test_bad_arguments_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    SparseAttention(D_MODEL, **{**dict(num_heads=4, num_kv_heads=2, rngs=nnx.Rngs(0)), **kwargs})


def test_bad_caches_and_calls_are_named():
  layer = _layer("strided")
  with pytest.raises(ValueError, match=r"SparseAttention.init_cache: max_length=33 exceeds the "
                                       r"32 positions the 'strided' layout covers"):
    layer.init_cache(1, 33)
  with pytest.raises(ValueError, match=r"SparseAttention.init_cache: policy must be None"):
    layer.init_cache(1, 8, policy=BlockMemoryPolicy(sink_tokens=1, window=2, block_size=2,
                                                    top_k=1, representatives=1))
  lam = _layer("lambda")
  with pytest.raises(ValueError, match=r"SparseAttention: positions are required with a cache"):
    lam(_f32(_x(0, 3)), cache=lam.init_cache(2, 8))
  with pytest.raises(ValueError, match=r"SparseAttention: x must have shape \[.*, 16\]"):
    lam(jnp.zeros((2, 3, 8)))


@pytest.mark.parametrize("pattern", ["lambda", "bigbird", "select"])
def test_registry_builds_the_mixer_from_the_config(pattern):
  config = ModelConfig(d_model=D_MODEL, num_heads=4, num_kv_heads=2,
                       layer_pattern=["sparse_attention"],
                       sparse=dict(pattern=pattern, window=7, global_tokens=2, block=8,
                                   local_blocks=2, global_blocks=1, random_blocks=1, seed=4,
                                   max_length=64))
  mixer = make_mixer("sparse_attention", config, nnx.Rngs(0))
  assert isinstance(mixer, SparseAttention) and mixer.pattern == pattern
  if pattern == "lambda":
    assert mixer.mask == patterns.lambda_shape(window=7, global_tokens=2)
    assert mixer.distance_cap == 7
  elif pattern == "select":
    assert mixer.select == dict(block_size=8, top_k=4, sink_blocks=1, local_blocks=2)
  else:
    assert mixer.mask == patterns.bigbird(8, 2, 1, 1, 64, seed=4)
    assert mixer.max_length == 64
  y = _forward(mixer, jnp.ones((1, 20, D_MODEL)), None, None)
  assert y.shape == (1, 20, D_MODEL) and np.all(np.isfinite(np.asarray(y)))


def test_config_rejects_sequences_longer_than_the_layout():
  model = dict(layer_pattern=["sparse_attention"], sparse=dict(pattern="strided", max_length=128))
  with pytest.raises(ConfigError, match=r"data.seq_len=256 must be <= model.sparse.max_length=128"):
    from_dict(dict(model=model, data=dict(seq_len=256)))
  from_dict(dict(model=model, data=dict(seq_len=128)))


# ------------------------------------------------------------------ content-based selection


def _select_layer(top_k, **overrides):
  return SparseAttention(D_MODEL, num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(5),
                         pattern="select", block_size=4, top_k=top_k, **overrides)


def test_select_with_every_block_is_causal_attention_and_decodes_like_the_forward():
  """top_k covering every block: the mixer is plain causal attention with the same weights,
  and prefill + per-token decoding over the dense cache equals the forward."""
  from lsm.layers import Attention  # noqa: PLC0415
  layer = _select_layer(top_k=6)
  plain = Attention(D_MODEL, 4, 2, 8, rngs=nnx.Rngs(5))
  x = _x(8, T)
  positions = np.broadcast_to(np.arange(T), (2, T))
  segments = np.zeros((2, T), np.int32)
  full = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  assert_close(full, _forward(plain, _f32(x), jnp.asarray(positions), jnp.asarray(segments)),
               what="select (all blocks) vs attention")
  got, _ = _decode(layer, x, layer.init_cache(2, 32), 9, positions=positions,
                   segment_ids=segments)
  assert_close(got, full, what="decoded vs forward")


def test_select_with_few_blocks_attends_only_the_chosen_ones():
  """top_k=1 of 6 blocks: the forward is the selection function over the layer's own q, k, v,
  it differs from full attention, and a decode step equals `block_select_decode` for that
  token."""
  from lsm.kernels.attention import select  # noqa: PLC0415
  layer = _select_layer(top_k=1)
  x = _f32(_x(9, T))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  segments = jnp.zeros((2, T), jnp.int32)
  q, k, v = layer._project(x)
  q, k = layer._rope(q, positions), layer._rope(k, positions)
  want = layer._output(select.block_select_attention(q, k, v, block_size=4, top_k=1))
  got = _forward(layer, x, positions, segments)
  assert_close(got, want, what="layer vs selection function")
  dense = _forward(_select_layer(top_k=6), x, positions, segments)
  assert float(jnp.max(jnp.abs(got - dense))) > 1e-3
  cache = layer.init_cache(2, 32)
  _, cache = _cached(layer, x[:, :-1], positions[:, :-1], segments[:, :-1], cache)
  step, _ = _cached(layer, x[:, -1:], positions[:, -1:], segments[:, -1:], cache)
  keys = jnp.pad(k, [(0, 0), (0, 8), (0, 0), (0, 0)])
  values = jnp.pad(v, [(0, 0), (0, 8), (0, 0), (0, 0)])
  cache_pos = jnp.broadcast_to(jnp.where(jnp.arange(32) < T, jnp.arange(32), 2**30 - 1), (2, 32))
  want_step = layer._output(select.block_select_decode(
      q[:, -1:], keys, values, q_positions=positions[:, -1:], cache_positions=cache_pos,
      block_size=4, top_k=1))
  assert_close(step, want_step, what="decode step vs block_select_decode")


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=1), "pattern 'select' needs block_size"),
    (dict(block_size=4), "pattern 'select' needs top_k"),
    (dict(block_size=4, top_k=1, window=3), "window=3 is not a parameter of pattern 'select'"),
    (dict(block_size=0, top_k=1), "block_size must be an int >= 1, got 0"),
])
def test_select_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SparseAttention(D_MODEL, num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(0),
                    pattern="select", **kwargs)


# ------------------------------------------------------------------------------- routing


def _routing_layer(**overrides):
  return SparseAttention(D_MODEL, num_heads=4, num_kv_heads=2, head_dim=8, rngs=nnx.Rngs(6),
                         pattern="routing", num_clusters=3, **overrides)


def test_routing_is_the_routing_function_and_decodes_like_the_forward():
  from lsm.kernels.attention import routing  # noqa: PLC0415
  layer = _routing_layer()
  x = _f32(_x(10, T))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  segments = jnp.zeros((2, T), jnp.int32)
  q, k, v = layer._project(x)
  q, k = layer._rope(q, positions), layer._rope(k, positions)
  want = layer._output(routing.routing_attention(q, k, v, layer.centroids[...]))
  full = _forward(layer, x, positions, segments)
  assert_close(full, want, what="layer vs routing function")
  got, _ = _decode(layer, np.asarray(x), layer.init_cache(2, 32), 9,
                   positions=np.asarray(positions), segment_ids=np.asarray(segments))
  assert_close(got, full, what="decoded vs forward")


def test_routing_centroids_get_the_kmeans_pull_whatever_the_loss():
  """The centroids' gradient is centroid - normalise(mean of the normalised q and k routed to
  it), for two different losses; q/k/v projections get the loss's gradient as usual."""
  from lsm.kernels.attention import routing  # noqa: PLC0415
  layer = _routing_layer()
  x = _f32(_x(11, T))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  q, k, _ = layer._project(x)
  q, k = np.asarray(layer._rope(q, positions)), np.asarray(layer._rope(k, positions))
  c = np.asarray(layer.centroids[...], np.float64)
  cq = np.asarray(routing.route(jnp.asarray(q), jnp.asarray(c)))
  ck = np.asarray(routing.route(jnp.asarray(k), jnp.asarray(c)))
  unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
  want = np.zeros_like(c)
  for h in range(2):
    for j in range(3):
      members = [unit(q[b, t, g]) for b in range(2) for t in range(T) for g in (2 * h, 2 * h + 1)
                 if cq[b, t, g] == j]
      members += [unit(k[b, t, h]) for b in range(2) for t in range(T) if ck[b, t, h] == j]
      if members:
        want[h, j] = c[h, j] - unit(np.mean(members, 0))
  graphdef, params = nnx.split(layer)
  for weight in (1.0, -3.0):
    def loss(params):
      return weight * jnp.sum(nnx.merge(graphdef, params)(x, positions=positions) ** 2)

    grads = jax.grad(loss)(params)
    np.testing.assert_allclose(grads["centroids"][...], want, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grads["query"][...]).max()) > 0
