"""Pallas GPU forward kernel of the selective scan.

Grid (batch, channel block). Each program carries the [N, E_blk] float32 state of its channels in
registers (a `fori_loop` carry) over the chunks of the sequence, and over the tokens inside a
chunk; at every chunk start it writes the state out for the backward pass. A token is one load of
x, Δ, z rows [E_blk] and B, C columns [N], an elementwise update and a reduction over N. Block
sizes are powers of two (channels and the state are zero-padded); jax <= 0.11 lowers the body
through Triton (`compiler_params` below are Triton's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lsm.kernels.attention.pallas_common import padded, round_up

MAX_CHANNEL_BLOCK = 128


def _pow2(x: int) -> int:
  return pl.next_power_of_2(x)


def _compiler_params():
  from jax.experimental.pallas import triton as pl_triton  # only needed when compiling
  return pl_triton.CompilerParams(num_warps=4, num_stages=1)


def _kernel(x_ref, dt_ref, bias_ref, a_ref, d_ref, b_ref, c_ref, h0_ref, *refs, st,
            has_z: bool, has_reset: bool):
  refs = list(refs)
  z_ref = refs.pop(0) if has_z else None
  keep_ref = refs.pop(0) if has_reset else None
  y_ref, h_last_ref, states_ref = refs
  cd = st.dtype
  a_NE = a_ref[...].astype(cd)
  bias_E = bias_ref[...].astype(cd)
  d_E = d_ref[...].astype(cd)

  def token(t, h_NE):
    x_E = x_ref[t, :].astype(cd)
    delta_E = dt_ref[t, :].astype(cd) + bias_E
    if st.delta_softplus:
      delta_E = jnp.maximum(delta_E, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(delta_E)))
    decay_NE = jnp.exp(a_NE * delta_E[None, :])
    if keep_ref is not None:
      decay_NE = decay_NE * keep_ref[t].astype(cd)
    h_NE = decay_NE * h_NE + b_ref[t, :].astype(cd)[:, None] * (delta_E * x_E)[None, :]
    y_E = jnp.sum(h_NE * c_ref[t, :].astype(cd)[:, None], axis=0) + d_E * x_E
    if z_ref is not None:
      z_E = z_ref[t, :].astype(cd)
      y_E = y_E * (z_E / (1.0 + jnp.exp(-z_E)))
    y_ref[t, :] = y_E.astype(y_ref.dtype)
    return h_NE

  def chunk(c, h_NE):
    states_ref[c] = h_NE.astype(states_ref.dtype)
    start = c * st.chunk
    return lax.fori_loop(start, jnp.minimum(start + st.chunk, st.length), token, h_NE)

  n_chunks = -(-st.length // st.chunk)
  # int32 bounds keep the loop indices int32 under jax_enable_x64 too.
  h_NE = lax.fori_loop(jnp.int32(0), jnp.int32(n_chunks), chunk, h0_ref[...].astype(cd))
  h_last_ref[...] = h_NE.astype(h_last_ref.dtype)


def forward(st, x, dt, A, B, C, D, z, dt_bias, h0, reset):
  """(y [B, T, E], h_last [B, E, N], states entering each chunk [ceil(T / chunk), B, E, N])."""
  batch, length, channels = x.shape
  state = A.shape[1]
  n_p = _pow2(state)
  e_blk = min(_pow2(channels), MAX_CHANNEL_BLOCK)
  e_p = round_up(channels, e_blk)
  n_chunks = -(-length // st.chunk)
  cd = st.dtype

  def per_channel(v):
    v = jnp.zeros((channels,), cd) if v is None else v
    return padded(v, 0, e_p)

  args = [padded(x, 2, e_p), padded(dt, 2, e_p), per_channel(dt_bias),
          padded(padded(A.T, 0, n_p), 1, e_p), per_channel(D), padded(B, 2, n_p),
          padded(C, 2, n_p), padded(padded(h0.swapaxes(1, 2), 1, n_p), 2, e_p)]
  seq_spec = pl.BlockSpec((None, length, e_blk), lambda b, e: (b, 0, e))
  channel_spec = pl.BlockSpec((e_blk,), lambda b, e: (e,))
  proj_spec = pl.BlockSpec((None, length, n_p), lambda b, e: (b, 0, 0))
  state_spec = pl.BlockSpec((None, n_p, e_blk), lambda b, e: (b, 0, e))
  in_specs = [seq_spec, seq_spec, channel_spec, pl.BlockSpec((n_p, e_blk), lambda b, e: (0, e)),
              channel_spec, proj_spec, proj_spec, state_spec]
  if z is not None:
    args.append(padded(z, 2, e_p))
    in_specs.append(seq_spec)
  if reset is not None:
    args.append((~reset).astype(jnp.float32))
    in_specs.append(pl.BlockSpec((None, length), lambda b, e: (b, 0)))
  out_shape = [jax.ShapeDtypeStruct((batch, length, e_p), x.dtype),
               jax.ShapeDtypeStruct((batch, n_p, e_p), cd),
               jax.ShapeDtypeStruct((n_chunks, batch, n_p, e_p), cd)]
  out_specs = [seq_spec, state_spec,
               pl.BlockSpec((n_chunks, None, n_p, e_blk), lambda b, e: (0, b, 0, e))]
  kernel = functools.partial(_kernel, st=st, has_z=z is not None, has_reset=reset is not None)
  y, h_last, states = pl.pallas_call(
      kernel, grid=(batch, e_p // e_blk), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=None if st.interpret else _compiler_params(),
      interpret=st.interpret, name="lsm_selective_scan_fwd",
  )(*args)
  return (y[..., :channels], h_last[:, :state, :channels].swapaxes(1, 2),
          states[:, :, :state, :channels].swapaxes(2, 3))
