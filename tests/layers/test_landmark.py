"""The landmark attention mixer: training mode against the float64 kernel reference, inference
(top-k retrieval from the block cache) against training mode, the DESIGN.md invariants (packing;
prefill then decoding equals one forward), causality, the chosen blocks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import ModelConfig
from lsm.kernels.attention import landmark_attention
from lsm.layers import LandmarkAttention, LandmarkCache, rope_frequencies
from lsm.models import make_mixer
from tests.layers.helpers import assert_close, cached as _cached, forward as _forward

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 4, 2, 8, 3
SPAN = BLOCK + 1
T = 23  # 5 complete blocks and 3 tokens


def _layer(**overrides):
  # Chunks of 8 queries: forwards and prefills run in several chunks, the last one padded.
  kwargs = dict(block_size=BLOCK, qk_norm=True, query_chunk=8, rngs=nnx.Rngs(7))
  layer = LandmarkAttention(D_MODEL, HEADS, KV_HEADS, HEAD_DIM, **{**kwargs, **overrides})
  for norm, seed in ((layer.query_norm, 1), (layer.key_norm, 2)):  # non-trivial norm scales
    norm.scale[...] = jnp.asarray(1 + 0.3 * np.random.default_rng(seed).standard_normal(HEAD_DIM),
                                  jnp.float32)
  return layer


def _x(seed, t=T, b=2):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D_MODEL)), jnp.float32)


def _packed(*rows):
  """Positions restarting per document and segment ids 1, 2, ... for rows of document lengths."""
  positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in rows])
  segments = np.stack([np.repeat(np.arange(1, len(row) + 1), row) for row in rows])
  return jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)


@nnx.jit
def _select(layer, x, positions, segment_ids, cache):
  return layer.select_blocks(x, positions=positions, segment_ids=segment_ids, cache=cache)


@jax.jit
def _kernel_reference(q, k, v, positions, segment_ids):
  return landmark_attention(q, k, v, block_size=BLOCK, positions=positions,
                            segment_ids=segment_ids, implementation="reference")


def _numpy_projections(layer, x, positions):
  """q, k (RMS-normed and rotated) and v of the layer, in float64 numpy."""
  p = lambda w: np.asarray(w[...], np.float64)
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p(w)) for w in (layer.query, layer.key, layer.value))
  rms = lambda z, scale: z / np.sqrt(np.mean(z * z, -1, keepdims=True) + 1e-6) * scale
  q, k = rms(q, p(layer.query_norm.scale)), rms(k, p(layer.key_norm.scale))
  return rotate(q, positions), rotate(k, positions), v


def rotate(z, positions):
  angle = np.asarray(positions, np.float64)[..., None, None] * rope_frequencies(HEAD_DIM)
  a, b = z[..., :HEAD_DIM // 2], z[..., HEAD_DIM // 2:]
  return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                         b * np.cos(angle) + a * np.sin(angle)], -1)


def test_training_mode_matches_the_float64_kernel_reference():
  layer = _layer()
  positions, segments = _packed([9, 14], [23])
  x = _x(0)
  q, k, v = _numpy_projections(layer, x, positions)
  out = _kernel_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), positions, segments)
  want = np.einsum("bthk,hkd->btd", np.asarray(out), np.asarray(layer.out[...], np.float64))
  got = _forward(layer, x, positions, segments)
  assert got.dtype == jnp.float32
  assert_close(got, want)


def test_packing_equals_separate_documents():
  # The reference kernel compiles faster; the kernel tests hold the xla path to packing.
  layer = _layer(implementation="reference")
  a_and_b = _x(1, t=11)
  positions, segments = _packed([11, 11])
  packed = _forward(layer, a_and_b.reshape(1, 22, D_MODEL), positions, segments)
  alone = _forward(layer, a_and_b, None, None)  # default positions, one segment per row
  assert_close(packed, alone.reshape(1, 22, D_MODEL), what="packed vs separate")


def test_retrieving_every_block_equals_training_mode():
  """top_k >= the number of blocks: the forward (a prefill into a fresh cache) with renumbered
  positions is the training mode (stored positions: the decoding test)."""
  positions, segments = _packed([T], [T])
  x = _x(2)
  training = _forward(_layer(), x, positions, segments)
  inference = _forward(_layer(top_k=8, positions="renumbered"), x, positions, segments)
  assert_close(inference, training, what="top_k = all vs training")


def _decode(layer, x, positions, segments, prefill=1, memory=None, on_step=None):
  """A prefill of ``prefill`` tokens, then one token at a time."""
  cache = layer.init_cache(x.shape[0], T, memory=memory)
  outputs = []
  edges = [0, *range(prefill, T + 1)]
  for start, stop in zip(edges[:-1], edges[1:]):
    y, cache = _cached(layer, x[:, start:stop], positions[:, start:stop],
                       segments[:, start:stop], cache)
    outputs.append(y)
    if on_step is not None:
      on_step(cache)
  return jnp.concatenate(outputs, 1)


def _memory_kind(x):
  return x.sharding.memory_kind


def test_host_memory_cache_decodes_like_the_device_cache():
  """Keys and values in pinned host memory (written and gathered on the host): the same outputs
  as the device cache, and after every step they are still in host memory while the landmark
  keys, positions and ids stay on the device."""
  layer = _layer(top_k=2, positions="renumbered")
  positions, segments = _packed([T], [10, 13])
  x = _x(5)

  def placed(cache):
    assert cache.memory == "host"
    assert (_memory_kind(cache.keys), _memory_kind(cache.values)) == ("pinned_host",) * 2
    assert {_memory_kind(a) for a in (cache.landmarks, cache.positions, cache.segment_ids)} == {
        "device"}

  on_host = _decode(layer, x, positions, segments, prefill=9, memory="host", on_step=placed)
  on_device = _decode(layer, x, positions, segments, prefill=9)
  assert_close(on_host, on_device, what="host-memory cache vs device cache")
  # The jitted step really runs the cache's keys and values through host computations.
  cache = layer.init_cache(2, T, memory="host")
  hlo = _cached.lower(layer, x[:, :4], positions[:, :4], segments[:, :4], cache).as_text()
  assert "pinned_host" in hlo and "_xla_compute_type" in hlo
  device = layer.init_cache(2, T)
  hlo = _cached.lower(layer, x[:, :4], positions[:, :4], segments[:, :4], device).as_text()
  assert "pinned_host" not in hlo and "_xla_compute_type" not in hlo


def test_cache_memory_comes_from_the_layer_and_the_config():
  config = ModelConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       head_dim=HEAD_DIM, layer_pattern=["landmark"],
                       landmark=dict(block_size=5, top_k=3, cache_memory="host"))
  mixer = make_mixer("landmark", config, nnx.Rngs(0))
  cache = mixer.init_cache(1, 12)
  assert (cache.memory, _memory_kind(cache.keys)) == ("host", "pinned_host")
  cache = mixer.init_cache(1, 12, memory="device")
  assert (cache.memory, _memory_kind(cache.keys)) == ("device", "device")
  # Created under jit (as generate does) the placement holds too.
  cache = nnx.jit(lambda m: m.init_cache(1, 12))(mixer)
  assert _memory_kind(cache.keys) == "pinned_host"


def test_host_memory_needs_a_backend_that_has_it(monkeypatch):
  class Memory:
    kind = "device"

  class Device:
    def addressable_memories(self):
      return [Memory()]

  monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
  with pytest.raises(ValueError, match=r"cache_memory='host' needs a backend with a "
                                       r"'pinned_host' memory kind; .* offers \['device'\]"):
    _layer(cache_memory="host")


def test_prefill_then_decode_equals_one_forward_with_top_k():
  layer = _layer(top_k=2, positions="renumbered")
  positions, segments = _packed([T], [T])
  x = _x(3)
  full = _forward(layer, x, positions, segments)
  assert_close(_decode(layer, x, positions, segments, prefill=15), full,
               what="decoded vs forward")
  training = _forward(_layer(), x, positions, segments)
  assert float(jnp.max(jnp.abs(full - training))) > 1e-3  # top-2 of 5 blocks is not everything


def test_decoding_rows_of_different_lengths_equals_training_mode():
  """Stored positions, top_k None (every block): row 0 decodes one document of 23 tokens, row 1
  a document of 10 and then a new one of 13 that replaces it in the cache row."""
  positions, segments = _packed([T], [10, 13])
  x = _x(4)
  training = _forward(_layer(), x, positions, segments)  # packed: documents never see each other
  assert_close(_decode(_layer(positions="stored"), x, positions, segments), training,
               what="decoded vs training")


def test_outputs_depend_exactly_on_earlier_tokens():
  layer = _layer()
  t = 11
  x = _x(5, t=t, b=1)
  jacobian = jax.jit(jax.jacrev(lambda x: layer(x)))(x)  # [1, T, D, 1, T, D]
  dependence = np.abs(np.asarray(jacobian)).sum(axis=(0, 2, 3, 5))
  earlier = np.arange(t)[None, :] <= np.arange(t)[:, None]
  assert np.all(dependence[~earlier] == 0.0)
  assert np.all(dependence[earlier] > 0.0)


@pytest.mark.parametrize("mode", ["stored", "renumbered"])
def test_top_k_selects_the_best_landmarks(mode):
  """Blocks chosen by `select_blocks` are the top 2 by the landmark score written out in float64:
  the query at its position against each complete earlier landmark of its document, at the
  landmark's position ("stored") or right before the query's own block ("renumbered")."""
  layer = _layer(top_k=2, positions=mode)
  positions, segments = _packed([T], [T])
  x = _x(6)
  blocks, scores = _select(layer, x, positions, segments, layer.init_cache(2, T))
  q, _, _ = _numpy_projections(layer, x, np.zeros((2, T)))  # unrotated
  _, k, _ = _numpy_projections(layer, x, np.zeros((2, T)))
  pos = np.arange(T)
  own = pos // SPAN
  marks = np.arange(BLOCK, T, SPAN)  # landmark tokens of blocks 0 .. 4
  mark_pos = marks if mode == "stored" else own[:, None] * SPAN - 1  # [n] or [T, 1]
  q_rot = rotate(q, np.broadcast_to(pos, (2, T)))
  want = np.full((2, T, HEADS, (T + SPAN - 1) // SPAN), -np.inf)
  for i in range(T):
    k_rot = rotate(k[:, marks], np.broadcast_to(mark_pos if mode == "stored" else mark_pos[i],
                                                (2, len(marks))))
    s = np.einsum("bhd,bnhd->bhn", q_rot[:, i], np.repeat(k_rot, 2, axis=2)) / np.sqrt(HEAD_DIM)
    want[:, i, :, :own[i]] = s[:, :, :own[i]]
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(scores), finite)
  assert_close(np.where(finite, scores, 0.0), np.where(finite, want, 0.0), what="scores")
  for row in range(2):
    for i in range(T):
      for h in range(HEADS):
        eligible = int(finite[row, i, h].sum())
        best = np.argsort(-want[row, i, h], kind="stable")[:min(2, eligible)]
        chosen = np.asarray(blocks[row, i, h])
        assert sorted(best) == sorted(chosen[chosen >= 0]), (row, i, h)
        assert np.all(chosen[:2 - len(best)] == -1) and np.all(np.diff(chosen) >= 0)


def test_top_k_output_is_the_grouped_softmax_over_the_chosen_blocks():
  """Renumbered positions, top 2: the output of the last queries written out in float64 from the
  chosen blocks: a softmax over the own block's logits and the chosen landmarks' logits, each
  landmark's share spread over its block; chosen blocks rotated right before the own block."""
  layer = _layer(top_k=2, positions="renumbered")
  positions, segments = _packed([T], [T])
  x = _x(7)
  y = _forward(layer, x, positions, segments)
  blocks, _ = _select(layer, x, positions, segments, layer.init_cache(2, T))
  q, k, v = _numpy_projections(layer, x, np.zeros((2, T)))  # unrotated
  w_out = np.asarray(layer.out[...], np.float64)
  for i in range(T - 6, T):
    own = i // SPAN
    heads = []
    for b, h in np.ndindex(2, HEADS):
      kv = h // (HEADS // KV_HEADS)
      score = lambda j, p: float(rotate(q[b, i, h], i)[0] @ rotate(k[b, j, kv], p)[0]) / np.sqrt(
          HEAD_DIM)
      logits = [score(j, j) for j in range(own * SPAN, i + 1)]
      values = list(v[b, own * SPAN:i + 1, kv])
      for r, n in enumerate(np.asarray(blocks[b, i, h])):
        if n < 0:
          continue
        start = (own - 2 + r) * SPAN  # renumbered
        inner = np.array([score(n * SPAN + e, start + e) for e in range(BLOCK)])
        inner = np.exp(inner - inner.max())
        logits.append(score(n * SPAN + BLOCK, start + BLOCK))
        values.append(inner / inner.sum() @ v[b, n * SPAN:n * SPAN + BLOCK, kv])
      p = np.exp(np.array(logits) - max(logits))
      heads.append(p / p.sum() @ np.array(values))
    want = np.einsum("bhk,hkd->bd", np.array(heads).reshape(2, HEADS, HEAD_DIM), w_out)
    assert_close(y[:, i], want, what=f"query {i}")


