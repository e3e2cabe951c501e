"""Landmark attention: both implementations against the grouped softmax written out in float64
loops (p(landmark) x softmax inside its block), gradients, packing, retrieval, memory, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import landmark_attention
from tests.kernels.attention.helpers import assert_close, seed_of

BLOCK = 3  # regular tokens per block: blocks span 4 positions
# Odd length, GQA 2:1, packed documents of lengths that are not multiples of the block span.
B, T, HQ, HKV, D = 2, 37, 4, 2, 8
LAYOUT = [[13, 5, 19], [22, 15]]
# Block-aligned: documents start on multiples of the span (the XLA path's tile formulation).
ALIGNED = [[12, 8, 17], [37]]
LAYOUTS = {"packed": LAYOUT, "aligned": ALIGNED}


def definition(q, k, v, positions, segment_ids, block_size, scale, retrieved=None):
  """Per query and head: a softmax over the own block's visible logits and the landmark logits
  of the (retrieved) earlier blocks; a block's probability goes to its regular tokens by their
  softmax inside the block."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  span = block_size + 1
  group = q.shape[2] // k.shape[2]
  out = np.zeros(q.shape[:3] + v.shape[-1:])

  def softmax(logits):
    e = np.exp(np.asarray(logits) - np.max(logits))
    return e / e.sum()

  for b in range(q.shape[0]):
    pos, seg = positions[b], segment_ids[b]
    for h in range(q.shape[2]):
      keys, values = k[b, :, h // group], v[b, :, h // group]
      for i in range(q.shape[1]):
        s = scale * keys @ q[b, i, h]
        own_block = pos[i] // span
        same = [j for j in range(q.shape[1]) if seg[j] == seg[i]]
        logits = [s[j] for j in same if pos[j] // span == own_block and pos[j] <= pos[i]]
        carried = [values[j] for j in same if pos[j] // span == own_block and pos[j] <= pos[i]]
        for n in sorted({pos[j] // span for j in same if pos[j] // span < own_block}):
          if retrieved is not None and (n >= retrieved.shape[-1] or not retrieved[b, h, i, n]):
            continue
          members = [j for j in same if pos[j] // span == n]
          mark = [j for j in members if pos[j] % span == block_size]
          regular = [j for j in members if pos[j] % span != block_size]
          logits.append(s[mark[0]])
          carried.append(softmax([s[j] for j in regular]) @ values[regular])
        out[b, i, h] = softmax(logits) @ np.array(carried)
  return out


def packed(layout):
  """Segment ids 1, 2, ... and positions restarting at 0 per document, one row per list."""
  positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in layout])
  segments = np.stack([np.repeat(np.arange(1, len(row) + 1), row) for row in layout])
  return positions.astype(np.int32), segments.astype(np.int32)


def draw(seed, b=B, t=T):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, HQ, D)), rng.standard_normal((b, t, HKV, D)),
          rng.standard_normal((b, t, HKV, D)), rng.standard_normal((b, t, HQ, D)))


@functools.partial(jax.jit, static_argnames=("implementation", "query_chunk"))
def forward(q, k, v, positions, segment_ids, retrieved=None, *, implementation, query_chunk=8):
  return landmark_attention(q, k, v, block_size=BLOCK, positions=positions,
                            segment_ids=segment_ids, retrieved=retrieved,
                            implementation=implementation, query_chunk=query_chunk)


@functools.partial(jax.jit, static_argnames=("implementation",))
def grads(q, k, v, w, positions, segment_ids, *, implementation):
  def loss(q, k, v):
    out = landmark_attention(q, k, v, block_size=BLOCK, positions=positions,
                             segment_ids=segment_ids, implementation=implementation,
                             query_chunk=8)
    return jnp.sum(out.astype(w.dtype) * w)

  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


CASES = [("xla", jnp.float32), ("xla", jnp.bfloat16)]


def test_block_alignment_is_detected():
  from lsm.kernels.attention.landmark import is_block_aligned
  assert bool(is_block_aligned(*map(jnp.asarray, packed(ALIGNED)), BLOCK))
  assert not bool(is_block_aligned(*map(jnp.asarray, packed(LAYOUT)), BLOCK))
  positions, segments = packed(ALIGNED)
  positions[1, 9] += 1  # a gap inside a tile
  assert not bool(is_block_aligned(jnp.asarray(positions), jnp.asarray(segments), BLOCK))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("implementation, dtype", CASES, ids=[f"{i}-{jnp.dtype(d).name}"
                                                              for i, d in CASES])
def test_matches_the_float64_definition(implementation, dtype, layout):
  q, k, v, _ = draw(seed_of("definition", implementation, jnp.dtype(dtype).name, layout))
  positions, segments = packed(LAYOUTS[layout])
  want = definition(q, k, v, positions, segments, BLOCK, D ** -0.5)
  got = forward(*(jnp.asarray(x, dtype) for x in (q, k, v)), positions, segments,
                implementation=implementation)
  assert got.dtype == jnp.dtype(dtype)
  assert_close(got, want, dtype, "out")


def test_reference_in_float64_is_the_definition():
  """The reference is exact: float64 agrees to rounding."""
  q, k, v, _ = draw(seed_of("float64"))
  positions, segments = packed(LAYOUT)
  got = forward(*(jnp.asarray(x) for x in (q, k, v)), positions, segments,
                implementation="reference")
  np.testing.assert_allclose(got, definition(q, k, v, positions, segments, BLOCK, D ** -0.5),
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_xla_gradients_match_the_float64_reference(layout):
  q, k, v, w = draw(seed_of("grads", layout))
  positions, segments = packed(LAYOUTS[layout])
  got = grads(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, w)), positions, segments,
              implementation="xla")
  want = grads(*(jnp.asarray(x) for x in (q, k, v, w)), positions, segments,
               implementation="reference")
  for name, g, ref in zip("qkv", got, want):
    assert g.dtype == jnp.float32
    assert_close(g, ref, jnp.float32, f"d{name}")


