"""Pallas GPU (Triton) kernel of `linear_scan`, chunked over time.

One program per (batch row, chunk of time, block of channels) walks its chunk a row at a time
with the state in registers. Pass 1 starts every chunk from zero and keeps only the chunk-end
state and the product of the chunk's ``a``; a short XLA scan over chunks turns those into every
chunk's start state; pass 2 rescans each chunk from its start state and writes h. So the grid is
wide in time as well as in channels, at the price of reading a and b twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

CHANNEL_BLOCK = 64


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _rows(chunk: int, reverse: bool):
  """Row index of step t of a chunk, in scan order."""
  return (lambda t: chunk - 1 - t) if reverse else (lambda t: t)


def _ends_kernel(a_ref, b_ref, end_ref, prod_ref, *, reverse: bool):
  chunk = a_ref.shape[0]
  row = _rows(chunk, reverse)

  def step(t, carry):
    h, prod = carry
    a = a_ref[row(t), :].astype(jnp.float32)
    return a * h + b_ref[row(t), :].astype(jnp.float32), a * prod

  zeros = jnp.zeros(end_ref.shape, jnp.float32)
  h, prod = lax.fori_loop(jnp.int32(0), jnp.int32(chunk), step, (zeros, zeros + 1))
  end_ref[...] = h
  prod_ref[...] = prod


def _scan_kernel(a_ref, b_ref, start_ref, h_ref, *, reverse: bool):
  chunk = a_ref.shape[0]
  row = _rows(chunk, reverse)

  def step(t, h):
    h = a_ref[row(t), :].astype(jnp.float32) * h + b_ref[row(t), :].astype(jnp.float32)
    h_ref[row(t), :] = h
    return h

  lax.fori_loop(jnp.int32(0), jnp.int32(chunk), step, start_ref[...])


def linear_scan_kernel(a_BTC, b_BTC, h0_BC, *, reverse: bool, chunk_size: int, interpret: bool):
  """h [B, T, C] and h_last [B, C] (float32) of h_t = a_t h_{t-1} + b_t; a and b share one real
  dtype. Chunks are ``chunk_size`` rounded up to a power of two (Triton block shapes)."""
  batch, length, channels = a_BTC.shape
  chunk = min(pl.next_power_of_2(chunk_size), pl.next_power_of_2(length))
  length_p, channels_p = _round_up(length, chunk), _round_up(channels, CHANNEL_BLOCK)
  chunks = length_p // chunk
  # Padding steps (a = 1, b = 0) keep the state: at the end forwards, met first in reverse.
  pad = ((0, 0), (0, length_p - length), (0, channels_p - channels))
  a_BTC = jnp.pad(a_BTC, pad, constant_values=1)
  b_BTC = jnp.pad(b_BTC, pad)
  grid = (batch, chunks, channels_p // CHANNEL_BLOCK)
  rows = pl.BlockSpec((None, chunk, CHANNEL_BLOCK), lambda i, k, c: (i, k, c))
  per_chunk = pl.BlockSpec((None, None, CHANNEL_BLOCK), lambda i, k, c: (i, k, c))
  chunk_states = jax.ShapeDtypeStruct((batch, chunks, channels_p), jnp.float32)
  params = None if interpret else pl_triton.CompilerParams(num_warps=2, num_stages=2)

  end_BNC, prod_BNC = pl.pallas_call(
      functools.partial(_ends_kernel, reverse=reverse), grid=grid,
      in_specs=[rows, rows], out_specs=[per_chunk, per_chunk],
      out_shape=[chunk_states, chunk_states], compiler_params=params, interpret=interpret,
      name="lsm_linear_scan_chunk_ends",
  )(a_BTC, b_BTC)

  def across(h_start, ends):
    prod, end = ends
    return prod * h_start + end, h_start

  h0_BC = jnp.pad(h0_BC.astype(jnp.float32), ((0, 0), (0, channels_p - channels)))
  h_last, start_NBC = lax.scan(across, h0_BC, (jnp.moveaxis(prod_BNC, 1, 0),
                                               jnp.moveaxis(end_BNC, 1, 0)), reverse=reverse)
  h_BTC = pl.pallas_call(
      functools.partial(_scan_kernel, reverse=reverse), grid=grid,
      in_specs=[rows, rows, per_chunk], out_specs=rows,
      out_shape=jax.ShapeDtypeStruct((batch, length_p, channels_p), jnp.float32),
      compiler_params=params, interpret=interpret, name="lsm_linear_scan_chunks",
  )(a_BTC, b_BTC, jnp.moveaxis(start_NBC, 0, 1))
  return h_BTC[:, :length, :channels], h_last[:, :channels]
