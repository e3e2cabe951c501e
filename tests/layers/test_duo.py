"""DuoAttention: per-KV-head retrieval / streaming policies against `Attention` and a float64
definition, gates, prefill + decoding with bounded streaming caches, calibration that finds the
head needing long-range retrieval, the config and registry, and argument errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import ConfigError, ModelConfig, from_dict
from lsm.data import SYNTHETIC_VOCAB_SIZE
from lsm.layers import (Attention, BlockMemoryPolicy, DenseKVCache, DuoAttention, DuoCache,
                        DuoGate, RingKVCache, enable_gates, fix_head_types, rope_frequencies)
from lsm.models import LM, make_mixer
from lsm.train.duo_calibrate import calibrate, passkey_batches
from tests.layers.helpers import assert_close, cached as _cached, forward as _forward

D_MODEL = 16
WINDOW, SINKS = 4, 2
# 4 KV heads, 2 query heads each; neither type is a run of heads, and the order they come back
# in is not its own inverse.
MIXED = ("streaming", "retrieval", "streaming", "retrieval")


def _layer(head_types=MIXED, **kwargs):
  return DuoAttention(D_MODEL, 8, 4, 8, window=WINDOW, sink_tokens=SINKS, head_types=head_types,
                      rngs=nnx.Rngs(7), **kwargs)


def _x(seed, t, b=2):
  return np.random.default_rng(seed).standard_normal((b, t, D_MODEL))


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _packed(lengths, batch=2):
  segments = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  return np.repeat(positions, batch, 0), np.repeat(segments, batch, 0)


def _heads_definition(layer, x, positions, segment_ids):
  """Per query head, in float64: (full causal output, sink + window output), each [B, T, H, K]."""
  p = lambda v: np.asarray(v[...], np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p(w)) for w in (layer.query, layer.key, layer.value))
  theta = rope_frequencies(layer.head_dim, layer.rope_base)
  half = layer.head_dim // 2

  def rotate(z):
    angle = positions[:, :, None, None] * theta
    a, b = z[..., :half], z[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], -1)

  group = layer.num_heads // layer.num_kv_heads
  k_rot, v = np.repeat(rotate(k), group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhk,bshk->bhqs", rotate(q), k_rot) / np.sqrt(layer.head_dim)
  qp, kp = positions[:, None, :, None], positions[:, None, None, :]
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  causal = (kp <= qp) & same
  streaming = causal & ((qp - kp <= layer.window) | (kp < layer.sink_tokens))

  def softmax_out(visible):
    s = np.where(visible, scores, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqs,bshk->bqhk", w / w.sum(-1, keepdims=True), v)

  return softmax_out(causal), softmax_out(streaming)


def _definition(layer, x, positions, segment_ids, alpha_per_kv_head):
  """The layer in float64: each query head mixes its two outputs by its KV head's alpha."""
  full, streaming = _heads_definition(layer, x, positions, segment_ids)
  alpha = np.repeat(np.asarray(alpha_per_kv_head, np.float64),
                    layer.num_heads // layer.num_kv_heads)[:, None]
  return np.einsum("bqhk,hkd->bqd", alpha * full + (1 - alpha) * streaming,
                   np.asarray(layer.out[...], np.float64))


def test_all_retrieval_is_attention_and_all_streaming_is_sink_window_attention():
  x, (positions, segments) = _x(1, 20), _packed([7, 13])
  args = (_f32(x), jnp.asarray(positions), jnp.asarray(segments))
  for head_types, window in ((None, None), (("streaming",) * 4, WINDOW)):
    duo = _layer(head_types)
    plain = Attention(D_MODEL, 8, 4, 8, window=window,
                      sink_tokens=None if window is None else SINKS, rngs=nnx.Rngs(7))
    assert np.array_equal(duo.query[...], plain.query[...])  # the same parameters
    assert_close(_forward(duo, *args), _forward(plain, *args), what=f"{head_types}")


def test_mixed_head_types_match_the_float64_definition_and_packing():
  layer = _layer()
  a, b = _x(2, 9), _x(3, 15)
  x = np.concatenate([a, b], 1)
  positions, segments = _packed([9, 15])
  packed = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  alpha = [float(h == "retrieval") for h in MIXED]
  assert_close(packed, _definition(layer, x, positions, segments, alpha))
  alone = [_forward(layer, _f32(doc), None, None) for doc in (a, b)]
  assert_close(packed, jnp.concatenate(alone, 1), what="packed vs separate")
  # Each type matters: flipping one head's type changes the output.
  flipped = _layer(("retrieval",) * 4)
  assert np.abs(np.asarray(_forward(flipped, _f32(x), jnp.asarray(positions),
                                    jnp.asarray(segments)) - packed)).max() > 1e-3


def test_gates_mix_full_and_streaming_per_head():
  x, (positions, segments) = _x(4, 20), _packed([6, 14])
  args = (_f32(x), jnp.asarray(positions), jnp.asarray(segments))
  gated = _layer(gates=True)
  assert isinstance(gated.gates, DuoGate) and gated.gates.shape == (4,)
  assert gated.gates.get_metadata()["out_sharding"] == ("kv_heads",)
  assert_close(_forward(gated, *args), _forward(_layer(None), *args), what="alpha = 1")
  assert float(gated.distillation[...]) == 0.0
  gated.gates[...] = jnp.zeros(4, jnp.float32)
  assert_close(_forward(gated, *args), _forward(_layer(("streaming",) * 4), *args),
               what="alpha = 0")
  assert float(gated.distillation[...]) > 0.0
  alpha = [0.3, 0.8, 0.55, 0.1]
  gated.gates[...] = jnp.asarray(alpha, jnp.float32)
  assert_close(_forward(gated, *args), _definition(gated, x, positions, segments, alpha),
               what="alpha in between")


def test_prefill_then_decode_equals_one_forward_with_bounded_streaming_caches():
  """Row 0 packs two documents, row 1 starts at position 5; 13 prefill tokens overrun the ring
  (2 + 4 slots)."""
  layer = _layer()
  t = 24
  x = _x(5, t)
  pos0, seg0 = _packed([9, 15], batch=1)
  positions = np.concatenate([pos0, np.arange(5, 5 + t)[None]])
  segments = np.concatenate([seg0, np.zeros((1, t), np.int64)]).astype(np.int32)
  full = _forward(layer, _f32(x), jnp.asarray(positions), jnp.asarray(segments))
  cache = layer.init_cache(2, 32)
  assert isinstance(cache, DuoCache)
  assert isinstance(cache.retrieval, DenseKVCache) and isinstance(cache.streaming, RingKVCache)
  assert cache.retrieval.keys.shape == (2, 32, 2, 8)  # the two retrieval heads
  assert cache.streaming.keys.shape == (2, SINKS + WINDOW, 2, 8)  # bounded: the streaming heads
  edges = [0, 13, *range(14, t + 1)]
  outputs = []
  for start, stop in zip(edges[:-1], edges[1:]):
    y, cache = _cached(layer, _f32(x[:, start:stop]), jnp.asarray(positions[:, start:stop]),
                       jnp.asarray(segments[:, start:stop]), cache)
    outputs.append(y)
  assert_close(jnp.concatenate(outputs, 1), full, what="decoded vs full forward")
  assert cache.streaming.keys.shape[1] == SINKS + WINDOW
  only = _layer(("retrieval",) * 4).init_cache(1, 8)
  assert only.streaming is None and only.retrieval.keys.shape == (1, 8, 4, 8)


# --------------------------------------------------------------------------------- calibration
# A probe whose head 0 must look far back and whose head 1 looks at its last few tokens: the
# embedding holds a constant, a marker flag and random content; RoPE pair 3 (the slowest,
# 0.001 rad per position) carries head 0's marker match, pair 1 (0.1 rad) head 1's recency
# (scores are scaled by 1 / sqrt(8)).

VOCAB, T, PROBE_WINDOW = 12, 44, 6


class _Probe(nnx.Module):

  def __init__(self):
    rng = np.random.default_rng(0)
    embedding = np.zeros((VOCAB, 8))
    embedding[:, 0] = 1.0
    embedding[0, 1] = 1.0  # the marker token
    embedding[:, 2:] = rng.standard_normal((VOCAB, 6))
    self.embedding = nnx.Param(jnp.asarray(embedding, jnp.float32))
    self.mixer = DuoAttention(8, 2, 2, 8, window=PROBE_WINDOW, sink_tokens=1, rngs=nnx.Rngs(0))
    q, k, v, out = (np.zeros(w.shape) for w in (self.mixer.query, self.mixer.key,
                                                  self.mixer.value, self.mixer.out))
    q[0, 0, 3], k[1, 0, 3] = 8.0, 8.0  # head 0: every query finds the marker, however far
    q[0, 1, 1], k[0, 1, 1] = 400.0, 1.0  # head 1: 141 cos(0.1 d): the last 3 tokens or so
    for h in range(2):
      v[2:, h, 2:] = np.eye(6)
      out[h, 2:, 2:] = np.eye(6)
    for w, value in ((self.mixer.query, q), (self.mixer.key, k), (self.mixer.value, v),
                     (self.mixer.out, out)):
      w[...] = jnp.asarray(value, jnp.float32)

  def __call__(self, tokens):
    return self.mixer(self.embedding[...][tokens])


def _retrieval_batches(seed, batch=8):
  """Random content with one marker in the first quarter, far beyond the window of the end."""
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(1, VOCAB, (batch, T))
    tokens[np.arange(batch), rng.integers(0, T // 4, batch)] = 0
    yield tokens.astype(np.int32)


def test_calibration_keeps_the_retrieval_head_and_streams_the_local_one():
  probe = _Probe()
  before = np.asarray(probe.mixer.query[...])
  lines = []
  history = calibrate(probe, _retrieval_batches(0), steps=40, l1=0.02, lr=0.05, init=0.5,
                      log_every=20, log=lines.append)
  alpha = np.asarray(probe.mixer.gates[...])
  assert alpha[0] > 0.9 and alpha[1] < 0.1, alpha  # from 0.5: up for head 0, down for head 1
  assert history["loss"][-5:].mean() < 0.2 * history["loss"][:5].mean(), history["loss"]
  assert len(lines) == 2 and lines[-1].startswith("duo calibrate step 40/40: loss")
  assert np.array_equal(np.asarray(probe.mixer.query[...]), before)  # only the gates trained
  assert fix_head_types(probe, threshold=0.5) == [("retrieval", "streaming")]
  assert probe.mixer.gates is None and probe.mixer.head_types == ("retrieval", "streaming")


def test_fix_head_types_ranks_every_layer_by_alpha():
  a, b = _layer(gates=True), _layer(gates=True)
  model = nnx.List([a, b])
  a.gates[...] = jnp.asarray([0.9, 0.2, 0.6, 0.3], jnp.float32)
  b.gates[...] = jnp.asarray([0.1, 0.7, 0.6, 0.0], jnp.float32)
  tables = fix_head_types(model, retrieval_fraction=0.375)  # the top 3 of 8 alphas
  assert tables == [("retrieval", "streaming", "retrieval", "streaming"),
                    ("streaming", "retrieval", "streaming", "streaming")]  # 0.6 tie: a first
  assert (a.head_types, b.head_types) == tuple(tables)
  assert enable_gates(model, init=0.25) == 2 and float(a.gates[0]) == 0.25
  with pytest.raises(ValueError, match=r"enable_gates: init must be a number in \[0, 1\], got "
                                       r"-0.5"):
    enable_gates(model, init=-0.5)
  with pytest.raises(ValueError, match=r"DuoAttention.add_gates: init must be a number in "
                                       r"\[0, 1\], got 2"):
    a.add_gates(2)


def test_an_lm_calibrates_on_passkey_batches_then_decodes():
  """The registry and config build the layer; the LM's stacked layers take gates with a leading
  ``layers`` axis, calibrate on passkey batches, and decode after fix_head_types."""
  config = ModelConfig(d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=32,
                       layer_pattern=["duo_attention"],
                       sparse=dict(window=8, sink_tokens=2, head_types=["streaming", "retrieval"]))
  assert make_mixer("duo_attention", config, nnx.Rngs(0)).head_types == ("streaming", "retrieval")
  model = LM(config, vocab_size=SYNTHETIC_VOCAB_SIZE, rngs=nnx.Rngs(0))
  embedding = np.asarray(model.embed.embedding[...])
  history = calibrate(model, passkey_batches(seq_len=32, batch_size=2, seed=0, num_digits=3),
                      steps=2, log_every=None)
  assert history["loss"].shape == (2,) and np.all(np.isfinite(history["loss"]))
  mixer = model.blocks.mixers[0]
  assert mixer.gates.shape == (2, 2)  # (layers, kv heads), named so
  assert mixer.gates.get_metadata()["out_sharding"] == ("layers", "kv_heads")
  assert np.array_equal(np.asarray(model.embed.embedding[...]), embedding)
  assert len(fix_head_types(model, threshold=0.99)) == 1 and mixer.gates is None
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, SYNTHETIC_VOCAB_SIZE, (1, 12)))
  positions = jnp.arange(12)[None]
  logits, cache = model.decode(tokens, positions=positions, cache=model.init_cache(1, 16))
  assert_close(logits, model(tokens), what="LM decode vs forward")


# --------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window=0), ValueError, r"DuoAttention: window must be a positive int, got 0"),
    (dict(sink_tokens=-1), ValueError,
     r"DuoAttention: sink_tokens must be a non-negative int, got -1"),
    (dict(head_types=("retrieval",)), ValueError,
     r"DuoAttention: head_types must hold one of \('retrieval', 'streaming'\) for each of the 4 "
     r"KV heads, got \('retrieval',\)"),
    (dict(head_types=("retrieval", "local", "streaming", "streaming")), ValueError,
     r"head_types must hold one of .* got \('retrieval', 'local', 'streaming', 'streaming'\)"),
    (dict(head_types="retrieval"), TypeError,
     r"DuoAttention: head_types must be a tuple of .* or None, got str"),
    (dict(gates=1), TypeError, r"DuoAttention: gates must be a bool, got 1"),
    (dict(gates=True, gate_init=1.5), ValueError,
     r"DuoAttention: gate_init must be a number in \[0, 1\], got 1.5"),
])
def test_bad_arguments_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    DuoAttention(D_MODEL, 8, 4, 8, rngs=nnx.Rngs(0), **{**dict(window=4), **kwargs})


