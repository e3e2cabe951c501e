"""Landmark attention's Pallas kernels, interpreted on CPU: forward against the float64
definition, gradients against the float64 reference, retrieval, block sizes, the TPU interpreter,
dispatch to the XLA path on other layouts, and lowering for TPU (Mosaic) and GPU (Triton).

In interpret mode Pallas fills outputs with NaN before a kernel runs (test_pallas.py checks it),
so a row a kernel forgets to write fails `assert_close`, which requires finite values.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import lsm.log
from lsm.kernels.attention import landmark, landmark_attention, pallas_common
from lsm.kernels.attention.landmark import is_block_aligned
from lsm.kernels.attention.landmark_pallas import landmark_pallas, tiles_in_order
from tests.kernels.attention.helpers import assert_close, seed_of
from tests.kernels.attention.test_landmark import (ALIGNED, B, BLOCK, D, HQ, LAYOUT, T, definition,
                                                   draw, normalised_gap, packed)

SCALE = D ** -0.5
# Aligned layouts for spans that are not a power of two (6) and that fill a tile exactly (8).
ALIGNED_FOR = {BLOCK: ALIGNED, 5: [[12, 6, 19], [37]], 7: [[16, 8, 13], [37]]}


@functools.partial(jax.jit, static_argnames=("block_size",))
def forward(q, k, v, positions, segment_ids, retrieved=None, *, block_size=BLOCK):
  """Positions are traced here: the layout is checked on device (`lax.cond`)."""
  return landmark_attention(q, k, v, block_size=block_size, positions=positions,
                            segment_ids=segment_ids, retrieved=retrieved,
                            implementation="pallas", query_chunk=8)


@functools.partial(jax.jit, static_argnames=("implementation", "block_size"))
def grads(q, k, v, w, positions, segment_ids, retrieved=None, *, implementation,
          block_size=BLOCK):
  def loss(q, k, v):
    out = landmark_attention(q, k, v, block_size=block_size, positions=positions,
                             segment_ids=segment_ids, retrieved=retrieved,
                             implementation=implementation, query_chunk=8)
    return jnp.sum(out.astype(w.dtype) * w)

  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def as_float32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def assert_grads_match_reference(q, k, v, w, positions, segments, retrieved=None,
                                 block_size=BLOCK):
  got = grads(*as_float32(q, k, v, w), positions, segments, retrieved,
              implementation="pallas", block_size=block_size)
  want = grads(*(jnp.asarray(x) for x in (q, k, v, w)), positions, segments, retrieved,
               implementation="reference", block_size=block_size)
  for name, g, ref in zip("qkv", got, want):
    assert g.dtype == jnp.float32
    assert_close(g, ref, jnp.float32, f"d{name}")


@pytest.mark.parametrize("layout, dtype", [("aligned", jnp.float32), ("aligned", jnp.bfloat16),
                                           ("packed", jnp.float32)])
def test_matches_the_float64_definition(layout, dtype):
  """Aligned layouts run the kernels; the packed one (not aligned) the XLA path."""
  q, k, v, _ = draw(seed_of("pallas definition", layout, jnp.dtype(dtype).name))
  positions, segments = packed(ALIGNED if layout == "aligned" else LAYOUT)
  got = forward(*(jnp.asarray(x, dtype) for x in (q, k, v)), positions, segments)
  assert got.dtype == jnp.dtype(dtype)
  assert_close(got, definition(q, k, v, positions, segments, BLOCK, SCALE), dtype, "out")


@pytest.mark.parametrize("with_retrieval", [False, True], ids=["every_block", "retrieved"])
def test_gradients_match_the_float64_reference(with_retrieval):
  """GQA 2:1, T = 37 (a partial last tile), packed documents; with retrieval the dk/dv kernel
  reads the flags transposed, so it is checked separately."""
  q, k, v, w = draw(seed_of("pallas grads", with_retrieval))
  positions, segments = packed(ALIGNED)
  retrieved = None
  if with_retrieval:
    rng = np.random.default_rng(seed_of("pallas grads mask"))
    retrieved = jnp.asarray(rng.random((B, HQ, T, 6)) < 0.5)
  assert_grads_match_reference(q, k, v, w, positions, segments, retrieved)


def test_retrieval_keeps_only_the_retrieved_blocks():
  """A random subset per query and head; NB' = 6 is below the highest block (9), so later blocks
  count as not retrieved. Every block retrieved equals no mask."""
  q, k, v, _ = draw(seed_of("pallas retrieval"))
  positions, segments = packed(ALIGNED)
  rng = np.random.default_rng(seed_of("pallas retrieval mask"))
  retrieved = rng.random((B, HQ, T, 6)) < 0.5
  args = as_float32(q, k, v) + [positions, segments]
  want = definition(q, k, v, positions, segments, BLOCK, SCALE, retrieved)
  assert_close(forward(*args, jnp.asarray(retrieved)), want, jnp.float32, "out with retrieval")
  assert normalised_gap(want, definition(q, k, v, positions, segments, BLOCK, SCALE)) > 1e-2
  every = forward(*args, jnp.ones((B, HQ, T, 10), bool))
  np.testing.assert_allclose(every, forward(*args), rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_size", [5, 7], ids=["span6_padded_tiles", "span8_full_tiles"])
def test_block_sizes(block_size):
  q, k, v, w = draw(seed_of("pallas block size", block_size))
  positions, segments = packed(ALIGNED_FOR[block_size])
  assert bool(is_block_aligned(jnp.asarray(positions), jnp.asarray(segments), block_size))
  got = forward(*as_float32(q, k, v), positions, segments, block_size=block_size)
  want = definition(q, k, v, positions, segments, block_size, SCALE)
  assert_close(got, want, jnp.float32, "out")
  assert_grads_match_reference(q, k, v, w, positions, segments, block_size=block_size)


def test_tpu_interpreter_runs_the_scalar_prefetch_call():
  """The TPU variant of the calls (loop bounds by scalar prefetch) under the TPU interpreter,
  which fills uninitialised memory with NaN, forward and gradients."""
  params = pltpu.InterpretParams(uninitialized_memory="nan")
  q, k, v, w = (x[:1, :20, :2] if x.shape[2] == HQ else x[:1, :20, :1]
                for x in draw(seed_of("pallas tpu interpreter")))
  positions, segments = packed([[8, 12]])

  def loss(q, k, v):
    out = landmark_pallas(q, k, v, jnp.asarray(positions), jnp.asarray(segments), None, BLOCK,
                          SCALE, interpret=params)
    return jnp.sum(out * jnp.asarray(w, out.dtype)), out

  (_, out), got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      *as_float32(q, k, v))
  assert_close(out, definition(q, k, v, positions, segments, BLOCK, SCALE), jnp.float32, "out")
  want = grads(*(jnp.asarray(x) for x in (q, k, v, w)), positions, segments,
               implementation="reference")
  for name, g, ref in zip("qkv", got, want):
    assert_close(g, ref, jnp.float32, f"d{name}")


def out_of_order():
  """ALIGNED with the second row's tile 0 (block 0) moved behind tile 8: still block-aligned."""
  positions, segments = packed(ALIGNED)
  positions[1] = np.concatenate([np.arange(4, 36), np.arange(4), [36]])
  return positions, segments


