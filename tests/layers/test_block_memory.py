"""Block memory (InfLLM-style) decoding cache, against a float64 simulation of its definition:
with an unbounded budget it is full attention; with a small one it attends exactly the sinks,
the top-k blocks by representative score and the window, in a fixed budget over a long decode.
generate() with the policy equals the full cache; argument errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import ConfigError, load_config
from lsm.decode import cache_policy_of, generate
from lsm.kernels.attention import Mask
from lsm.layers import Attention, BlockMemoryKVCache, BlockMemoryPolicy
from lsm.models import LM
from tests.layers.helpers import assert_close

D_MODEL = 16


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _simulate(q, k, v, positions, segments, chunks, policy):
  """The block memory written out in float64 from its definition: which tokens are sinks,
  window or stored blocks, each query's top-k blocks by representative score, its attention over
  the visible set, the attention each local token receives, and each evicted block's
  representatives. Returns (out, selected blocks per chunk [b, t, g] lists, visible keys per
  chunk [b, t, g], representative tokens per stored block [b, g, R])."""
  b, _, h, d = q.shape
  g = k.shape[2]
  group = h // g
  sinks, window, bs = policy.sink_tokens, policy.window, policy.block_size
  received = np.zeros(k.shape[:3])
  reps, out, selected, counts = [], np.zeros(q.shape), [], []

  def stored(written):
    return max(0, math.ceil((max(written - sinks, 0) - window) / bs))

  length = 0
  for t in chunks:
    new = list(range(length, length + t))
    blocks = stored(length)
    local = list(range(sinks + blocks * bs, max(length, sinks))) + [n for n in new if n >= sinks]
    near = list(range(min(length, sinks))) + local
    chunk_selected = np.empty((b, t, g), object)
    chunk_counts = np.zeros((b, t, g), int)
    for row in range(b):
      for i, n_q in enumerate(new):
        def seen(n, row=row, n_q=n_q):
          return (positions[row, n] <= positions[row, n_q]) and (
              segments[row, n] == segments[row, n_q])

        for kv in range(g):
          q_g = q[row, n_q, kv * group:(kv + 1) * group].sum(0)
          scores = [max((q_g @ k[row, r, kv] for r in reps[j][row, kv] if seen(r)),
                        default=-np.inf) for j in range(blocks)]
          top = sorted(range(blocks), key=lambda j: (-scores[j], j))[:policy.top_k]
          chunk_selected[row, i, kv] = top
          far = [sinks + j * bs + o for j in top for o in range(bs)]
          visible = [n for n in sorted(set(near) | set(new)) + far if seen(n)]
          chunk_counts[row, i, kv] = len(visible)
          for head in range(kv * group, (kv + 1) * group):
            logits = k[row, visible, kv] @ q[row, n_q, head] / np.sqrt(d)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[row, n_q, head] = p @ v[row, visible, kv]
            for n, weight in zip(visible, p):
              if n in local:
                received[row, n, kv] += weight
    length += t
    for j in range(blocks, stored(length)):
      tokens = sinks + j * bs + np.arange(bs)
      reps.append(np.array([[tokens[np.argsort(-received[row, tokens, kv], kind="stable")]
                             [:policy.representatives] for kv in range(g)] for row in range(b)]))
    selected.append(chunk_selected)
    counts.append(chunk_counts)
  return out, selected, counts, reps


@functools.partial(jax.jit, static_argnums=6)
def _select_and_attend(cache, q, k, v, positions, segment_ids, implementation):
  """The blocks the chunk's queries pick, and the attention."""
  picked = cache.select(q, positions, segment_ids)
  return picked, *cache.attend(q, k, v, positions, segment_ids, implementation=implementation)


