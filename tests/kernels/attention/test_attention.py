"""Every fast path (xla, pallas_tpu, pallas_gpu; the kernels interpreted on CPU) against the
float64 reference: forward, lse and gradients."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lsm.log
from lsm.kernels.attention import BlockSizes, Mask, attention, default_implementation
from tests.kernels.attention.helpers import (BLOCKS, FAST, Shape, assert_close,
                                               assert_matches_reference, draw, packed_segments, run,
                                               seed_of)

_LAYOUTS = np.random.default_rng(1234)
# Every mask kind on a 37-token sequence, cut into 5 query blocks of 8 and 3 key blocks of 16.
MASKS = {
    "none": Mask(),
    "causal": Mask(causal=True),
    "window": Mask(window=(5, 3)),
    "causal_window": Mask(causal=True, window=(9, 0)),
    "chunk": Mask(chunk=10),
    "prefix": Mask(prefix=12),
    "sink_tokens": Mask(chunk=9, sink_tokens=3),
    "layout": Mask(layout=_LAYOUTS.random((5, 3)) < 0.5, layout_block=(8, 16)),
    "layout_unaligned": Mask(layout=_LAYOUTS.random((10, 8)) < 0.4, layout_block=(4, 5)),
    "causal_window_sink_tokens": Mask(causal=True, window=(6, 0), sink_tokens=3),
    "causal_chunk": Mask(causal=True, chunk=8),
    "causal_prefix": Mask(causal=True, prefix=12),
    "window_chunk": Mask(window=(4, 4), chunk=13),
    "layout_causal": Mask(causal=True, layout=_LAYOUTS.random((5, 5)) < 0.6, layout_block=(8, 8)),
    "everything": Mask(causal=True, window=(20, 1), chunk=16, prefix=5, sink_tokens=2,
                       layout=_LAYOUTS.random((10, 8)) < 0.7, layout_block=(4, 5)),
}


@pytest.fixture(params=FAST)
def implementation(request):
  return request.param


@pytest.mark.parametrize("name", MASKS)
def test_every_mask(implementation, name):
  inputs = draw(seed_of("mask", name, str(jnp.float32)), Shape())
  assert_matches_reference(implementation, inputs, jnp.float32, mask=MASKS[name])


# bf16 changes the arithmetic, not which keys a mask keeps: the XLA path runs every mask in bf16,
# the (interpreted, slow) kernels the masks that exercise each of their code paths — no mask, a
# causal diagonal, partial layout blocks and everything at once.
BF16_KERNEL_MASKS = ("none", "causal", "layout_unaligned", "everything")


@pytest.mark.parametrize("implementation, name", [
    (impl, name) for impl in FAST for name in MASKS
    if impl == "xla" or name in BF16_KERNEL_MASKS])
def test_every_mask_bf16(implementation, name):
  inputs = draw(seed_of("mask", name, str(jnp.bfloat16)), Shape())
  assert_matches_reference(implementation, inputs, jnp.bfloat16, mask=MASKS[name])


@pytest.mark.parametrize("name", MASKS)
def test_every_mask_packed_with_sinks(implementation, name):
  """Packed documents (positions restart per document) with sinks on top of every mask."""
  seed = seed_of("packed", name)
  shape = Shape()
  seg, pos = packed_segments(np.random.default_rng(seed), shape.b, shape.tq, max_docs=4)
  inputs = draw(seed, shape, sinks=True)
  tokens = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  if implementation.startswith("pallas") and MASKS[name].layout is not None:
    # The kernels apply a layout per block, which needs positions known at trace time.
    with pytest.raises(ValueError, match="mask.layout needs positions known at trace time"):
      run(implementation, jnp.float32, inputs, mask=MASKS[name], **tokens)
    return
  assert_matches_reference(implementation, inputs, jnp.float32, mask=MASKS[name], **tokens)


@pytest.mark.parametrize("hkv", [8, 4, 2, 1])
def test_gqa_ratios(implementation, hkv):
  shape = Shape(hq=8, hkv=hkv, tq=29, tk=29)
  assert_matches_reference(implementation, draw(seed_of("gqa", hkv), shape, sinks=True),
                            jnp.float32, mask=MASKS["causal_window"])


@pytest.mark.parametrize("dv", [3, 16])
def test_value_dim_differs_from_key_dim(implementation, dv):
  got, _ = assert_matches_reference(implementation, draw(seed_of("dv", dv), Shape(dv=dv)),
                                      jnp.float32, mask=Mask(causal=True))
  assert got[0].shape == (2, 37, 4, dv)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cross_lengths_with_offset(implementation, dtype):
  """Chunked prefill: 21 queries at positions 24..44 over 45 keys, causal."""
  shape = Shape(tq=21, tk=45)
  assert_matches_reference(implementation, draw(seed_of("offset", str(dtype)), shape), dtype,
                           mask=Mask(causal=True), q_positions=np.arange(24, 45),
                           kv_positions=np.arange(45))


def test_more_queries_than_keys(implementation):
  assert_matches_reference(implementation, draw(seed_of("tq>tk"), Shape(tq=45, tk=13)),
                            jnp.float32, mask=Mask(window=(6, 6)))


@pytest.mark.parametrize("name", ["causal", "causal_window_sink_tokens"])
def test_decode_one_query(implementation, name):
  """Tq = 1 at the last position, and a [B, 1] variant where every row has its own offset."""
  tk = 41
  shape = Shape(tq=1, tk=tk)
  inputs = draw(seed_of("decode", name), shape, sinks=True)
  got, _ = assert_matches_reference(implementation, inputs, jnp.float32, mask=MASKS[name],
                                     q_positions=np.array([tk - 1]), kv_positions=np.arange(tk))
  assert got[0].shape == (2, 1, 4, 8)
  assert_matches_reference(implementation, inputs, jnp.float32, mask=MASKS[name],
                           q_positions=np.array([[tk - 1], [tk - 9]]), kv_positions=np.arange(tk))


@pytest.mark.parametrize("t", [1, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("blocks", [(8, 16), (16, 8)], ids=["bq8_bk16", "bq16_bk8"])
def test_every_row_written_for_odd_lengths(implementation, t, blocks):
  """Lengths below, at and past block multiples: an unwritten or double-counted block shows
  up as a wrong (or non-finite) row."""
  inputs = draw(seed_of("odd", t, blocks), Shape(tq=t, tk=t))
  got, _ = assert_matches_reference(implementation, inputs, jnp.float32,
                                      mask=Mask(causal=True, window=(6, 2)),
                                      block_sizes=BlockSizes(*blocks))
  assert np.all(np.isfinite(np.asarray(got[0])))
  assert np.all(np.isfinite(np.asarray(got[1])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_soft_cap_scale_and_sinks(implementation, dtype):
  inputs = draw(seed_of("cap", str(dtype)), Shape(), sinks=True)
  inputs.q *= 3.0  # large scores, so the cap really bends them
  assert_matches_reference(implementation, inputs, dtype, mask=Mask(causal=True, window=(12, 0)),
                           logits_soft_cap=2.5, scale=0.7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_packed_segments_and_sinks(implementation, dtype):
  seed = seed_of("segments", str(dtype))
  shape = Shape()
  seg, pos = packed_segments(np.random.default_rng(seed), shape.b, shape.tq, max_docs=5)
  assert_matches_reference(implementation, draw(seed, shape, sinks=True), dtype,
                            mask=Mask(causal=True), q_positions=pos, kv_positions=pos,
                            q_segment_ids=seg, kv_segment_ids=seg)


def test_segments_without_positions(implementation):
  """Segment ids with default (global) positions; segment ids need not be sorted."""
  rng = np.random.default_rng(seed_of("unsorted segments"))
  seg = rng.integers(0, 3, size=(2, 37)).astype(np.int32)
  assert_matches_reference(implementation, draw(seed_of("seg only"), Shape()), jnp.float32,
                           mask=Mask(causal=True), q_segment_ids=seg, kv_segment_ids=seg)


def test_permuted_positions(implementation):
  """Tokens in a shuffled order with their positions (zigzag / striped layouts are such
  permutations): block ranges then span many positions, and the result still matches."""
  rng = np.random.default_rng(seed_of("permuted"))
  q_pos = np.stack([rng.permutation(37) for _ in range(2)])
  kv_pos = np.stack([rng.permutation(37) for _ in range(2)])
  assert_matches_reference(implementation, draw(seed_of("permuted"), Shape()), jnp.float32,
                           mask=Mask(causal=True, window=(7, 0)), q_positions=q_pos,
                           kv_positions=kv_pos)


def test_positions_as_t_or_bt():
  """[T] positions broadcast over the batch exactly like the equivalent [B, T]."""
  inputs = draw(seed_of("position shapes"), Shape(tq=21, tk=45))
  mask = Mask(causal=True, window=(10, 0))
  q_pos = np.arange(24, 45)
  flat = run("xla", jnp.float32, inputs, mask=mask, q_positions=q_pos,
             kv_positions=np.arange(45))
  batched = run("xla", jnp.float32, inputs, mask=mask, q_positions=np.stack([q_pos, q_pos]),
                kv_positions=np.stack([np.arange(45)] * 2))
  for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(batched)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_traced_positions_reuse_one_compile():
  """Positions and segment ids are traced: new values reuse the compiled function and still
  give the right answer."""
  traces = []

  @jax.jit
  def f(q, k, v, q_pos, kv_pos):
    traces.append(None)
    return attention(q, k, v, mask=Mask(causal=True, window=(8, 0)), q_positions=q_pos,
                     kv_positions=kv_pos, implementation="xla", block_sizes=BLOCKS)

  shape = Shape(tq=13, tk=40)
  inputs = draw(seed_of("traced"), shape)
  q, k, v, *_ = inputs.arrays(jnp.float32)
  for offset in (0, 11, 27):
    q_pos = jnp.arange(offset, offset + 13)
    want = run("reference", jnp.float64, inputs, grads=False,
               mask=Mask(causal=True, window=(8, 0)), q_positions=q_pos,
               kv_positions=np.arange(40))[0]
    assert_close(f(q, k, v, q_pos, jnp.arange(40)), want, jnp.float32, f"offset {offset}")
  assert len(traces) == 1


def test_default_implementation_is_xla_on_cpu(monkeypatch, caplog):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice")
  assert default_implementation()[0] == "xla"
  monkeypatch.setattr(lsm.log, "_said", set())  # forget earlier tests' messages
  inputs = draw(seed_of("default"), Shape())
  q, k, v, *_ = inputs.arrays(jnp.float32)
  mask = Mask(causal=True)
  with caplog.at_level(logging.INFO, logger="lsm"):
    chosen = attention(q, k, v, mask=mask, block_sizes=BLOCKS, return_lse=True)
    attention(q, k, v, mask=mask, block_sizes=BLOCKS)
  choices = [r.getMessage() for r in caplog.records if "implementation=None" in r.getMessage()]
  assert len(choices) == 1 and "'xla'" in choices[0], choices  # the choice is logged once
  xla = attention(q, k, v, mask=mask, block_sizes=BLOCKS, implementation="xla", return_lse=True)
  for a, b in zip(chosen, xla):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_vmap_over_batch(segments):
  """vmap of attention on [1, ...] slices equals the batched call (segment ids, when given, are
  batched too, so the block tables become per-example)."""
  shape = Shape(b=3)
  seed = seed_of("vmap", segments)
  q, k, v, sinks, *_ = draw(seed, shape, sinks=True).arrays(jnp.float32)
  seg = pos = None
  if segments:
    seg, pos = (jnp.asarray(x) for x in packed_segments(np.random.default_rng(seed), 3, 37, 4))
  mask = Mask(causal=True, window=(9, 0))

  def one(q, k, v, seg, pos):
    return attention(q, k, v, mask=mask, sinks=sinks, q_positions=pos, kv_positions=pos,
                     q_segment_ids=seg, kv_segment_ids=seg, implementation="xla",
                     block_sizes=BLOCKS, return_lse=True)

  expand = lambda x: None if x is None else x[:, None]
  mapped_out, mapped_lse = jax.jit(jax.vmap(one))(*(expand(x) for x in (q, k, v, seg, pos)))
  out, lse = jax.jit(one)(q, k, v, seg, pos)
  assert_close(mapped_out[:, 0], out, jnp.float32, "out")
  assert_close(mapped_lse[:, 0], lse, jnp.float32, "lse")
