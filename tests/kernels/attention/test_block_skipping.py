"""Block skipping: which key blocks are visited per query block, and that every fast path (xla
and both kernels) really leaves the others alone (keys poisoned with NaN in skipped blocks never
reach an output)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import BlockSizes, Mask, attention, visited_blocks
from lsm.kernels.attention import pallas_common
from tests.kernels.attention.helpers import (FAST, Shape, allowed_by_definition, assert_close,
                                             draw, run, seed_of)


def _needed_blocks(mask, q_pos, kv_pos, bq, bk, q_seg=None, kv_seg=None):
  """[nq, nk]: blocks holding at least one allowed pair, by brute force ([T] inputs)."""
  nq, nk = -(-len(q_pos) // bq), -(-len(kv_pos) // bk)
  needed = np.zeros((nq, nk), bool)
  for i, qp in enumerate(q_pos):
    for j, kp in enumerate(kv_pos):
      same = q_seg is None or q_seg[i] == kv_seg[j]
      needed[i // bq, j // bk] |= same and allowed_by_definition(mask, int(qp), int(kp))
  return needed


def test_sliding_window_visits_window_over_block_size():
  bq = bk = 16
  mask = Mask(causal=True, window=(31, 0))
  for t in (128, 256):
    visited = np.asarray(visited_blocks(mask, np.arange(t), np.arange(t),
                                        block_sizes=BlockSizes(bq, bk)))
    n = t // bq
    # Query block i spans [16i, 16i + 15] and sees keys down to 16i - 31: blocks i-2 .. i.
    want = np.array([[max(0, i - 2) <= j <= i for j in range(n)] for i in range(n)])
    np.testing.assert_array_equal(visited, want)
    assert visited.sum(axis=1).max() == 3  # ceil(31 / 16) + 1, whatever the length


@pytest.mark.parametrize("bq,bk", [(16, 16), (8, 16), (16, 8)])
def test_causal_visits_the_lower_triangle(bq, bk):
  t = 64
  visited = np.asarray(visited_blocks(Mask(causal=True), np.arange(t), np.arange(t),
                                      block_sizes=BlockSizes(bq, bk)))
  want = np.array([[j * bk <= i * bq + bq - 1 for j in range(t // bk)] for i in range(t // bq)])
  np.testing.assert_array_equal(visited, want)
  if bq == bk:
    np.testing.assert_array_equal(visited, np.tril(np.ones_like(visited)))


def test_layout_visits_exactly_its_blocks():
  layout = np.random.default_rng(seed_of("layout")).random((6, 5)) < 0.4
  layout[2] = False  # a query block that sees nothing visits nothing
  mask = Mask(layout=layout, layout_block=(16, 8))
  visited = visited_blocks(mask, np.arange(96), np.arange(40), block_sizes=BlockSizes(16, 8))
  np.testing.assert_array_equal(np.asarray(visited), layout)


def test_segments_skip_cross_document_blocks():
  t, b = 64, 16
  seg = np.repeat([0, 1], 32)
  visited = np.asarray(visited_blocks(Mask(), np.arange(t), np.arange(t), seg, seg,
                                      block_sizes=BlockSizes(b, b)))
  np.testing.assert_array_equal(visited, np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))
  # Documents not aligned to blocks: the straddling block sees both, the others only their own.
  seg = np.repeat([0, 1, 2], [20, 30, 14])
  visited = np.asarray(visited_blocks(Mask(causal=True), np.arange(t), np.arange(t), seg, seg,
                                      block_sizes=BlockSizes(b, b)))
  np.testing.assert_array_equal(visited, _needed_blocks(Mask(causal=True), np.arange(t),
                                                        np.arange(t), b, b, seg, seg))
  assert not visited[3, 0] and not visited[2, 0]


def test_batch_rows_visit_the_union():
  seg = np.stack([np.repeat([0, 1], 32), np.repeat([0, 1], [16, 48])])
  pos = np.arange(64)
  visited = np.asarray(visited_blocks(Mask(), pos, pos, seg, seg, block_sizes=BlockSizes(16, 16)))
  rows = [np.asarray(visited_blocks(Mask(), pos, pos, s, s, block_sizes=BlockSizes(16, 16)))
          for s in seg]
  np.testing.assert_array_equal(visited, rows[0] | rows[1])
  assert not np.array_equal(rows[0], rows[1])


@pytest.mark.parametrize("mask", [
    Mask(causal=True, window=(5, 0)),
    Mask(causal=True, window=(4, 2), sink_tokens=3),
    Mask(chunk=12),
    Mask(causal=True, prefix=9),
    Mask(layout=np.random.default_rng(7).random((8, 7)) < 0.5, layout_block=(5, 6)),
], ids=["window", "window_sinks", "chunk", "prefix", "layout"])
def test_visits_every_needed_block_and_no_needless_one(mask):
  """Conservative (every block with an allowed pair is visited) and, for these masks whose
  block bounds are exact, tight (nothing else)."""
  t, bq, bk = 37, 8, 6
  visited = np.asarray(visited_blocks(mask, np.arange(t), np.arange(t),
                                      block_sizes=BlockSizes(bq, bk)))
  np.testing.assert_array_equal(visited, _needed_blocks(mask, np.arange(t), np.arange(t), bq, bk))


_POISON_MASKS = {
    "window": Mask(causal=True, window=(11, 0)),
    "window_sinks": Mask(causal=True, window=(6, 0), sink_tokens=2),
    "layout": Mask(layout=np.random.default_rng(3).random((6, 6)) < 0.4, layout_block=(8, 8)),
    "chunk": Mask(chunk=16),
}


_POISON_BLOCKS = BlockSizes(q=16, kv=8)


@functools.partial(jax.jit, static_argnames=("mask", "implementation"))
def _with_grads(q, k, v, w, *, mask, implementation):
  def loss(q, k, v):
    out = attention(q, k, v, mask=mask, implementation=implementation,
                    block_sizes=_POISON_BLOCKS)
    return jnp.sum(out * w), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("name", _POISON_MASKS)
def test_skipped_blocks_are_never_read(name, implementation):
  """Poison one key block at a time with NaN: exactly the query blocks that visit it turn NaN;
  every other row, and its dq, is unchanged — the skipped block was never read."""
  mask = _POISON_MASKS[name]
  t = 45
  # The kernels shrink their blocks to tile the layout's blocks.
  bq, bk = (_POISON_BLOCKS.q, _POISON_BLOCKS.kv) if implementation == "xla" else (
      pallas_common.layout_block_sizes(mask, _POISON_BLOCKS.q, _POISON_BLOCKS.kv))
  inputs = draw(seed_of("poison", name), Shape(b=1, tq=t, tk=t))
  q, k, v, _, w, _ = inputs.arrays(jnp.float32)
  visited = np.asarray(visited_blocks(mask, np.arange(t), np.arange(t),
                                      block_sizes=BlockSizes(bq, bk)))
  with_grads = functools.partial(_with_grads, mask=mask, implementation=implementation)
  clean_out, (clean_dq, _, _) = with_grads(q, k, v, w)
  want = run("reference", jnp.float64, inputs, grads=False, mask=mask)[0]
  assert_close(clean_out, want, jnp.float32, "out")
  skipped_somewhere = False
  for j in range(visited.shape[1]):
    keys = slice(j * bk, (j + 1) * bk)
    out, (dq, _, _) = with_grads(q, k.at[:, keys].set(jnp.nan), v.at[:, keys].set(jnp.nan), w)
    out, dq = np.asarray(out), np.asarray(dq)
    for i in range(visited.shape[0]):
      rows = slice(i * bq, (i + 1) * bq)
      if visited[i, j]:
        assert np.isnan(out[:, rows]).any()  # the poison does reach blocks that are visited
      else:
        skipped_somewhere = True
        np.testing.assert_array_equal(out[:, rows], np.asarray(clean_out)[:, rows])
        np.testing.assert_array_equal(dq[:, rows], np.asarray(clean_dq)[:, rows])
  assert skipped_somewhere


@pytest.mark.parametrize("q_pos,kv_pos,match", [
    (np.zeros((2, 3, 4), int), np.arange(4), r"q_positions must be \[T\] or \[B, T\]"),
    (np.zeros((2, 8), int), np.zeros((3, 8), int), r"different batch sizes 2 and 3"),
])
def test_visited_blocks_rejects_bad_positions(q_pos, kv_pos, match):
  with pytest.raises(ValueError, match=match):
    visited_blocks(Mask(causal=True), q_pos, kv_pos)