def test_registry_builds_the_mixer_from_the_config():
  config = ModelConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       head_dim=HEAD_DIM, layer_pattern=["landmark"],
                       landmark=dict(block_size=5, top_k=3, positions="stored"))
  mixer = make_mixer("landmark", config, nnx.Rngs(0))
  assert isinstance(mixer, LandmarkAttention)
  assert (mixer.block_size, mixer.top_k, mixer.retrieved_positions) == (5, 3, "stored")
  for kernel in ("pallas_gpu", "pallas_tpu"):  # one landmark kernel for both backends
    config = config.model_copy(update=dict(attention=config.attention.model_copy(
        update=dict(implementation=kernel))))
    assert make_mixer("landmark", config, nnx.Rngs(0)).implementation == "pallas"


def test_pallas_training_mode_equals_xla():
  """The layer with the Pallas kernel (interpreted here) on one document per row: aligned."""
  positions, segments = _packed([T], [T])
  x = _x(8)
  assert_close(_forward(_layer(implementation="pallas"), x, positions, segments),
               _forward(_layer(), x, positions, segments), what="pallas vs xla")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (dict(top_k=0), ValueError, "top_k must be a positive int or None, got 0"),
    (dict(positions="absolute"), ValueError, "positions must be one of"),
    (dict(implementation="pallas_gpu"), ValueError, "implementation must be one of"),
    (dict(head_dim=7), ValueError, "head_dim must be even"),
    (dict(query_chunk=0), ValueError, "query_chunk must be a positive int, got 0"),
    (dict(num_kv_heads=3), ValueError, "multiple of num_kv_heads"),
    (dict(cache_memory="disk"), ValueError,
     r"cache_memory must be one of \('device', 'host'\), got 'disk'"),
])
def test_constructor_errors(kwargs, error, message):
  args = dict(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
              block_size=BLOCK, rngs=nnx.Rngs(0))
  with pytest.raises(error, match=message):
    LandmarkAttention(**{**args, **kwargs})


