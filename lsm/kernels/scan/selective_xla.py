"""The selective scan (Mamba-1) in plain XLA: the sequential reference and the chunked path.

The chunked path runs a `lax.scan` over chunks of L tokens. Inside a chunk the L states come from
an associative scan of the (decay, input) pairs, so a chunk costs O(log L) dependent steps and
decay products are built by multiplying factors in (0, 1] (nothing is ever divided). The chunk
body is rematerialised in the backward pass (`jax.checkpoint`): only the [B, E, N] state entering
each chunk is kept, never the [B, T, E, N] states of the whole sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def deltas(dt, dt_bias, delta_softplus: bool, dtype):
  """Δ = softplus(dt + dt_bias) (or without the softplus) in ``dtype``."""
  delta = dt.astype(dtype)
  if dt_bias is not None:
    delta = delta + dt_bias.astype(dtype)
  return jax.nn.softplus(delta) if delta_softplus else delta


def gated(y_BTE, x_BTE, D_E, z_BTE):
  """``(y + D x) * silu(z)`` in y's dtype (D and z optional)."""
  if D_E is not None:
    y_BTE = y_BTE + D_E.astype(y_BTE.dtype) * x_BTE.astype(y_BTE.dtype)
  if z_BTE is not None:
    y_BTE = y_BTE * jax.nn.silu(z_BTE.astype(y_BTE.dtype))
  return y_BTE


def initial_state(h0, batch: int, channels: int, state: int, dtype):
  if h0 is None:
    return jnp.zeros((batch, channels, state), dtype)
  return h0.astype(dtype)


def selective_scan_reference(x, dt, A, B, C, D, z, dt_bias, h0, reset, *, delta_softplus: bool,
                             dtype):
  """The definition: one `lax.scan` step per token, state in ``dtype``."""
  batch, _, channels = x.shape
  delta_BTE = deltas(dt, dt_bias, delta_softplus, dtype)
  x_BTE = x.astype(dtype)
  A_EN = A.astype(dtype)
  h = initial_state(h0, batch, channels, A.shape[1], dtype)
  reset_BT = jnp.zeros(x.shape[:2], jnp.bool_) if reset is None else reset

  def step(h_BEN, inputs):
    x_BE, delta_BE, b_BN, c_BN, reset_B = inputs
    h_BEN = jnp.where(reset_B[:, None, None], 0.0, h_BEN)
    h_BEN = (jnp.exp(delta_BE[..., None] * A_EN) * h_BEN
             + (delta_BE * x_BE)[..., None] * b_BN[:, None, :])
    return h_BEN, jnp.einsum("ben,bn->be", h_BEN, c_BN, precision=_HIGHEST)

  time_major = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731
  inputs = (x_BTE, delta_BTE, B.astype(dtype), C.astype(dtype), reset_BT)
  h_last, y_TBE = lax.scan(step, h, tuple(time_major(v) for v in inputs))
  y_BTE = gated(time_major(y_TBE), x_BTE, D, z)
  return y_BTE.astype(x.dtype), h_last


def chunk_scan(h_BEN, x_BLE, delta_BLE, A_EN, B_BLN, C_BLN, reset_BL):
  """One chunk from its entering state: (C_t . h_t [B, L, E], state after the chunk [B, E, N]).

  Everything is in the dtype of ``h_BEN``; ``reset_BL`` may be None."""
  dtype = h_BEN.dtype
  delta_BLE = delta_BLE.astype(dtype)
  decay_BLEN = jnp.exp(delta_BLE[..., None] * A_EN.astype(dtype))
  if reset_BL is not None:
    decay_BLEN = jnp.where(reset_BL[:, :, None, None], 0.0, decay_BLEN)
  u_BLEN = (delta_BLE * x_BLE.astype(dtype))[..., None] * B_BLN.astype(dtype)[:, :, None, :]
  u_BLEN = u_BLEN.at[:, 0].add(decay_BLEN[:, 0] * h_BEN)

  def combine(earlier, later):
    a1, u1 = earlier
    a2, u2 = later
    return a1 * a2, a2 * u1 + u2

  _, h_BLEN = lax.associative_scan(combine, (decay_BLEN, u_BLEN), axis=1)
  y_BLE = jnp.einsum("blen,bln->ble", h_BLEN, C_BLN.astype(dtype), precision=_HIGHEST)
  return y_BLE, h_BLEN[:, -1]