def _visible(cache, picked, q_pos, q_seg):
  """Keys each query [B, t, G] may see among what the cache attends — its sink and window slots,
  the chunk, and the picked blocks — counted from the cache's own slots."""
  def seen(kv_pos, kv_seg, q_pos, q_seg):
    return (kv_pos <= q_pos) & (kv_seg == q_seg)

  near_pos = np.concatenate([cache.sinks.positions, cache.window.positions, q_pos], 1)
  near_seg = np.concatenate([cache.sinks.segment_ids, cache.window.segment_ids, q_seg], 1)
  near = seen(near_pos[:, None], near_seg[:, None], q_pos[:, :, None], q_seg[:, :, None]).sum(-1)
  rows = np.arange(q_pos.shape[0])[:, None, None, None]
  far_pos = np.asarray(cache.blocks.positions)[rows, picked]  # [B, t, G, k, bs]
  far_seg = np.asarray(cache.blocks.segment_ids)[rows, picked]
  far = seen(far_pos, far_seg, q_pos[:, :, None, None, None], q_seg[:, :, None, None, None])
  return near[:, :, None] + far.sum((-2, -1))


def _inputs(seed, h, g, total, *, packed=False):
  """Random q [2, T, h, 8], k, v [2, T, g, 8] (float64), positions (row 1 starts at 5) and
  segment ids; ``packed``: row 1 holds two documents (positions restart, new id at token 12)."""
  rng = np.random.default_rng(seed)
  b, d = 2, 8
  q = rng.standard_normal((b, total, h, d))
  k, v = (rng.standard_normal((b, total, g, d)) for _ in range(2))
  positions = np.stack([np.arange(total), np.arange(5, 5 + total)]).astype(np.int32)
  segments = np.zeros((b, total), np.int32)
  if packed:
    positions[1, 12:], segments[1, 12:] = np.arange(total - 12), 1
  return q, k, v, positions, segments


def _decode_like_the_simulation(policy, q, k, v, positions, segments, prefill, implementation):
  """Prefill chunks, then one token at a time through a `BlockMemoryKVCache`; at every step the
  picked blocks and the number of visible keys equal the float64 simulation's, stay within the
  budget, and the cache keeps its shapes; the outputs equal the simulation's.
  Returns (outputs, visible keys per step, the simulation's representatives, cache)."""
  b, total, _, d = q.shape
  chunks = [*prefill, *[1] * (total - sum(prefill))]
  ref_out, ref_selected, ref_counts, ref_reps = _simulate(q, k, v, positions, segments, chunks,
                                                         policy)
  cache = BlockMemoryKVCache.create(b, total, k.shape[2], d, policy=policy)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
  outputs, start = [], 0
  for step, t in enumerate(chunks):
    now = slice(start, start + t)
    start += t
    picked, y, new_cache = _select_and_attend(cache, _f32(q[:, now]), _f32(k[:, now]),
                                              _f32(v[:, now]), positions[:, now],
                                              segments[:, now], implementation)
    picked = np.asarray(picked)
    for (row, i, kv), top in np.ndenumerate(ref_selected[step]):
      assert picked[row, i, kv, :len(top)].tolist() == top, (step, row, i, kv)
    counts = _visible(cache, picked, positions[:, now], segments[:, now])
    np.testing.assert_array_equal(counts, ref_counts[step])
    assert counts.max() <= policy.budget(t)
    cache = new_cache
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == shapes  # memory never grows
    outputs.append(y)
  outputs = jnp.concatenate(outputs, 1)
  assert_close(outputs, ref_out, what="block memory vs float64 simulation")
  assert int(cache.length) == total
  assert int(cache.stored_blocks(cache.length)) == len(ref_reps)
  return outputs, ref_counts, ref_reps, cache


