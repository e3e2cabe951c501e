"""Property tests: the XLA path and the Pallas kernels (interpreted) equal the float64 reference
over random masks, shapes, positions and segment layouts (forward and lse, float32 tolerance)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsm.kernels.attention import BlockSizes
from tests.kernels.attention.helpers import (Shape, assert_close, draw, mask_strategy,
                                             packed_segments, run)

# A fixed handful of shapes and block sizes, so examples differ in traced values (positions,
# segment ids, inputs) and in the mask, not in what has to be compiled for every shape.
SHAPES = [Shape(b=2, tq=19, tk=19, hq=2, hkv=1, d=8, dv=8),
          Shape(b=1, tq=11, tk=26, hq=4, hkv=2, d=8, dv=4)]
BLOCKS = BlockSizes(q=8, kv=8)


@st.composite
def token_layouts(draw_, shape: Shape):
  """(q_positions, kv_positions, q_segment_ids, kv_segment_ids) for one shape."""
  rng = np.random.default_rng(draw_(st.integers(0, 2**32 - 1)))
  b, tq, tk = shape.b, shape.tq, shape.tk
  positions = draw_(st.sampled_from(["default", "offset", "restart", "shuffled"]))
  segments = draw_(st.sampled_from(["none", "packed", "random"]))
  q_seg = kv_seg = restarting = None
  if segments == "packed" and tq == tk:
    q_seg, restarting = packed_segments(rng, b, tq, max_docs=3)
    kv_seg = q_seg
  elif segments != "none":
    q_seg = rng.integers(0, 3, (b, tq)).astype(np.int32)
    kv_seg = rng.integers(0, 3, (b, tk)).astype(np.int32)
  q_pos = kv_pos = None
  if positions == "offset":  # queries at the end of the keys, as in chunked prefill
    q_pos, kv_pos = np.arange(tk - tq, tk), np.arange(tk)
  elif positions == "restart" and restarting is not None:  # every document from position 0
    q_pos = kv_pos = restarting
  elif positions == "shuffled":
    q_pos = np.stack([rng.permutation(tq) for _ in range(b)]) + int(rng.integers(-2, 8))
    kv_pos = np.stack([rng.permutation(tk) for _ in range(b)])
  return q_pos, kv_pos, q_seg, kv_seg


@st.composite
def cases(draw_):
  shape = draw_(st.sampled_from(SHAPES))
  return (shape, draw_(mask_strategy(max_layout_blocks=5)), draw_(token_layouts(shape)),
          draw_(st.booleans()), draw_(st.integers(0, 2**32 - 1)))


def _assert_case_matches_reference(implementation, case):
  shape, mask, (q_pos, kv_pos, q_seg, kv_seg), with_sinks, seed = case
  if mask.layout is not None and q_pos is None and kv_pos is None:
    bq, bk = mask.layout_block
    if mask.layout.shape[0] * bq < shape.tq or mask.layout.shape[1] * bk < shape.tk:
      kv_pos = np.arange(shape.tk)  # positions outside a short layout are simply masked
  inputs = draw(seed, shape, sinks=with_sinks)
  kwargs = dict(mask=mask, block_sizes=BLOCKS, q_positions=q_pos, kv_positions=kv_pos,
                q_segment_ids=q_seg, kv_segment_ids=kv_seg, grads=False)
  traced_positions = q_pos is not None or kv_pos is not None
  if implementation != "xla" and mask.layout is not None and traced_positions:
    with pytest.raises(ValueError, match="mask.layout needs positions known at trace time"):
      run(implementation, jnp.float32, inputs, **kwargs)
    return
  got = run(implementation, jnp.float32, inputs, **kwargs)
  want = run("reference", jnp.float64, inputs, **kwargs)
  assert_close(got[0], want[0], jnp.float32, "out")
  assert_close(got[1], want[1], jnp.float32, "lse")


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_xla_matches_reference(case):
  _assert_case_matches_reference("xla", case)


# Interpreted kernels compile slowly: fewer examples, each still a fresh mask and layout.
@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_kernels_match_reference(implementation, case):
  _assert_case_matches_reference(implementation, case)