def chunk_outputs(h_BEN, x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, D_E, z_BLE, dt_bias_E, reset_BL, *,
                  done, delta_softplus: bool):
  """One chunk of the whole op from its entering state: (y [B, L, E] in x's dtype, state after
  the chunk). The first ``done`` tokens were scanned by the chunk before (see `window`): they
  get Δ = 0 and no reset, so they leave the state alone (their y is garbage). The chunked path
  and the backward pass of the Pallas kernels run this."""
  dtype = h_BEN.dtype
  delta_BLE = deltas(dt_BLE, dt_bias_E, delta_softplus, dtype)
  fresh_L = jnp.arange(x_BLE.shape[1]) >= done
  delta_BLE = jnp.where(fresh_L[None, :, None], delta_BLE, 0.0)
  if reset_BL is not None:
    reset_BL = reset_BL & fresh_L[None, :]
  y_BLE, h_BEN = chunk_scan(h_BEN, x_BLE, delta_BLE, A_EN, B_BLN, C_BLN, reset_BL)
  return gated(y_BLE, x_BLE, D_E, z_BLE).astype(x_BLE.dtype), h_BEN


def window(index, length: int, chunk: int):
  """(start, done) of chunk ``index``: its ``chunk`` tokens start at ``index * chunk``, except
  that the last chunk of a T that ``chunk`` does not divide ends at T, so its first ``done``
  tokens belong to the chunk before. Every chunk then has one shape (one compiled body) and
  nothing is padded."""
  start = jnp.minimum(index * chunk, length - chunk)
  return start, index * chunk - start


def take(v, start, size: int):
  """Tokens [start, start + size) of a [B, T, ...] array (None stays None)."""
  return None if v is None else lax.dynamic_slice_in_dim(v, start, size, 1)


def unchunk(v_nBL, length: int):
  """Per-chunk [n, B, L, ...] (chunks placed by `window`) -> [B, length, ...]."""
  n, batch, chunk = v_nBL.shape[:3]
  if n * chunk == length:
    return jnp.moveaxis(v_nBL, 0, 1).reshape(batch, length, *v_nBL.shape[3:])
  head = jnp.moveaxis(v_nBL[:n - 1], 0, 1).reshape(batch, (n - 1) * chunk, *v_nBL.shape[3:])
  last = v_nBL[n - 1][:, n * chunk - length:]
  return jnp.concatenate([head, last], axis=1)


def selective_scan_chunked(x, dt, A, B, C, D, z, dt_bias, h0, reset, *, delta_softplus: bool,
                           chunk_size: int, dtype):
  """`lax.scan` over chunks of ``chunk_size`` tokens, each rematerialised in the backward pass.

  Every chunk slices its tokens out of the full-length inputs inside the rematerialised body,
  so the residuals of a chunk are its entering state and its index, and nothing is padded or
  copied into chunk-major order."""
  batch, length, channels = x.shape
  chunk = min(chunk_size, length)
  h = initial_state(h0, batch, channels, A.shape[1], dtype)

  @jax.checkpoint
  def body(h_BEN, index):
    start, done = window(index, length, chunk)
    x_c, dt_c, B_c, C_c, z_c, reset_c = (take(v, start, chunk) for v in (x, dt, B, C, z, reset))
    y_BLE, h_BEN = chunk_outputs(h_BEN, x_c, dt_c, A, B_c, C_c, D, z_c, dt_bias, reset_c,
                                 done=done, delta_softplus=delta_softplus)
    return h_BEN, y_BLE

  h, y_nBLE = lax.scan(body, h, jnp.arange(-(-length // chunk)))
  return unchunk(y_nBLE, length), h
