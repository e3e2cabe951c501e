"""Which key blocks each query block must visit, decided from per-block position ranges.

Shared by every blockwise implementation of the attention op: tokens are cut into blocks, each
block's range of positions and segment ids is reduced to (lo, hi), and `Mask.block_may_be_visible`
/ `Mask.block_is_full` turn the ranges into a [nq, nk] table. This runs on traced values, so
skipping works for positions known only at run time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import numpy as np

from lsm.kernels.attention.mask import Mask, array_module

_BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Token block sizes of the blockwise paths (clipped to the sequence lengths)."""

  q: int = 512
  kv: int = 512

  def __post_init__(self):
    for name in ("q", "kv"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  def clipped(self, tq: int, tk: int) -> tuple[int, int]:
    """The (bq, bk) actually used: no block longer than its sequence."""
    return min(self.q, tq), min(self.kv, tk)


def token_blocks(x_BT, block: int, fill):
  """[B, T] -> [n, B, block], T padded with ``fill`` to a multiple of block."""
  b, t = x_BT.shape
  n = -(-t // block)
  x = array_module(x_BT).pad(x_BT, ((0, 0), (0, n * block - t)), constant_values=fill)
  return x.reshape(b, n, block).transpose(1, 0, 2)  # [n, B, block]


@dataclasses.dataclass
class TokenBlocks:
  """Per-block positions, segment ids and validity of one side (queries or keys)."""

  pos: jax.Array  # [n, B, block]
  seg: jax.Array | None  # [n, B, block]
  valid: jax.Array  # [n, B, block]
  padded: bool  # whether the last block holds padding

  @classmethod
  def build(cls, pos_BT, seg_BT, block: int):
    """numpy blocks when positions and ids are numpy arrays, else jax arrays."""
    xp = array_module(pos_BT, *(() if seg_BT is None else (seg_BT,)))
    pos_BT = xp.asarray(pos_BT)
    seg_BT = None if seg_BT is None else xp.asarray(seg_BT)
    t = pos_BT.shape[1]
    valid = token_blocks(xp.ones(pos_BT.shape, bool), block, False)
    seg = None if seg_BT is None else token_blocks(seg_BT, block, 0)
    return cls(token_blocks(pos_BT, block, 0), seg, valid, t % block != 0)

  def ranges(self, x):
    xp = array_module(x)
    lo = xp.min(xp.where(self.valid, x, _BIG), axis=-1)
    hi = xp.max(xp.where(self.valid, x, -_BIG), axis=-1)
    return lo, hi  # [n, B]


def block_tables(mask: Mask, qt: TokenBlocks, kt: TokenBlocks):
  """visible[nq, nk] (some pair may be allowed for some batch row) and full[nq, nk]."""
  q_lo, q_hi = qt.ranges(qt.pos)
  k_lo, k_hi = kt.ranges(kt.pos)
  args = (q_lo[:, None], q_hi[:, None], k_lo[None], k_hi[None])  # [nq, nk, B] each
  visible = mask.block_may_be_visible(*args)
  full = mask.block_is_full(*args)
  if qt.seg is not None:
    qs_lo, qs_hi = qt.ranges(qt.seg)
    ks_lo, ks_hi = kt.ranges(kt.seg)
    visible &= (qs_lo[:, None] <= ks_hi[None]) & (ks_lo[None] <= qs_hi[:, None])
    full &= (qs_lo[:, None] == qs_hi[:, None]) & (ks_lo[None] == ks_hi[None]) & (
        qs_lo[:, None] == ks_lo[None])
  xp = array_module(visible, full)
  visible = xp.any(visible, axis=-1)
  full = xp.all(full, axis=-1)
  nq, nk = visible.shape
  # Blocks holding padding are never full (their padded tokens must be masked).
  full = full & (xp.arange(nq)[:, None] < nq - int(qt.padded))
  full = full & (xp.arange(nk)[None, :] < nk - int(kt.padded))
  return visible, full


def visit_lists(visible):
  """Per row: the visible column indices first (in order), and how many there are."""
  xp = array_module(visible)
  order = xp.argsort(~visible, axis=-1, stable=True).astype(np.int32)
  return order, xp.sum(visible, axis=-1, dtype=np.int32)


def visited_blocks(mask: Mask, q_positions, kv_positions, q_segment_ids=None,
                   kv_segment_ids=None, *, block_sizes: BlockSizes = BlockSizes()):
  """The [nq, nk] boolean table of key blocks the XLA path visits per query block.

  Positions and segment ids are [B, T] (or [T]); useful to check that a layout is really sparse.
  """
  q_positions = jnp.atleast_2d(jnp.asarray(q_positions, jnp.int32))
  kv_positions = jnp.atleast_2d(jnp.asarray(kv_positions, jnp.int32))
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("visited_blocks: give both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None:
    q_segment_ids = jnp.atleast_2d(jnp.asarray(q_segment_ids, jnp.int32))
    kv_segment_ids = jnp.atleast_2d(jnp.asarray(kv_segment_ids, jnp.int32))
  for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions),
                  ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if x is not None and x.ndim != 2:
      raise ValueError(f"visited_blocks: {name} must be [T] or [B, T], got shape {x.shape}")
  batches = {x.shape[0] for x in (q_positions, kv_positions) if x.shape[0] != 1}
  if len(batches) > 1:
    raise ValueError(f"visited_blocks: q_positions and kv_positions have different batch sizes "
                     f"{q_positions.shape[0]} and {kv_positions.shape[0]}")
  bq, bk = block_sizes.clipped(q_positions.shape[1], kv_positions.shape[1])
  qt = TokenBlocks.build(q_positions, q_segment_ids, bq)
  kt = TokenBlocks.build(kv_positions, kv_segment_ids, bk)
  return block_tables(mask, qt, kt)[0]
