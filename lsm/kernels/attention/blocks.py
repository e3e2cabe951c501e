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


# Keys moved out of every window (the main call of a sink split) and padding keys no causal query
# reaches: masks take positions in (-2**30, 2**30).
FAR_PAST, FAR_FUTURE = -(2**30 - 1), 2**30 - 1


@dataclasses.dataclass(frozen=True)
class SinkSplit:
  """A window mask's sinks as a call of their own (`sink_split`)."""

  main_mask: Mask  # the mask without sink_tokens
  main_kv_positions: np.ndarray  # [B, Tk]: the sink keys moved to FAR_PAST
  index: np.ndarray  # [B, W] int32: per row the sink keys' indices, in order, padded
  sink_positions: np.ndarray  # [B, W]: their positions (padding: FAR_FUTURE)
  main_visits: int  # key blocks the main call visits (counted without segments if traced)
  visits: int  # key blocks the single call would visit


def sink_split(mask: Mask, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
               bq: int, bk: int) -> SinkSplit | None:
  """Whether to attend to ``mask``'s sink tokens in a call of their own, and how.

  Sinks next to a window make every query block visit the key block holding them: a whole
  block of scores for a few columns (at T = 16k, 25% of the pairs, that is 38% of the causal
  blocks instead of 34%). When the positions are known at trace time (numpy, as the default
  positions are), the sink keys — ``kv_pos < sink_tokens``, at the start of every document —
  can be gathered into a short block of their own, and the main call can see them nowhere
  (moved before every window). Returns the plan when that visits fewer key blocks and the
  sinks fit in half a key block, else None (also for masks with a ``prefix``, which the moved
  keys would still match, with no window, where nothing is saved, and for non-causal masks,
  which would see the padding of rows with fewer sinks).
  """
  if (mask.sink_tokens is None or mask.window is None or mask.prefix is not None
      or not mask.causal or mask.window[0] >= 2**29  # padding and moved keys rely on these
      or not isinstance(kv_positions, np.ndarray) or not isinstance(q_positions, np.ndarray)):
    return None
  is_sink = kv_positions < mask.sink_tokens  # [B, Tk]
  width = int(is_sink.sum(axis=-1).max())
  if width == 0 or width > bk // 2:
    return None
  main_mask = dataclasses.replace(mask, sink_tokens=None)
  main_kv = np.where(is_sink, FAR_PAST, kv_positions).astype(np.int32)
  if not isinstance(q_segment_ids, np.ndarray) or not isinstance(kv_segment_ids, np.ndarray):
    q_segment_ids = kv_segment_ids = None  # without segments a plan visits at least as many
  qt = TokenBlocks.build(q_positions, q_segment_ids, bq)
  visits, main_visits = (int(block_tables(m, qt, TokenBlocks.build(p, kv_segment_ids, bk))[0]
                             .sum()) for m, p in ((mask, kv_positions), (main_mask, main_kv)))
  if main_visits >= visits:
    return None
  index = np.argsort(~is_sink, axis=-1, kind="stable")[:, :width].astype(np.int32)
  sink_positions = np.where(np.take_along_axis(is_sink, index, -1),
                            np.take_along_axis(kv_positions, index, -1), FAR_FUTURE)
  return SinkSplit(main_mask, main_kv, index, sink_positions.astype(np.int32), main_visits,
                   visits)