def _full_attention(q, k, v, positions, segments):
  """Causal attention over every earlier token of the segment, float64."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  ok = (positions[:, None, None, :] <= positions[:, None, :, None]) & (
      segments[:, None, None, :] == segments[:, None, :, None])
  scores = np.where(ok, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def test_unbounded_budget_decodes_like_full_attention():
  """top_k >= every block the cache can hold: a prefill chunk longer than sinks + window (it
  evicts several blocks at once), then token-by-token decoding, equal full causal attention
  (GQA, batch 2, row 1 starting at position 5); every query sees its whole context."""
  policy = BlockMemoryPolicy(sink_tokens=2, window=4, block_size=2, top_k=8, representatives=1)
  q, k, v, positions, segments = _inputs(0, 4, 2, 18)
  out, counts, _, cache = _decode_like_the_simulation(policy, q, k, v, positions, segments, [11],
                                                      "reference")
  assert cache.num_blocks == 6 <= policy.top_k
  assert_close(out, _full_attention(q, k, v, positions, segments), what="vs full attention")
  np.testing.assert_array_equal(counts[-1][:, 0], 18)


# (policy, query heads, kv heads, prefill chunks, total tokens, implementation).
# "gqa_sinks_packed": row 1 holds two packed documents; the op's default implementation.
# "mqa": no sinks, a window of one block (it holds 1 to 3 tokens), a second prefill chunk that
# evicts window and chunk tokens in one block; "reference" (it compiles fastest).
CASES = {
    "gqa_sinks_packed": (dict(sink_tokens=2, window=4, block_size=2, top_k=2,
                              representatives=1), 4, 2, [9], 40, None),
    "mqa": (dict(sink_tokens=0, window=3, block_size=3, top_k=1, representatives=2), 2, 1,
            [2, 7], 24, "reference"),
}


@pytest.mark.parametrize("name", CASES)
def test_small_budget_attends_sinks_top_blocks_and_window_in_a_fixed_budget(name):
  """The attended set is the sinks, the window, the chunk and the top-k blocks by
  representative score (the float64 simulation builds it by hand), the budget binds over a
  decode several times longer than it, and the representatives are the simulation's."""
  kwargs, h, g, prefill, total, implementation = CASES[name]
  policy = BlockMemoryPolicy(**kwargs)
  q, k, v, positions, segments = _inputs(len(name), h, g, total, packed=name.endswith("packed"))
  _, counts, ref_reps, cache = _decode_like_the_simulation(policy, q, k, v, positions, segments,
                                                           prefill, implementation)
  # The last query of row 0 sees fewer keys than the context holds: the budget binds.
  assert total > counts[-1][0, -1].max() >= policy.budget() - policy.block_size
  stored = len(ref_reps)
  assert stored > policy.top_k
  rep_tokens = np.stack(ref_reps, 1).transpose(0, 1, 3, 2)  # [b, blocks, R, g]
  rows = np.arange(q.shape[0])[:, None, None, None]
  np.testing.assert_array_equal(cache.rep_positions[:, :stored], positions[rows, rep_tokens])
  np.testing.assert_array_equal(cache.rep_segment_ids[:, :stored], segments[rows, rep_tokens])


VOCAB = 30


@pytest.fixture(scope="module")
def model():
  config = load_config(None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                              "model.num_kv_heads=2", "model.mlp_dim=48",
                              "model.attention.implementation=reference"]).model
  with nnx.use_eager_sharding(False):
    return LM(config, vocab_size=VOCAB, rngs=nnx.Rngs(0))


def test_generate_with_an_unbounded_block_memory_equals_the_full_cache(model):
  """Two layers of attention, a batch of two prompts."""
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, VOCAB, 6)) for _ in range(2)]
  policy = BlockMemoryPolicy(sink_tokens=1, window=2, block_size=2, top_k=4, representatives=1)
  full = generate(model, prompts, max_new_tokens=5).tokens
  memory = generate(model, prompts, max_new_tokens=5, cache_policy=policy)
  assert memory.tokens == full
  assert [len(x) for x in full] == [5, 5]
  caches = nnx.eval_shape(lambda m: m.init_cache(2, 11, policy=policy), model)
  assert [type(c) for c in caches] == [BlockMemoryKVCache]  # the pattern's one attention mixer
  assert caches[0].rep_keys.shape[:3] == (2, 2, 4)  # [layers, batch, blocks]: top_k covers all