def test_bad_caches_and_calibrations_are_named():
  layer = _layer()
  x = _f32(_x(0, 3))
  with pytest.raises(ValueError, match=r"DuoAttention.init_cache: policy must be None"):
    layer.init_cache(1, 8, policy=BlockMemoryPolicy(sink_tokens=1, window=2, block_size=2,
                                                    top_k=1, representatives=1))
  with pytest.raises(TypeError, match=r"DuoAttention: cache must be a DuoCache"):
    layer(x, positions=jnp.arange(3), cache=DenseKVCache.create(2, 8, 4, 8))
  with pytest.raises(ValueError, match=r"DuoAttention: cache.retrieval must be a DenseKVCache "
                                       r"of \(batch, kv heads, head dim\) = \(2, 2, 8\) for "
                                       r"head_types=.*, got a DenseKVCache of .* = \(2, 4, 8\)"):
    layer(x, positions=jnp.arange(3), cache=_layer(("retrieval",) * 4).init_cache(2, 8))
  with pytest.raises(ValueError, match=r"DuoAttention: positions are required with a cache"):
    layer(x, cache=layer.init_cache(2, 8))
  gated = _layer(gates=True)
  with pytest.raises(ValueError, match=r"DuoAttention: cache must be None while the layer has "
                                       r"gates"):
    gated(x, positions=jnp.arange(3), cache=layer.init_cache(2, 8))
  with pytest.raises(ValueError, match=r"fix_head_types: give exactly one of threshold or "
                                       r"retrieval_fraction, got neither"):
    fix_head_types(gated)
  with pytest.raises(ValueError, match=r"fix_head_types: threshold must be a number in \[0, 1\], "
                                       r"got 2"):
    fix_head_types(gated, threshold=2)
  with pytest.raises(ValueError, match=r"fix_head_types: model must contain a DuoAttention layer "
                                       r"with gates"):
    fix_head_types(layer, threshold=0.5)
  probe = _Probe()
  for kwargs, match in ((dict(steps=0), r"calibrate: steps must be a positive int, got 0"),
                        (dict(steps=1, l1=-1.0), r"calibrate: l1 must be a finite number >= 0"),
                        (dict(steps=1, lr=0), r"calibrate: lr must be a positive finite number"),
                        (dict(steps=3), r"calibrate: batches ran out after 2 of steps=3")):
    with pytest.raises(ValueError, match=match):
      calibrate(probe, [np.zeros((1, T), np.int32)] * 2, log_every=None, **kwargs)
  with pytest.raises(TypeError, match=r"calibrate: forward must be callable"):
    calibrate(probe, [], steps=1, forward=3)
  with pytest.raises(ValueError, match=r"enable_gates: model must contain a DuoAttention layer"):
    calibrate(Attention(D_MODEL, 2, 2, rngs=nnx.Rngs(0)), [], steps=1)


def test_config_names_bad_head_types():
  model = dict(num_kv_heads=2, layer_pattern=["duo_attention"])
  with pytest.raises(ConfigError, match=r"model.sparse.head_types=\['retrieval'\] must have one "
                                        r"entry per KV head, model.num_kv_heads=2"):
    from_dict(dict(model={**model, "sparse": dict(head_types=["retrieval"])}))
  with pytest.raises(ConfigError, match=r"model.sparse.head_types.1"):
    from_dict(dict(model={**model, "sparse": dict(head_types=["retrieval", "local"])}))
  config = from_dict(dict(model={**model, "sparse": dict(head_types=["retrieval", "streaming"])}))
  assert config.model.sparse.head_types == ["retrieval", "streaming"]
