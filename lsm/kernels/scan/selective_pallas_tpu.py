"""Pallas TPU (Mosaic) forward kernel of the selective scan.

Grid (batch, channel block, sequence block); the sequence axis is "arbitrary" and the state of the
channel block lives in a float32 VMEM scratch across it. The state is laid out [N, E_blk] (state
index on sublanes, channels on the 128 lanes), so one token's update is a dense elementwise pass
over a few vregs and ``C_t · h_t`` a sublane reduction. A sequence block is walked in strips of
8 (16 for 16-bit inputs) tokens: x, Δ and z arrive as [strip, E_blk] row tiles; B, C and the
reset flags arrive pre-transposed as [N, strip] tiles so each token's column is a static lane
slice. The strip's outputs are gathered row by row in a small scratch and stored as one tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lsm.kernels.attention.pallas_common import padded, round_up

LANES = 128


def sublanes(*xs) -> int:
  """Tokens per strip: a sublane tile of the narrowest of the [B, T, E] inputs."""
  narrow = any(x is not None and jnp.dtype(x.dtype).itemsize < 4 for x in xs)
  return 16 if narrow else 8


def _channel_blocks(channels: int) -> tuple[int, int]:
  """(E_blk, padded E): the whole E when it fits one lane tile, else up to 512 lanes."""
  if channels <= LANES:
    return channels, channels
  padded_e = round_up(channels, LANES)
  block = next(b for b in (512, 256, 128) if padded_e % b == 0)
  return block, padded_e


def _softplus(v):
  return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _kernel(x_ref, dt_ref, bias_ref, a_ref, d_ref, b_ref, c_ref, h0_ref, *refs, st, rows: int,
            has_z: bool, has_reset: bool):
  refs = list(refs)
  z_ref = refs.pop(0) if has_z else None
  keep_ref = refs.pop(0) if has_reset else None
  y_ref, h_last_ref, states_ref, h_sc, y_sc = refs
  s = pl.program_id(2)
  cd = h_sc.dtype

  @pl.when(s == 0)
  def _init():
    h_sc[...] = h0_ref[...].astype(cd)

  states_ref[...] = h_sc[...].astype(states_ref.dtype)
  a_NE = a_ref[...].astype(cd)
  bias_1E = bias_ref[...].astype(cd)
  d_1E = d_ref[...].astype(cd)
  block = y_ref.shape[0]

  def strip(k, h_NE):
    tokens = pl.ds(pl.multiple_of(k * rows, rows), rows)
    x_RE = x_ref[tokens, :].astype(cd)
    delta_RE = dt_ref[tokens, :].astype(cd) + bias_1E
    if st.delta_softplus:
      delta_RE = _softplus(delta_RE)
    if st.length % block:  # padding tokens past T leave the state alone (Δ = 0)
      t_R1 = s * block + k * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
      delta_RE = jnp.where(t_R1 < st.length, delta_RE, 0.0)
    u_RE = delta_RE * x_RE
    b_NR = b_ref[k].astype(cd)
    c_NR = c_ref[k].astype(cd)
    keep_1R = keep_ref[k] if has_reset else None
    for j in range(rows):
      decay_NE = jnp.exp(a_NE * delta_RE[j:j + 1, :])
      if keep_1R is not None:
        decay_NE = decay_NE * keep_1R[:, j:j + 1].astype(cd)
      h_NE = decay_NE * h_NE + b_NR[:, j:j + 1] * u_RE[j:j + 1, :]
      y_sc[j:j + 1, :] = jnp.sum(h_NE * c_NR[:, j:j + 1], axis=0, keepdims=True)
    y_RE = y_sc[...] + d_1E * x_RE
    if has_z:
      z_RE = z_ref[tokens, :].astype(cd)
      y_RE = y_RE * (z_RE / (1.0 + jnp.exp(-z_RE)))
    y_ref[tokens, :] = y_RE.astype(y_ref.dtype)
    return h_NE

  # int32 bounds keep the loop index int32 under jax_enable_x64 too.
  h_NE = lax.fori_loop(jnp.int32(0), jnp.int32(block // rows), strip, h_sc[...])
  h_sc[...] = h_NE

  @pl.when(s == pl.num_programs(2) - 1)
  def _finish():
    h_last_ref[...] = h_NE.astype(h_last_ref.dtype)


def _strips(v_BTN, t_p: int, rows: int, value=0):
  """[B, T, N] -> [B, T_p / rows, N, rows] (padded with ``value``): per strip, one column per
  token."""
  v = padded(v_BTN, 1, t_p, value)
  b, _, n = v.shape
  return v.reshape(b, t_p // rows, rows, n).swapaxes(2, 3)


def forward(st, x, dt, A, B, C, D, z, dt_bias, h0, reset):
  """(y [B, T, E], h_last [B, E, N], states entering each chunk [T_p / chunk, B, E, N])."""
  batch, length, channels = x.shape
  state = A.shape[1]
  rows = sublanes(x, dt, z)
  block = st.chunk
  t_p = round_up(length, block)
  e_blk, e_p = _channel_blocks(channels)
  n_seq = t_p // block
  cd = st.dtype

  def seq(v):
    return padded(padded(v, 1, t_p), 2, e_p)

  def per_channel(v):
    v = jnp.zeros((channels,), cd) if v is None else v
    return padded(v.reshape(1, channels), 1, e_p)

  a_NE = padded(A.T, 1, e_p)
  h0_BNE = padded(h0.swapaxes(1, 2), 2, e_p)
  args = [seq(x), seq(dt), per_channel(dt_bias), a_NE, per_channel(D), _strips(B, t_p, rows),
          _strips(C, t_p, rows), h0_BNE]
  seq_spec = pl.BlockSpec((None, block, e_blk), lambda b, e, s: (b, s, e))
  channel_spec = pl.BlockSpec((1, e_blk), lambda b, e, s: (0, e))
  strip_spec = pl.BlockSpec((None, block // rows, state, rows), lambda b, e, s: (b, s, 0, 0))
  state_spec = pl.BlockSpec((None, state, e_blk), lambda b, e, s: (b, 0, e))
  a_spec = pl.BlockSpec((state, e_blk), lambda b, e, s: (0, e))
  in_specs = [seq_spec, seq_spec, channel_spec, a_spec, channel_spec, strip_spec, strip_spec,
              state_spec]
  if z is not None:
    args.append(seq(z))
    in_specs.append(seq_spec)
  if reset is not None:
    keep = (~reset).astype(jnp.float32)[..., None]
    args.append(_strips(keep, t_p, rows, value=1.0))
    in_specs.append(pl.BlockSpec((None, block // rows, 1, rows), lambda b, e, s: (b, s, 0, 0)))
  out_shape = [jax.ShapeDtypeStruct((batch, t_p, e_p), x.dtype),
               jax.ShapeDtypeStruct((batch, state, e_p), cd),
               jax.ShapeDtypeStruct((n_seq, batch, state, e_p), cd)]
  out_specs = [seq_spec, state_spec,
               pl.BlockSpec((None, None, state, e_blk), lambda b, e, s: (s, b, 0, e))]
  kernel = functools.partial(_kernel, st=st, rows=rows, has_z=z is not None,
                             has_reset=reset is not None)
  y, h_last, states = pl.pallas_call(
      kernel, grid=(batch, e_p // e_blk, n_seq), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((state, e_blk), cd), pltpu.VMEM((rows, e_blk), cd)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name="lsm_selective_scan_fwd",
  )(*args)
  return (y[:, :length, :channels], h_last[..., :channels].swapaxes(1, 2),
          states[..., :channels].swapaxes(2, 3))