def test_packed_documents_equal_separate_documents():
  q, k, v, _ = draw(seed_of("packing"))
  positions, segments = packed(LAYOUT)
  together = forward(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), positions, segments,
                     implementation="xla")
  first, second = LAYOUT[1]
  for part in (slice(0, first), slice(first, first + second)):
    # Each document alone, by the float64 reference (compiles in a fraction of the time).
    alone = forward(*(jnp.asarray(x[1:, part]) for x in (q, k, v)),
                    np.arange(part.stop - part.start, dtype=np.int32), None,
                    implementation="reference")
    assert_close(together[1:, part], alone, jnp.float32, f"document at {part.start}")


@pytest.mark.parametrize("implementation, num_blocks, layout",
                         [("xla", 6, "packed"), ("xla", 10, "aligned"), ("reference", 4, "packed")])
def test_retrieval_keeps_only_the_retrieved_blocks(implementation, num_blocks, layout):
  """A random subset of blocks per query and head (with NB = 4, below the highest block 5,
  blocks past NB count as not retrieved); every block retrieved is the training mode."""
  q, k, v, _ = draw(seed_of("retrieval", implementation, layout))
  positions, segments = packed(LAYOUTS[layout])
  rng = np.random.default_rng(seed_of("mask", implementation))
  retrieved = rng.random((B, HQ, T, num_blocks)) < 0.5
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [positions, segments]
  got = forward(*args, jnp.asarray(retrieved), implementation=implementation)
  want = definition(q, k, v, positions, segments, BLOCK, D ** -0.5, retrieved)
  assert_close(got, want, jnp.float32, "out with retrieval")
  # The mask matters.
  assert normalised_gap(want, definition(q, k, v, positions, segments, BLOCK, D ** -0.5)) > 1e-2
  if implementation == "xla":
    every = forward(*args, jnp.ones((B, HQ, T, num_blocks), bool), implementation=implementation)
    assert_close(every, forward(*args, implementation=implementation), jnp.float32,
                 "all blocks retrieved")


def normalised_gap(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _largest_intermediate(jaxpr) -> int:
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
        if hasattr(inner, "eqns"):
          largest = max(largest, _largest_intermediate(inner))
  return largest


def test_xla_memory_is_linear_in_length():
  """No intermediate of the forward and backward holds T x T scores per head; the reference
  (which does) trips the same measure."""
  t = 96
  q, k, v, w = (jnp.zeros(x.shape, jnp.float32) for x in draw(0, b=1, t=t))
  positions = np.arange(t, dtype=np.int32)[None]

  def largest(implementation):
    fn = functools.partial(grads.__wrapped__, implementation=implementation)
    return _largest_intermediate(jax.make_jaxpr(fn)(q, k, v, w, positions, positions * 0).jaxpr)

  assert largest("xla") <= HQ * t * t // 8
  assert largest("reference") >= HQ * t * t


BAD_CALLS = [
    (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (dict(implementation="pallas_tpu"), ValueError, "implementation must be one of"),
    (dict(query_chunk=-1), ValueError, "query_chunk must be a positive int, got -1"),
    (dict(scale=0.0), ValueError, "scale must be a positive finite number"),
    (dict(positions=np.zeros((B, T + 1), np.int32)), ValueError, "positions must have shape"),
    (dict(segment_ids=np.zeros((B, T), np.float32)), TypeError, "segment_ids must have an "
                                                                "integer dtype"),
    (dict(retrieved=np.zeros((B, HQ, T, 2), np.int32)), TypeError, "retrieved must have dtype "
                                                                   "bool"),
    (dict(retrieved=np.zeros((B, HKV, T, 2), bool)), ValueError, "retrieved must have shape"),
    (dict(retrieved=[[True]]), TypeError, "retrieved must be a bool array"),
    (dict(k=np.zeros((B, T, 3, D), np.float32), v=np.zeros((B, T, 3, D), np.float32)),
     ValueError, "multiple of the key/value heads Hkv=3"),
    (dict(k=np.zeros((B, T - 1, HKV, D), np.float32)), ValueError, "must match q"),
    (dict(v=np.zeros((B, T, HKV, D), np.float16)), TypeError, "must share one dtype"),
    (dict(q=np.zeros((B, T, HQ), np.float32)), ValueError, "q must have rank 4"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_CALLS,
                         ids=[next(iter(c[0])) + f"-{n}" for n, c in enumerate(BAD_CALLS)])
def test_argument_errors_name_the_argument(overrides, error, message):
  arrays = dict(q=np.zeros((B, T, HQ, D), np.float32), k=np.zeros((B, T, HKV, D), np.float32),
                v=np.zeros((B, T, HKV, D), np.float32))
  kwargs = dict(block_size=BLOCK)
  for name, value in overrides.items():
    (arrays if name in arrays else kwargs)[name] = value
  with pytest.raises(error, match=message):
    landmark_attention(arrays["q"], arrays["k"], arrays["v"], **kwargs)