def test_call_errors():
  layer = _layer()
  x = _x(0, t=5, b=1)
  positions = jnp.arange(5)[None]
  cases = [
      (dict(cache=layer.init_cache(2, 8)), ValueError, r"cache must have \(batch"),
      (dict(cache=_layer(block_size=4).init_cache(1, 8)), ValueError,
       "cache must have the layer's block_size=3, got block_size=4"),
      (dict(cache={"keys": 0}), TypeError, "cache must be a LandmarkCache"),
      (dict(cache=layer.init_cache(1, 8), positions=None), ValueError,
       "positions are required with a cache"),
      (dict(cache=layer.init_cache(1, 4)), ValueError, r"positions must lie in \[0, 4\)"),
      (dict(positions=jnp.arange(6)[None]), ValueError, "positions must have shape"),
  ]
  for kwargs, error, message in cases:
    with pytest.raises(error, match=message):
      layer(x, **{"positions": positions, **kwargs})
  top_k = _layer(top_k=2)
  with pytest.raises(ValueError, match="each row must hold one document"):
    top_k(x, positions=positions, segment_ids=jnp.asarray([[1, 1, 2, 2, 2]]))
  with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
    top_k(x, positions=positions + 3)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    LandmarkCache.create(1, 8, 2, 8, block_size=0)
  with pytest.raises(ValueError, match="LandmarkCache: memory must be one of"):
    LandmarkCache.create(1, 8, 2, 8, block_size=3, memory="pinned_host")
  with pytest.raises(ValueError, match="init_cache: memory must be one of"):
    layer.init_cache(1, 8, memory="gpu")