def test_layout_check_and_fallback(monkeypatch, caplog):
  """With concrete positions the kernels run only on aligned layouts whose tiles are in block
  order, and the fallback is logged; traced, the out-of-order layout still gets the right answer
  (the kernels would take its tile 8, block 0, for a later block)."""
  calls = []
  monkeypatch.setattr(landmark, "landmark_pallas",
                      lambda *a, **kw: calls.append(1) or landmark_pallas(*a, **kw))
  monkeypatch.setattr(lsm.log, "_said", set())
  q, k, v = as_float32(*draw(seed_of("pallas dispatch"))[:3])
  cases = {"aligned": (packed(ALIGNED), True, True), "packed": (packed(LAYOUT), False, True),
           "out_of_order": (out_of_order(), True, False)}
  with caplog.at_level(logging.INFO, logger="lsm"):
    for name, (tokens, aligned, in_order) in cases.items():
      positions, segments = map(jnp.asarray, tokens)
      assert bool(is_block_aligned(positions, segments, BLOCK)) == aligned, name
      assert bool(tiles_in_order(positions, segments, BLOCK)) == in_order, name
      del calls[:]
      landmark_attention(q, k, v, block_size=BLOCK, positions=positions, segment_ids=segments,
                         implementation="pallas")
      assert bool(calls) == (aligned and in_order), name
  said = [r.getMessage() for r in caplog.records if "XLA path runs it" in r.getMessage()]
  assert len(said) == 1, said
  positions, segments = out_of_order()
  want = definition(*draw(seed_of("pallas dispatch"))[:3], positions, segments, BLOCK, SCALE)
  assert_close(forward(q, k, v, positions, segments), want, jnp.float32, "out of order")


def test_float64_is_refused():
  x = jnp.zeros((1, 8, 2, 8), jnp.float64)
  with pytest.raises(TypeError, match="implementation='pallas' takes q, k, v in float32"):
    landmark_attention(x, x, x, block_size=BLOCK, implementation="pallas")


@pytest.mark.parametrize("with_retrieval", [False, True], ids=["every_block", "retrieved"])
@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"),
                                           ("cuda", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_real_hardware(monkeypatch, platform, call, with_retrieval):
  """Forward and backward lower through Mosaic (TPU) and Triton (GPU) from this CPU machine at
  a realistic size (blocks of 63 tokens + landmark, D = 128, GQA 4:1, bfloat16)."""
  monkeypatch.setattr(pallas_common, "platform", lambda: "tpu" if platform == "tpu" else "gpu")
  b, t, hq, hkv, d = 1, 1024, 8, 2, 128

  def loss(q, k, v, positions, segments, retrieved):
    out = landmark_attention(q, k, v, block_size=63, positions=positions, segment_ids=segments,
                             retrieved=retrieved, implementation="pallas")
    return jnp.sum(out.astype(jnp.float32))

  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  args = (jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16), tokens, tokens,
          jax.ShapeDtypeStruct((b, hq, t, 16), bool) if with_retrieval else None)
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)])(*args)
  assert exported.mlir_module().count(call) >= 3  # forward, dq, dk/dv


def _assert_compiled_matches_reference():
  q, k, v, w = draw(seed_of("pallas compiled"))
  positions, segments = packed(ALIGNED)
  for dtype in (jnp.float32, jnp.bfloat16):
    got = forward(*(jnp.asarray(x, dtype) for x in (q, k, v)), positions, segments)
    assert_close(got, definition(q, k, v, positions, segments, BLOCK, SCALE), dtype, "out")
  assert_grads_match_reference(q, k, v, w, positions, segments)


@pytest.mark.gpu
def test_compiled_gpu_kernels_match_reference():
  _assert_compiled_matches_reference()


@pytest.mark.tpu
def test_compiled_tpu_kernels_match_reference():
  _assert_compiled_matches_reference()
