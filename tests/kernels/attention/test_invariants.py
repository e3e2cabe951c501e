"""Invariants of the op: causality, packing, and rows that see nothing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import BlockSizes, Mask, attention
from tests.kernels.attention.helpers import Inputs, Shape, assert_close, draw, run, seed_of

IMPLEMENTATIONS = ["xla", "reference", "pallas_tpu", "pallas_gpu"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask", [Mask(causal=True),
                                  Mask(causal=True, window=(3, 2), sink_tokens=2)],
                         ids=["causal", "causal_window_sinks"])
def test_no_gradient_from_the_future(implementation, mask):
  """d out[i] / d (q, k, v)[j] is exactly zero for every j > i."""
  t = 13
  inputs = draw(seed_of("causality", implementation, mask), Shape(b=1, tq=t, tk=t, hq=2, hkv=1,
                                                                  d=4, dv=3), sinks=True)
  q, k, v, sinks, *_ = inputs.arrays(jnp.float32)

  def f(q, k, v):
    return attention(q, k, v, mask=mask, sinks=sinks, implementation=implementation,
                     block_sizes=BlockSizes(4, 4))

  jacobians = jax.jit(jax.jacrev(f, argnums=(0, 1, 2)))(q, k, v)
  future = np.triu(np.ones((t, t), bool), k=1)  # [i, j]: j > i
  for name, jac in zip("qkv", jacobians):
    # [1, T, Hq, Dv, 1, T, H, D] -> |.| summed to [T (out row), T (input row)]
    per_rows = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))
    assert np.all(per_rows[future] == 0.0), f"out depends on future {name}"
    assert np.all(np.diag(per_rows) > 0), f"out does not depend on its own {name}"


def _concat(a: Inputs, b: Inputs) -> Inputs:
  cat = lambda x, y, axis: np.concatenate([x, y], axis=axis)
  return Inputs(q=cat(a.q, b.q, 1), k=cat(a.k, b.k, 1), v=cat(a.v, b.v, 1), sinks=a.sinks,
                w_out=cat(a.w_out, b.w_out, 1), w_lse=cat(a.w_lse, b.w_lse, 2))


@pytest.mark.parametrize("mask", [Mask(causal=True),
                                  Mask(causal=True, window=(6, 0), sink_tokens=2),
                                  Mask(window=(4, 4), prefix=3)],
                         ids=["causal", "window_sinks", "bidirectional_prefix"])
def test_packing_equals_separate_documents(mask):
  """attention(a ‖ b) with segment ids and restarting positions == attention(a) ‖ attention(b),
  outputs, lse and gradients, all on the XLA path."""
  ta, tb = 13, 24
  a = draw(seed_of("doc a", mask), Shape(tq=ta, tk=ta), sinks=True)
  b = draw(seed_of("doc b", mask), Shape(tq=tb, tk=tb), sinks=True)
  b.sinks = a.sinks
  seg = np.repeat([3, 8], [ta, tb])
  pos = np.concatenate([np.arange(ta), np.arange(tb)])
  packed = run("xla", jnp.float32, _concat(a, b), mask=mask, q_positions=pos, kv_positions=pos,
               q_segment_ids=seg, kv_segment_ids=seg)
  alone = [run("xla", jnp.float32, doc, mask=mask) for doc in (a, b)]
  time_axis = {"out": 1, "lse": 2, "q": 1, "k": 1, "v": 1}
  for what, got, parts in [("out", packed[0], [x[0] for x in alone]),
                           ("lse", packed[1], [x[1] for x in alone]),
                           *[(n, packed[2][n], [x[2][n] for x in alone]) for n in "qkv"]]:
    assert_close(got, jnp.concatenate(parts, axis=time_axis[what]), jnp.float32, what)
  # The loss is a sum over documents, so the sink gradients add up.
  assert_close(packed[2]["sinks"], alone[0][2]["sinks"] + alone[1][2]["sinks"], jnp.float32,
               "dsinks")


@functools.partial(jax.jit, static_argnames=("implementation", "with_sinks"))
def _unseen_rows(q, k, v, sinks, q_pos, q_seg, kv_seg, *, implementation, with_sinks):
  mask = Mask(causal=True, window=(5, 0))

  def loss(q, k, v, sinks):
    out, lse = attention(q, k, v, mask=mask, q_positions=q_pos, q_segment_ids=q_seg,
                         kv_segment_ids=kv_seg, sinks=sinks if with_sinks else None,
                         implementation=implementation, return_lse=True,
                         block_sizes=BlockSizes(8, 16))
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (
        out, lse)

  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      q, k, v, sinks)
  return out, lse, grads


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("implementation,dtype", [
    (name, dtype) for name in IMPLEMENTATIONS
    for dtype in (jnp.float32, jnp.bfloat16) + ((jnp.float64,) if "pallas" not in name else ())
], ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name)
def test_rows_that_see_nothing(implementation, dtype, with_sinks):
  """Rows before every key (causal with a negative position) or in a segment no key has:
  out exactly 0, lse -inf (or the sink logit), no NaN anywhere in the gradients."""
  tq, tk = 21, 29
  inputs = draw(seed_of("unseen", implementation, str(dtype), with_sinks),
                Shape(tq=tq, tk=tk), sinks=True)
  q, k, v, sinks, *_ = inputs.arrays(dtype)
  q_pos = jnp.arange(tq) - 4  # rows 0..3 precede key 0
  q_seg = jnp.zeros((2, tq), jnp.int32).at[1, 10:].set(5)  # no key has segment 5
  kv_seg = jnp.zeros((2, tk), jnp.int32)
  unseen = np.zeros((2, tq), bool)
  unseen[:, :4] = True
  unseen[1, 10:] = True
  out, lse, grads = _unseen_rows(q, k, v, sinks, q_pos, q_seg, kv_seg,
                                 implementation=implementation, with_sinks=with_sinks)
  out, lse = np.asarray(out, np.float64), np.asarray(lse)
  np.testing.assert_array_equal(out[unseen], 0.0)
  assert np.all(np.abs(out[~unseen]).sum(axis=(-2, -1)) > 0)
  want_lse = np.asarray(sinks, np.float64)[None, :] if with_sinks else -np.inf
  np.testing.assert_array_equal(lse.transpose(0, 2, 1)[unseen],
                                np.broadcast_to(want_lse, (unseen.sum(), 4)))
  assert np.all(np.isfinite(lse.transpose(0, 2, 1)[~unseen]))
  for name, g in zip(("q", "k", "v", "sinks"), grads):
    assert np.all(np.isfinite(np.asarray(g, np.float64))), f"d{name} is not finite"
  # A row that sees no key cannot move with its query.
  np.testing.assert_array_equal(np.asarray(grads[0], np.float64)[unseen], 0.0)
  if with_sinks:
    assert np.any(np.asarray(grads[3]) != 0)
