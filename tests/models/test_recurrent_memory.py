"""Recurrent memory around a layer pattern: the scan over segments equals an unrolled loop (logits
and gradients), truncated BPTT cuts exactly the documented transitions, packed documents reset the
memory, decoding equals the forward pass, and bad configs or calls fail with clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm import parallel
from lsm.config import ConfigError, load_config
from lsm.models import LM, RecurrentMemoryLM, build_model
from lsm.train.loop import build_model as build_train_model
from lsm.train.loop import check_layer_pattern_or_raise

VOCAB, M, S = 16, 2, 8
# The reference attention compiles fastest; what is tested here is the wrapper around the mixers.
SMALL = ["model.attention.implementation=reference", "model.d_model=32", "model.num_layers=1",
         "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=48",
         f"model.recurrent_memory.slots={M}", f"model.recurrent_memory.segment_length={S}"]


def _config(*overrides):
  return load_config(None, [*SMALL, *overrides]).model


def _model(*overrides, seed=0):
  with nnx.use_eager_sharding(False):
    return RecurrentMemoryLM(_config(*overrides), vocab_size=VOCAB, rngs=nnx.Rngs(seed))


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB, dtype=jnp.int32)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _packed(*lengths, rows=1):
  """(positions, segment_ids) [rows, sum(lengths)] of documents of these lengths packed."""
  positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
  segment_ids = np.repeat(np.arange(1, len(lengths) + 1), lengths).astype(np.int32)
  return tuple(jnp.asarray(np.broadcast_to(z, (rows, z.size))) for z in (positions, segment_ids))


# Shared by the tests (compiled once per model structure and shapes).
_forward = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
_decode = nnx.jit(lambda m, t, p, s, c: m.decode(t, positions=p, segment_ids=s, cache=c))


def _unrolled(model, x_BTD, bptt_segments, cotangent_BTV):
  """The documented semantics as a Python loop over segments (one document per row), each
  segment differentiated on its own and the chain rule applied by hand: the memory cotangent
  passed back from segment s into segment s - 1 is dropped for s < n - bptt_segments.
  Returns (logits, (parameter gradients, input gradients))."""
  graphdef, params = nnx.split(model, nnx.Param)
  b, t, _ = x_BTD.shape
  n = t // S
  ones = jnp.ones((b, S), jnp.int32)

  @jax.jit
  def segment(params, memory, x, cotangents):
    run = lambda p, m, x: nnx.merge(graphdef, p).segment(m, x, segment_ids=ones)  # noqa: E731
    out, vjp = jax.vjp(run, params, memory, x)
    return out, vjp(cotangents)

  xs = [x_BTD[:, s * S:(s + 1) * S] for s in range(n)]
  cots = [cotangent_BTV[:, s * S:(s + 1) * S] for s in range(n)]
  memories, logits = [model.initial_memory(b)], []
  for s in range(n):
    (out, memory), _ = segment(params, memories[s], xs[s],
                               (jnp.zeros_like(cots[s]), jnp.zeros_like(memories[s])))
    memories.append(memory)
    logits.append(out)
  grads = jax.tree.map(jnp.zeros_like, params)
  x_grads, memory_cotangent = [None] * n, jnp.zeros_like(memories[0])
  for s in reversed(range(n)):
    _, (g_params, g_memory, x_grads[s]) = segment(params, memories[s], xs[s],
                                                  (cots[s], memory_cotangent))
    grads = jax.tree.map(jnp.add, grads, g_params)
    kept = bptt_segments is None or s >= n - bptt_segments
    memory_cotangent = g_memory if kept else jnp.zeros_like(g_memory)
  grads = nnx.to_pure_dict(grads)
  grads["memory"] = grads["memory"] + jnp.sum(g_memory, axis=0)  # segment 0 read the parameter
  return jnp.concatenate(logits, axis=1), (grads, jnp.concatenate(x_grads, axis=1))


def test_scan_equals_an_unrolled_loop_and_truncated_bptt_cuts_older_segments_exactly():
  k, n = 1, 3
  model = _model(f"model.recurrent_memory.bptt_segments={k}")
  graphdef, params = nnx.split(model, nnx.Param)
  x = model.backbone.embed(_tokens(1, n * S))
  every = jax.random.normal(jax.random.key(7), (1, n * S, VOCAB), jnp.float32)

  @jax.jit
  def scan(params, x, cotangent):
    logits, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p).from_embeddings(x), params, x)
    return logits, vjp(cotangent)

  scan_logits, (scan_params, scan_x) = scan(params, x, every)
  loop_logits, (loop_params, loop_x) = _unrolled(model, x, k, every)
  assert _rel(scan_logits, loop_logits) < 1e-5
  assert _rel(scan_x, loop_x) < 1e-5
  loop_by_path = dict(jax.tree_util.tree_leaves_with_path(loop_params))
  for path, grad in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(scan_params)):
    where = jax.tree_util.keystr(path)
    assert float(jnp.max(jnp.abs(grad))) > 0, where
    assert _rel(grad, loop_by_path[path]) < 1e-5, where
  # The last segment's loss reaches segments n-1-k .. n-1 (k transitions) and nothing older.
  _, (_, last_x) = scan(params, x, every.at[:, :-S].set(0))
  per_segment = np.asarray(jnp.max(jnp.abs(last_x.reshape(n, S, -1)), axis=(1, 2)))
  assert np.all(per_segment[:n - 1 - k] == 0), per_segment
  assert np.all(per_segment[n - 1 - k:] > 0), per_segment


def test_packed_documents_reset_the_memory():
  model = _model()
  a, b = _tokens(1, S, seed=2), _tokens(1, 2 * S, seed=3)
  # Aligned to segments: a document after another reads what it reads alone (at a row's start).
  positions, segment_ids = (jnp.concatenate(z) for z in zip(_packed(S, 2 * S), _packed(2 * S, S)))
  logits = _forward(model, jnp.concatenate([jnp.concatenate([a, b], 1),
                                            jnp.concatenate([b, a], 1)]), positions, segment_ids)
  assert _rel(logits[0, S:], logits[1, :2 * S]) < 1e-5
  assert _rel(logits[1, 2 * S:], logits[0, :S]) < 1e-5
  # Starting inside a segment: the second document's logits do not depend on the first's tokens.
  first = S + 3
  tokens = _tokens(2, 3 * S, seed=5)
  tokens = tokens.at[1, first:].set(tokens[0, first:])
  assert not np.array_equal(np.asarray(tokens[0, :first]), np.asarray(tokens[1, :first]))
  packed = _forward(model, tokens, *_packed(first, 3 * S - first, rows=2))
  assert _rel(packed[1, first:], packed[0, first:]) < 1e-6
  joined = _forward(model, tokens, *_packed(3 * S, rows=2))
  assert _rel(joined[1, first:], joined[0, first:]) > 1e-2


def test_prefill_then_token_by_token_decoding_equals_the_forward_pass():
  model = _model()
  tokens = _tokens(2, 3 * S, seed=4)
  # Documents: all of segment 0; one starting at segment 1; one starting inside segment 1.
  positions, segment_ids = _packed(S, 5, 2 * S - 5, rows=2)
  full = _forward(model, tokens, positions, segment_ids)
  cache = model.init_cache(2, 3 * S)
  prefill = S + 3
  outs = []
  for start, stop in [(0, prefill)] + [(i, i + 1) for i in range(prefill, 3 * S)]:
    logits, cache = _decode(model, tokens[:, start:stop], positions[:, start:stop],
                            segment_ids[:, start:stop], cache)
    outs.append(logits)
  assert int(cache.count) == 0  # the last segment closed: its memory was written
  assert _rel(jnp.concatenate(outs, axis=1), full) < 1e-5


def test_build_model_picks_the_model_from_the_config():
  config = load_config(None, ["model.d_model=32", "model.num_layers=1", "model.num_heads=4",
                              "model.num_kv_heads=2", "model.mlp_dim=48", "data.seq_len=32",
                              f"model.recurrent_memory.slots={M}",
                              f"model.recurrent_memory.segment_length={S}"])
  assert isinstance(build_train_model(config, VOCAB, 0), RecurrentMemoryLM)
  plain = config.model.model_copy(update={"recurrent_memory": config.model.recurrent_memory
                                          .model_copy(update={"slots": 0})})
  with nnx.use_eager_sharding(False):
    model = build_model(plain, vocab_size=VOCAB, rngs=nnx.Rngs(0))
  assert type(model) is LM
  check_layer_pattern_or_raise(config)
  with pytest.raises(ConfigError, match="data.seq_len=36.*segment_length=8"):
    check_layer_pattern_or_raise(load_config(None, [f"model.recurrent_memory.slots={M}",
                                                    f"model.recurrent_memory.segment_length={S}",
                                                    "data.seq_len=36"]))
  with pytest.raises(ConfigError, match="model.recurrent_memory.slots=2.*parallel.sequence=1"):
    check_layer_pattern_or_raise(load_config(None, [f"model.recurrent_memory.slots={M}",
                                                    f"model.recurrent_memory.segment_length={S}",
                                                    "data.seq_len=32", "parallel.sequence=2"]))


def test_bad_configs_and_calls_raise_errors_that_name_the_argument():
  with pytest.raises(ValueError, match="model.recurrent_memory.slots must be a positive int"):
    RecurrentMemoryLM(_config("model.recurrent_memory.slots=0"), vocab_size=VOCAB,
                      rngs=nnx.Rngs(0))
  model = _model()
  with pytest.raises(ValueError, match="20 tokens.*segment_length=8"):
    model(_tokens(1, 20))
  with pytest.raises(TypeError, match="tokens must have an integer dtype"):
    model(jnp.zeros((1, S)))
  with pytest.raises(ValueError, match=r"tokens must have shape \[B, T\]"):
    model(_tokens(1, S)[0])
  with pytest.raises(ValueError, match="memory must have shape"):
    model.segment(jnp.zeros((1, M + 1, 32)), jnp.zeros((1, S, 32)),
                  segment_ids=jnp.ones((1, S), jnp.int32))
  with pytest.raises(ValueError, match="policy must be None"):
    model.init_cache(1, 16, policy=object())
  cache = model.init_cache(1, 16)
  with pytest.raises(ValueError, match="positions are required"):
    model.decode(_tokens(1, 1), positions=None, cache=cache)
  with pytest.raises(TypeError, match="cache must be a RecurrentMemoryCache"):
    model.decode(_tokens(1, 1), positions=jnp.zeros((1, 1), jnp.int32), cache={})
  with pytest.raises(ValueError, match="cache holds a batch of 1"):
    model.decode(_tokens(2, 1), positions=jnp.zeros((2, 1), jnp.int32), cache=cache)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "sequence": 2, "tensor": 1},
                            jax.devices()[:2])
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="model.recurrent_memory.slots=2"):
    model.token_layout(2 * S)
