"""Pallas TPU (Mosaic) kernel of `linear_scan`.

Grid (batch, channel block, sequence block); the sequence axis is last and "arbitrary", and the
float32 state rides across its blocks in a VMEM scratch row that sequence block 0 sets to h0.
Time runs down the sublanes and channels along the lanes: a block is walked one sublane tile
(8 rows, 16 for 16-bit inputs) at a time, the tile's steps unrolled on values, and each finished
tile stored whole. ``reverse`` walks the blocks, tiles and rows backwards through the index maps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
MAX_CHANNEL_BLOCK = 512


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _tile_rows(dtype) -> int:
  """Rows of one sublane tile: 8 for 32-bit data, 16 for 16-bit (two rows per sublane)."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def _kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, carry_ref, *, reverse: bool, rows: int):
  block_t, block_c = a_ref.shape
  tiles = block_t // rows
  seq = pl.program_id(2)

  @pl.when(seq == 0)
  def _start():
    carry_ref[...] = h0_ref[...]

  row_id = lax.broadcasted_iota(jnp.int32, (rows, block_c), 0)
  order = range(rows - 1, -1, -1) if reverse else range(rows)

  def tile(i, h):
    start = pl.multiple_of((tiles - 1 - i if reverse else i) * rows, rows)
    a = a_ref[pl.ds(start, rows), :].astype(jnp.float32)
    b = b_ref[pl.ds(start, rows), :].astype(jnp.float32)
    out = jnp.zeros((rows, block_c), jnp.float32)
    for r in order:
      h = a[r:r + 1] * h + b[r:r + 1]
      out = jnp.where(row_id == r, h, out)
    h_ref[pl.ds(start, rows), :] = out
    return h

  # int32 bounds: Mosaic has no 64-bit index arithmetic (the loop index follows the bounds).
  h = lax.fori_loop(jnp.int32(0), jnp.int32(tiles), tile, carry_ref[...])
  carry_ref[...] = h

  @pl.when(seq == pl.num_programs(2) - 1)
  def _finish():
    h_last_ref[...] = h


def linear_scan_kernel(a_BTC, b_BTC, h0_BC, *, reverse: bool, chunk_size: int, interpret: bool):
  """h [B, T, C] and h_last [B, C] (float32) of h_t = a_t h_{t-1} + b_t; a and b share one real
  dtype. Sequence blocks are ``chunk_size`` rounded up to whole sublane tiles."""
  batch, length, channels = a_BTC.shape
  rows = _tile_rows(a_BTC.dtype)
  block_t = min(_round_up(chunk_size, rows), _round_up(length, rows))
  block_c = min(MAX_CHANNEL_BLOCK, _round_up(channels, LANES))
  length_p, channels_p = _round_up(length, block_t), _round_up(channels, block_c)
  # Padding steps (a = 1, b = 0) keep the state: at the end forwards, met first in reverse.
  pad = ((0, 0), (0, length_p - length), (0, channels_p - channels))
  a_BTC = jnp.pad(a_BTC, pad, constant_values=1)
  b_BTC = jnp.pad(b_BTC, pad)
  h0_B1C = jnp.pad(h0_BC.astype(jnp.float32), ((0, 0), (0, channels_p - channels)))[:, None]
  blocks_t = length_p // block_t

  def seq_block(i, c, j):
    return (i, blocks_t - 1 - j if reverse else j, c)

  row_spec = pl.BlockSpec((None, block_t, block_c), seq_block)
  state_spec = pl.BlockSpec((None, 1, block_c), lambda i, c, j: (i, 0, c))
  h_BTC, h_last_B1C = pl.pallas_call(
      functools.partial(_kernel, reverse=reverse, rows=rows),
      grid=(batch, channels_p // block_c, blocks_t),
      in_specs=[row_spec, row_spec, state_spec],
      out_specs=[row_spec, state_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, length_p, channels_p), jnp.float32),
                 jax.ShapeDtypeStruct((batch, 1, channels_p), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((1, block_c), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="lsm_linear_scan",
  )(a_BTC, b_BTC, h0_B1C)
  return h_BTC[:, :length, :channels], h_last_B1C[:, 0, :channels]