def test_cache_policy_of_reads_the_decode_config():
  assert cache_policy_of(load_config(None, []).decode) is None
  decode = load_config(None, ["decode.cache_policy=block_memory", "decode.block_memory.window=8",
                              "decode.block_memory.block_size=4",
                              "decode.block_memory.top_k=3"]).decode
  assert cache_policy_of(decode) == BlockMemoryPolicy(sink_tokens=4, window=8, block_size=4,
                                                      top_k=3, representatives=4)
  bad = load_config(None, ["decode.cache_policy=block_memory",
                           "decode.block_memory.window=8"]).decode  # block_size 64 > window
  with pytest.raises(ConfigError, match="decode.block_memory: .*window must be >= block_size"):
    cache_policy_of(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sink_tokens=-1), "sink_tokens must be a non-negative int, got -1"),
    (dict(sink_tokens=True), "sink_tokens must be a non-negative int, got True"),
    (dict(window=0), "window must be a positive int, got 0"),
    (dict(block_size=2.0), "block_size must be a positive int, got 2.0"),
    (dict(top_k=0), "top_k must be a positive int, got 0"),
    (dict(representatives=0), "representatives must be a positive int, got 0"),
    (dict(block_size=8, representatives=9), "representatives must be <= block_size=8, got 9"),
    (dict(window=4, block_size=8), "window must be >= block_size .* got window=4"),
])
def test_bad_policy_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BlockMemoryPolicy(**{**dict(window=16, block_size=8, representatives=2), **kwargs})


def test_bad_uses_are_named(model):
  policy = BlockMemoryPolicy(sink_tokens=1, window=2, block_size=2, top_k=1, representatives=1)
  # Abstract layers (nnx.eval_shape): init_cache never reads the parameters.
  windowed, layer = (nnx.eval_shape(lambda w=w: Attention(D_MODEL, 2, 2, 8, window=w,
                                                          rngs=nnx.Rngs(0))) for w in (4, None))
  with pytest.raises(ValueError, match="policy needs a layer without a window"):
    windowed.init_cache(1, 8, policy=policy)
  with pytest.raises(TypeError, match="policy must be one of BlockMemoryPolicy, .* or None, got "
                                     "dict"):
    layer.init_cache(1, 8, policy={"window": 2})
  with pytest.raises(TypeError, match="cache_policy must be one of BlockMemoryPolicy, .* or None"):
    generate(model, [[1, 2]], max_new_tokens=1, cache_policy="block_memory")
  cache = layer.init_cache(1, 8, policy=policy)
  q = jnp.zeros((1, 4, 2, 8))
  kv = jnp.zeros((1, 4, 2, 8))
  positions, segments = np.arange(4)[None], np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match="mask must be a causal Mask"):
    cache.attend(q, kv, kv, positions, segments, mask=Mask())
  with pytest.raises(ValueError, match=r"k and v must be \[B, t, Hkv, D\] = \(1, 4, 2, 8\) "
                                       r"to match q and the cache, got k \(1, 4, 1, 8\)"):
    cache.attend(q, kv[:, :, :1], kv, positions, segments)
  with pytest.raises(ValueError, match=r"select: q must be \[B, t, Hq, D\] with the cache's "
                                       r"B=1 and D=8, and Hq a multiple of its Hkv=2, got "
                                       r"\(1, 4, 3, 8\)"):
    cache.select(jnp.zeros((1, 4, 3, 8)), positions, segments)
  long_q, long_kv = jnp.zeros((1, 10, 2, 8)), jnp.zeros((1, 10, 2, 8))
  with pytest.raises(ValueError, match="writing 10 tokens after 0 needs 4 stored blocks, the "
                                       "cache holds 3; create it with a larger max_length"):
    cache.attend(long_q, long_kv, long_kv, np.arange(10)[None], np.zeros((1, 10), np.int32))
