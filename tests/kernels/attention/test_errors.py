"""Every bad argument raises a ValueError/TypeError naming the argument, before anything is
traced (the implementations are replaced by tripwires to prove it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import BlockSizes, Mask, attention, merge, visited_blocks
from lsm.kernels.attention import api

B, TQ, TK, HQ, HKV, D, DV = 2, 5, 7, 4, 2, 8, 6


def _f(*shape):
  return jnp.zeros(shape, jnp.float32)


def _valid():
  return dict(q=_f(B, TQ, HQ, D), k=_f(B, TK, HKV, D), v=_f(B, TK, HKV, DV))


@pytest.fixture
def tripwire(monkeypatch):
  """Fails the test if an implementation is reached."""

  def reached(*args, **kwargs):
    raise AssertionError("an implementation was reached before the argument check")

  monkeypatch.setattr(api, "attention_xla", reached)
  monkeypatch.setattr(api, "attention_reference", reached)


_i32 = lambda *shape: jnp.zeros(shape, jnp.int32)
_LAYOUT = np.ones((1, 1), bool)

# (id, overrides of the valid call, error type, pattern that names the argument)
CASES = [
    ("q_not_array", dict(q=np.zeros((B, TQ, HQ, D)).tolist()), TypeError, r"\bq must be an array"),
    ("q_rank", dict(q=_f(TQ, HQ, D)), ValueError, r"\bq must have rank 4"),
    ("k_rank", dict(k=_f(B, TK, HKV, D, 1)), ValueError, r"\bk must have rank 4"),
    ("v_rank", dict(v=_f(B, TK, DV)), ValueError, r"\bv must have rank 4"),
    ("q_int", dict(q=jnp.zeros((B, TQ, HQ, D), jnp.int32)), TypeError,
     r"\bq must have a floating dtype"),
    ("k_int", dict(k=jnp.zeros((B, TK, HKV, D), jnp.int32)), TypeError,
     r"\bk must have a floating dtype"),
    ("v_bool", dict(v=jnp.zeros((B, TK, HKV, DV), bool)), TypeError,
     r"\bv must have a floating dtype"),
    ("mixed_dtypes", dict(k=jnp.zeros((B, TK, HKV, D), jnp.bfloat16)), TypeError,
     r"q, k and v must share one dtype.*bfloat16"),
    ("batch", dict(k=_f(B + 1, TK, HKV, D), v=_f(B + 1, TK, HKV, DV)),
     ValueError, r"batch sizes differ: q 2, k 3"),
    ("k_v_length", dict(v=_f(B, TK + 1, HKV, DV)), ValueError, r"k .* and v .*Tk"),
    ("k_v_heads", dict(v=_f(B, TK, HKV + 1, DV)), ValueError, r"k .* and v .*Hkv"),
    ("head_dim", dict(k=_f(B, TK, HKV, D + 1), v=_f(B, TK, HKV, DV)),
     ValueError, r"q and k must have the same head dim D, got q 8 and k 9"),
    ("gqa", dict(k=_f(B, TK, 3, D), v=_f(B, TK, 3, DV)), ValueError,
     r"Hq=4 must be a multiple of .* Hkv=3"),
    ("empty", dict(q=_f(B, 0, HQ, D)), ValueError, r"Tq=0"),
    ("mask_type", dict(mask="causal"), TypeError, r"mask must be an lsm Mask"),
    ("q_positions_shape", dict(q_positions=_i32(TQ + 1)), ValueError,
     r"q_positions must have shape \[5\] or \[2, 5\], got \(6,\)"),
    ("q_positions_batch", dict(q_positions=_i32(B + 1, TQ)), ValueError,
     r"q_positions must have shape"),
    ("kv_positions_rank", dict(kv_positions=_i32(1, B, TK)), ValueError,
     r"kv_positions must have shape"),
    ("kv_positions_float", dict(kv_positions=jnp.arange(TK, dtype=jnp.float32)), TypeError,
     r"kv_positions must have an integer dtype"),
    ("q_positions_list_float", dict(q_positions=[0.5] * TQ), TypeError,
     r"q_positions must have an integer dtype"),
    ("q_segment_ids_shape", dict(q_segment_ids=_i32(TK), kv_segment_ids=_i32(TK)), ValueError,
     r"q_segment_ids must have shape"),
    ("kv_segment_ids_float", dict(q_segment_ids=_i32(TQ), kv_segment_ids=jnp.zeros(TK)),
     TypeError, r"kv_segment_ids must have an integer dtype"),
    ("only_q_segment_ids", dict(q_segment_ids=_i32(TQ)), ValueError,
     r"both q_segment_ids and kv_segment_ids"),
    ("only_kv_segment_ids", dict(kv_segment_ids=_i32(TK)), ValueError,
     r"both q_segment_ids and kv_segment_ids.*kv_segment_ids=set"),
    ("sinks_shape", dict(sinks=jnp.zeros(HKV)), ValueError, r"sinks must have shape \[Hq\]"),
    ("sinks_rank", dict(sinks=_f(1, HQ)), ValueError, r"sinks must have shape"),
    ("sinks_int", dict(sinks=jnp.zeros(HQ, jnp.int32)), TypeError,
     r"sinks must have a floating dtype"),
    ("sinks_list", dict(sinks=[0.0] * HQ), TypeError, r"sinks must be an array"),
    ("scale_zero", dict(scale=0.0), ValueError, r"scale must be a positive finite number"),
    ("scale_negative", dict(scale=-1), ValueError, r"scale must be"),
    ("scale_nan", dict(scale=float("nan")), ValueError, r"scale must be"),
    ("scale_inf", dict(scale=float("inf")), ValueError, r"scale must be"),
    ("scale_bool", dict(scale=True), ValueError, r"scale must be"),
    ("scale_str", dict(scale="0.5"), ValueError, r"scale must be"),
    ("scale_array", dict(scale=jnp.ones(2)), ValueError, r"scale must be"),
    ("cap_zero", dict(logits_soft_cap=0), ValueError, r"logits_soft_cap must be .* or None"),
    ("cap_negative", dict(logits_soft_cap=-30.0), ValueError, r"logits_soft_cap must be"),
    ("cap_inf", dict(logits_soft_cap=float("inf")), ValueError, r"logits_soft_cap must be"),
    ("layout_short", dict(mask=Mask(layout=_LAYOUT, layout_block=(4, 8))), ValueError,
     r"mask.layout of shape \(1, 1\) with layout_block \(4, 8\) covers 4 query"),
    ("block_sizes_type", dict(block_sizes=(8, 8)), TypeError,
     r"block_sizes must be a BlockSizes"),
    ("implementation", dict(implementation="pallas"), ValueError,
     r"implementation must be one of \('reference', 'xla', 'pallas_tpu', 'pallas_gpu'\)"),
    ("implementation_case", dict(implementation="XLA"), ValueError, r"implementation"),
]


@pytest.mark.parametrize("overrides,error,match", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_attention_rejects(tripwire, overrides, error, match):
  args = {**_valid(), **overrides}
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(error, match=match):
    attention(q, k, v, **args)


@pytest.mark.parametrize("overrides,error,match", [c[1:] for c in CASES
                                                   if c[0] in ("gqa", "head_dim", "sinks_shape",
                                                               "q_positions_shape")],
                         ids=["gqa", "head_dim", "sinks_shape", "q_positions_shape"])
def test_attention_rejects_at_trace_time_under_jit(overrides, error, match):
  """Under jit the same check fires while tracing, with the same message."""
  args = {**_valid(), **overrides}
  arrays = {name: args.pop(name) for name in list(args) if hasattr(args[name], "shape")}
  with pytest.raises(error, match=match):
    jax.jit(lambda arrays: attention(**arrays, **args))(arrays)


def test_layout_with_explicit_positions_is_not_checked_for_coverage(tripwire):
  """Explicit positions may fall outside a layout on purpose (outside = masked): no error."""
  args = _valid()
  with pytest.raises(AssertionError, match="implementation was reached"):
    attention(**args, mask=Mask(layout=_LAYOUT, layout_block=(4, 8)),
              q_positions=jnp.arange(TQ), kv_positions=jnp.arange(TK))


MASK_CASES = [
    ("causal_str", dict(causal="yes"), TypeError, r"Mask.causal must be a bool"),
    ("causal_int", dict(causal=1), TypeError, r"Mask.causal"),
    ("window_negative", dict(window=(-1, 0)), ValueError, r"Mask.window\[left\] must be"),
    ("window_right_negative", dict(window=(0, -3)), ValueError, r"Mask.window\[right\]"),
    ("window_float", dict(window=(2.5, 0)), ValueError, r"Mask.window\[left\]"),
    ("window_bool", dict(window=(True, 0)), ValueError, r"Mask.window\[left\]"),
    ("window_length", dict(window=(1, 2, 3)), ValueError, r"Mask.window must be a \(left, right\)"),
    ("window_scalar", dict(window=4), ValueError, r"Mask.window must be"),
    ("chunk_zero", dict(chunk=0), ValueError, r"Mask.chunk must be a positive int"),
    ("chunk_float", dict(chunk=8.0), ValueError, r"Mask.chunk"),
    ("prefix_negative", dict(prefix=-1), ValueError, r"Mask.prefix must be a non-negative int"),
    ("prefix_str", dict(prefix="4"), ValueError, r"Mask.prefix"),
    ("sink_tokens_negative", dict(sink_tokens=-2), ValueError, r"Mask.sink_tokens"),
    ("sink_tokens_float", dict(sink_tokens=1.5), ValueError, r"Mask.sink_tokens"),
    ("layout_without_block", dict(layout=_LAYOUT), ValueError,
     r"Mask.layout and Mask.layout_block must be given together"),
    ("block_without_layout", dict(layout_block=(4, 4)), ValueError,
     r"Mask.layout and Mask.layout_block"),
    ("layout_1d", dict(layout=np.ones(3, bool), layout_block=(4, 4)), ValueError,
     r"Mask.layout must be a 2-D boolean array"),
    ("layout_int", dict(layout=np.ones((2, 2), np.int32), layout_block=(4, 4)), ValueError,
     r"Mask.layout must be a 2-D boolean.*int32"),
    ("layout_block_length", dict(layout=_LAYOUT, layout_block=(4,)), ValueError,
     r"Mask.layout_block must be a \(bq, bk\) pair"),
    ("layout_block_zero", dict(layout=_LAYOUT, layout_block=(0, 4)), ValueError,
     r"Mask.layout_block\[bq\] must be a positive int"),
    ("layout_block_float", dict(layout=_LAYOUT, layout_block=(4, 2.0)), ValueError,
     r"Mask.layout_block\[bk\]"),
]


@pytest.mark.parametrize("kwargs,error,match", [c[1:] for c in MASK_CASES],
                         ids=[c[0] for c in MASK_CASES])
def test_mask_rejects(kwargs, error, match):
  with pytest.raises(error, match=match):
    Mask(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=0), r"BlockSizes.q must be a positive int, got 0"),
    (dict(kv=-8), r"BlockSizes.kv must be a positive int"),
    (dict(q=8.0), r"BlockSizes.q"),
    (dict(kv=True), r"BlockSizes.kv"),
])
def test_block_sizes_reject(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BlockSizes(**kwargs)


_OUT = _f(B, TQ, HQ, DV)
_LSE = _f(B, HQ, TQ)


@pytest.mark.parametrize("partials,kwargs,match", [
    ([], {}, r"partials must be a non-empty list"),
    ((_OUT, _LSE), {}, r"partials\[0\] must be an \(out, lse\) pair"),
    ([(_OUT, _LSE), (_OUT,)], {}, r"partials\[1\] must be an \(out, lse\) pair"),
    ([(_OUT[0], _LSE)], {}, r"partials\[0\] out must be \[B, T, H, Dv\]"),
    ([(_OUT, _LSE), (_OUT, _LSE.transpose(0, 2, 1))], {}, r"partials\[1\] lse must have shape"),
    ([(_OUT, _LSE), (_OUT[:, :3], _LSE[..., :3])], {}, r"partials\[1\] out has shape"),
    ([(_OUT, _LSE)], dict(sinks=jnp.zeros(HQ + 1)), r"sinks must have shape \[H\]"),
], ids=["empty", "not_a_list_of_pairs", "short_pair", "out_rank", "lse_shape", "mixed_shapes",
        "sinks"])
def test_merge_rejects(partials, kwargs, match):
  with pytest.raises(ValueError, match=match):
    merge(partials, **kwargs)


def test_visited_blocks_rejects_one_segment_array():
  with pytest.raises(ValueError, match=r"q_segment_ids and kv_segment_ids"):
    visited_blocks(Mask(), np.arange(8), np.arange(8), np.zeros(8, np.int32))
