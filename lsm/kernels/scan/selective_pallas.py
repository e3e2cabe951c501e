"""The Pallas selective scans behind one `jax.custom_vjp`, and their backward pass.

Each kernel module (`selective_pallas_tpu`, `selective_pallas_gpu`) computes the forward pass
with the softplus, the D skip and the SiLU(z) gate fused, and writes the state entering every
chunk of ``chunk`` tokens: [T / chunk, B, E, N], never the state of every token. The backward
pass is XLA: a reverse `lax.scan` over chunks that recomputes each chunk from its saved entering
state (`selective_xla.chunk_outputs`) and pulls the cotangents through it, carrying d/dh from one
chunk to the one before.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsm.kernels.scan import selective_pallas_gpu, selective_pallas_tpu
from lsm.kernels.scan.selective_xla import chunk_outputs, initial_state, take, unchunk, window


@dataclasses.dataclass(frozen=True)
class Static:
  """What a kernel call is specialised on (the custom_vjp's non-differentiable argument)."""

  chunk: int  # tokens between saved states; the TPU kernel's sequence block
  length: int  # T (the TPU kernel pads to a multiple of ``chunk``; padding tokens get Δ = 0)
  delta_softplus: bool
  dtype: np.dtype  # state / compute dtype
  interpret: bool


def _backward(st: Static, residuals, cotangents):
  x, dt, A, B, C, D, z, dt_bias, h0, reset, states_nBEN = residuals
  dy_BTE, dh_BEN = cotangents
  params = (A, D, dt_bias)
  # A TPU sequence block longer than T is one chunk of T tokens.
  chunk = min(st.chunk, st.length)

  def body(carry, index):
    dh_BEN, acc = carry
    start, done = window(index, st.length, chunk)
    seq = tuple(take(v, start, chunk) for v in (x, dt, B, C, z))
    reset_c = take(reset, start, chunk)

    def outputs(h_BEN, seq, params):
      x_c, dt_c, B_c, C_c, z_c = seq
      A_, D_, dt_bias_ = params
      return chunk_outputs(h_BEN, x_c, dt_c, A_, B_c, C_c, D_, z_c, dt_bias_, reset_c,
                           done=done, delta_softplus=st.delta_softplus)

    h_BEN = lax.dynamic_index_in_dim(states_nBEN, index, 0, keepdims=False)
    _, pull = jax.vjp(outputs, h_BEN, seq, params)
    # Tokens of the chunk before (the first ``done``) get no cotangent here: theirs is there.
    fresh_L = jnp.arange(chunk) >= done
    dy_c = jnp.where(fresh_L[None, :, None], take(dy_BTE, start, chunk), 0)
    dh_BEN, d_seq, d_params = pull((dy_c, dh_BEN))
    acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, d_params)
    return (dh_BEN, acc), d_seq

  # Parameter gradients are summed over chunks in (at least) float32.
  acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                     params)
  carry = (dh_BEN.astype(st.dtype), acc)
  n_chunks = states_nBEN.shape[0]
  (dh_BEN, acc), d_seq_n = lax.scan(body, carry, jnp.arange(n_chunks), reverse=True)
  dx, ddt, dB, dC, dz = (None if d is None else unchunk(d, st.length) for d in d_seq_n)
  dA, dD, d_bias = (None if a is None else a.astype(p.dtype) for a, p in zip(acc, params))
  return dx, ddt, dA, dB, dC, dD, dz, d_bias, dh_BEN.astype(h0.dtype), None


def _make_op(forward):
  """``forward(st, x, dt, A, B, C, D, z, dt_bias, h0, reset) -> (y, h_last, states)`` as a
  differentiable ``(y, h_last)``."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def op(st, *args):
    y, h_last, _ = forward(st, *args)
    return y, h_last

  def op_forward(st, *args):
    y, h_last, states = forward(st, *args)
    return (y, h_last), (*args, states)

  op.defvjp(op_forward, _backward)
  return op


_OPS = {"pallas_tpu": _make_op(selective_pallas_tpu.forward),
        "pallas_gpu": _make_op(selective_pallas_gpu.forward)}


def sublanes(*xs) -> int:
  """Rows per pallas_tpu load (the sequence block must be a multiple of it)."""
  return selective_pallas_tpu.sublanes(*xs)


def selective_scan_pallas(x, dt, A, B, C, D, z, dt_bias, h0, reset, *, delta_softplus: bool,
                          chunk_size: int, dtype, kernel: str, interpret: bool):
  """The ``kernel`` implementation ("pallas_tpu" or "pallas_gpu") on checked arguments."""
  batch, length, channels = x.shape
  chunk = min(chunk_size, length)
  if kernel == "pallas_tpu":  # the sequence block: whole strips of sublanes
    rows = sublanes(x, dt, z)
    chunk = -(-chunk // rows) * rows
  st = Static(chunk=chunk, length=length, delta_softplus=delta_softplus,
              dtype=jnp.dtype(dtype), interpret=interpret)
  h0 = initial_state(h0, batch, channels, A.shape[1], dtype)
  return _OPS[kernel](st, x, dt, A, B, C, D, z, dt_bias, h0, reset)
