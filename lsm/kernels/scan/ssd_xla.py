"""The chunked SSD algorithm in XLA, and the per-chunk decay terms the Pallas kernels share.

The sequence is cut into chunks of Q steps. With ``s`` the within-chunk cumulative sum of Δ·A
(non-increasing, A < 0) and ``r`` the within-chunk count of resets so far, step u reaches step
t >= u of the same chunk with weight ``exp(s_t - s_u)`` when no reset lies in (u, t], i.e. when
``r_t == r_u``. So per chunk:

  intra-chunk output   y_t  = sum_u (C_t . B_u) L[t, u] Δ_u x_u         (a masked matmul)
  chunk state          S    = sum_u exp(s_end - s_u) [r_u == r_end] Δ_u x_u B_u^T
  state passing        H_{c+1} = exp(s_end) [no reset in chunk c] H_c + S_c,  H_0 = h0
  output correction    y_t += exp(s_t) [r_t == 0] H_c C_t

Every exponent is <= 0 (masked entries are -inf before the exp), so nothing overflows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lsm.kernels.attention.pallas_common import padded

HIGHEST = lax.Precision.HIGHEST


def chunked(x, axis: int, chunk: int):
  """``x`` zero-padded along ``axis`` to a multiple of ``chunk`` and split into [n, chunk]."""
  t = x.shape[axis]
  n = -(-t // chunk)
  x = padded(x, axis, n * chunk)
  return x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])


def chunk_decays(delta_BTH, A_H, reset_BT, chunk: int, dtype):
  """Decay terms per chunk, heads-major: (s, r, state weights w, carry-in weights e, chunk
  decay). s, w, e: [B, H, C, Q]; r: [B, 1, C, Q] int32; decay: [B, H, C].

  Padding steps get Δ = 0 (no decay, no input), so the state after them is the true final one.
  """
  delta_BHCQ = jnp.moveaxis(chunked(delta_BTH.astype(dtype), 1, chunk), 3, 1)
  s_BHCQ = jnp.cumsum(delta_BHCQ * A_H.astype(dtype)[None, :, None, None], axis=-1)
  if reset_BT is None:
    r_B1CQ = jnp.zeros((delta_BHCQ.shape[0], 1, *delta_BHCQ.shape[2:]), jnp.int32)
  else:
    r_B1CQ = jnp.cumsum(chunked(reset_BT.astype(jnp.int32), 1, chunk), axis=-1)[:, None]
  s_end, r_end = s_BHCQ[..., -1:], r_B1CQ[..., -1:]
  zero = jnp.zeros((), dtype)
  w_BHCQ = jnp.where(r_B1CQ == r_end, jnp.exp(s_end - s_BHCQ), zero) * delta_BHCQ
  e_BHCQ = jnp.where(r_B1CQ == 0, jnp.exp(s_BHCQ), zero)
  decay_BHC = jnp.where(r_end[..., 0] == 0, jnp.exp(s_end[..., 0]), zero)
  return delta_BHCQ, s_BHCQ, r_B1CQ, w_BHCQ, e_BHCQ, decay_BHC


def pass_states(S_BHCPN, decay_BHC, h0_BHPN):
  """(state entering each chunk [B, H, C, P, N], final state [B, H, P, N])."""

  def step(h, inputs):
    s, decay = inputs
    return decay[..., None, None] * h + s, h

  h_last, h_in = lax.scan(step, h0_BHPN,
                          (jnp.moveaxis(S_BHCPN, 2, 0), jnp.moveaxis(decay_BHC, 2, 0)))
  return jnp.moveaxis(h_in, 0, 2), h_last


def decay_matrix(s_BHCQ, r_B1CQ):
  """L [B, H, C, Q, Q]: exp(s_t - s_u) for u <= t with no reset in (u, t], else 0."""
  q = s_BHCQ.shape[-1]
  causal = jnp.arange(q)[:, None] >= jnp.arange(q)[None, :]
  ok = causal & (r_B1CQ[..., :, None] == r_B1CQ[..., None, :])
  diff = s_BHCQ[..., :, None] - s_BHCQ[..., None, :]
  return jnp.exp(jnp.where(ok, diff, -jnp.inf))


def ssd_chunked(x_BTHP, delta_BTH, A_H, B_BTGN, C_BTGN, D_H, h0_BHPN, reset_BT, *, chunk: int,
                dtype):
  """(y [B, T, H, P], h_last [B, H, P, N]) in ``dtype``; Δ already has bias and softplus."""
  b, t, h, p = x_BTHP.shape
  g, n = B_BTGN.shape[2:]
  rep = h // g
  q = min(chunk, t)
  delta, s, r, w, e, decay = chunk_decays(delta_BTH, A_H, reset_BT, q, dtype)
  nc = s.shape[2]
  # Heads-major chunks; heads split as [G, R] so each group's B and C serve R heads.
  x_BGRCQP = jnp.moveaxis(chunked(x_BTHP.astype(dtype), 1, q), 3, 1).reshape(b, g, rep, nc, q, p)
  B_BGCQN = jnp.moveaxis(chunked(B_BTGN.astype(dtype), 1, q), 3, 1)
  C_BGCQN = jnp.moveaxis(chunked(C_BTGN.astype(dtype), 1, q), 3, 1)
  heads = lambda v: v.reshape(b, g, rep, *v.shape[2:])  # noqa: E731

  L_BGRCQQ = heads(decay_matrix(s, r))
  CB_BGCQQ = jnp.einsum("bgctn,bgcun->bgctu", C_BGCQN, B_BGCQN, precision=HIGHEST)
  M = CB_BGCQQ[:, :, None] * L_BGRCQQ * heads(delta)[..., None, :]
  y = jnp.einsum("bgrctu,bgrcup->bgrctp", M, x_BGRCQP, precision=HIGHEST)

  S = jnp.einsum("bgrcu,bgcun->bgrcun", heads(w), B_BGCQN)
  S = jnp.einsum("bgrcup,bgrcun->bgrcpn", x_BGRCQP, S, precision=HIGHEST)
  h0 = jnp.zeros((b, h, p, n), dtype) if h0_BHPN is None else h0_BHPN.astype(dtype)
  h_in, h_last = pass_states(S.reshape(b, h, nc, p, n), decay, h0)
  y_off = jnp.einsum("bgctn,bgrcpn->bgrctp", C_BGCQN, heads(h_in), precision=HIGHEST)
  y = y + heads(e)[..., None] * y_off

  y_BTHP = jnp.moveaxis(y.reshape(b, h, nc * q, p), 1, 2)[:, :t]
  if D_H is not None:
    y_BTHP = y_BTHP + D_H.astype(dtype)[:, None] * x_BTHP.astype(dtype)
  return y_BTHP, h_last
