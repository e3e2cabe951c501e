"""Both implementations, in float64, against attention written out loop by loop from the
documented semantics, and their gradients against finite differences. Everything else compares
xla with the reference; this anchors the reference itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lsm.kernels.attention import BlockSizes, Mask, attention
from tests.kernels.attention.helpers import (Shape, allowed_by_definition, draw,
                                             normalised_error, packed_segments, seed_of)

BLOCKS = BlockSizes(q=4, kv=4)


def _by_the_book(q, k, v, *, mask, q_pos, kv_pos, q_seg, kv_seg, sinks, scale, cap):
  """out and lse of every (batch, head, query) row from a plain softmax over its visible keys
  and the sink column; query head h reads key/value head h // (Hq / Hkv)."""
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((b, tq, hq, dv))
  lse = np.full((b, hq, tq), -np.inf)
  for n in range(b):
    for i in range(tq):
      keys = [j for j in range(tk)
              if allowed_by_definition(mask, int(q_pos[n, i]), int(kv_pos[n, j]))
              and (q_seg is None or q_seg[n, i] == kv_seg[n, j])]
      for h in range(hq):
        kv_head = h // (hq // hkv)
        logits = [scale * q[n, i, h] @ k[n, j, kv_head] for j in keys]
        if cap is not None:
          logits = [cap * np.tanh(s / cap) for s in logits]
        columns = logits + ([sinks[h]] if sinks is not None else [])
        if not columns:
          continue
        top = max(columns)
        weights = np.exp(np.array(columns) - top)
        lse[n, h, i] = top + np.log(weights.sum())
        for w, j in zip(weights, keys):
          out[n, i, h] += w / weights.sum() * v[n, j, kv_head]
  return out, lse


CASES = {
    "plain": (Shape(b=1, tq=9, tk=9, hq=2, hkv=2, d=4, dv=4), Mask(), {}),
    "gqa_causal_dv": (Shape(b=2, tq=9, tk=9, hq=4, hkv=2, d=4, dv=3), Mask(causal=True), {}),
    "mqa_window_sinks_cap_scale": (
        Shape(b=1, tq=10, tk=10, hq=3, hkv=1, d=4, dv=5),
        Mask(causal=True, window=(3, 0), sink_tokens=1),
        dict(sinks=True, scale=0.9, cap=1.5)),
    "packed_prefix_chunk": (Shape(b=2, tq=11, tk=11, hq=2, hkv=1, d=4, dv=4),
                            Mask(causal=True, chunk=4, prefix=3), dict(packed=True)),
    "offset_layout_sinks": (
        Shape(b=1, tq=5, tk=12, hq=2, hkv=1, d=4, dv=2),
        Mask(layout=np.array([[True, False, True], [False, True, True]]), layout_block=(6, 4)),
        dict(sinks=True, offset=7)),
}


def _case(name):
  shape, mask, options = CASES[name]
  seed = seed_of("definition", name)
  inputs = draw(seed, shape, sinks=options.get("sinks", False))
  q_pos = np.broadcast_to(np.arange(shape.tq) + options.get("offset", 0), (shape.b, shape.tq))
  kv_pos = np.broadcast_to(np.arange(shape.tk), (shape.b, shape.tk))
  q_seg = kv_seg = None
  if options.get("packed"):
    q_seg, q_pos = packed_segments(np.random.default_rng(seed), shape.b, shape.tq, 3)
    kv_seg, kv_pos = q_seg, q_pos
  kwargs = dict(mask=mask, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, scale=options.get("scale"),
                logits_soft_cap=options.get("cap"))
  return inputs, kwargs


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("name", CASES)
def test_float64_matches_the_definition(name, implementation):
  inputs, kwargs = _case(name)
  want = _by_the_book(inputs.q, inputs.k, inputs.v, mask=kwargs["mask"],
                      q_pos=kwargs["q_positions"], kv_pos=kwargs["kv_positions"],
                      q_seg=kwargs["q_segment_ids"], kv_seg=kwargs["kv_segment_ids"],
                      sinks=inputs.sinks, scale=kwargs["scale"], cap=kwargs["logits_soft_cap"])
  q, k, v, sinks, *_ = inputs.arrays(jnp.float64)
  out, lse = attention(q, k, v, sinks=sinks, implementation=implementation, return_lse=True,
                       block_sizes=BLOCKS, **kwargs)
  assert normalised_error(out, want[0]) < 1e-12
  assert normalised_error(lse, want[1]) < 1e-12


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("name", ["gqa_causal_dv", "mqa_window_sinks_cap_scale",
                                  "packed_prefix_chunk", "offset_layout_sinks"])
def test_gradients_match_finite_differences(name, implementation):
  """The xla path's hand-written backward (and the reference's autodiff) in float64, against
  numerical derivatives of out and of the finite lse."""
  inputs, kwargs = _case(name)
  q, k, v, sinks, w_out, w_lse = inputs.arrays(jnp.float64)

  def f(q, k, v, *maybe_sinks):
    out, lse = attention(q, k, v, sinks=maybe_sinks[0] if maybe_sinks else None,
                         implementation=implementation, return_lse=True, block_sizes=BLOCKS,
                         **kwargs)
    return out * w_out, jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse

  args = (q, k, v) if sinks is None else (q, k, v, sinks)
  check_grads(jax.jit(f), args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
