"""`ssd`: Mamba-2 state-space duality — argument checks, the sequential reference, dispatch.

Per batch row and head h (which reads group g = h // (H // G) of B and C):

  Δ_t = softplus(dt_t + dt_bias)   (or dt_t + dt_bias without ``delta_softplus``)
  h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T      state [P, N]
  y_t = h_t C_t + D x_t

A reset at t zeroes the state entering step t (h_{t-1}, or h0 when t == 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lsm.kernels.scan import ssd_pallas
from lsm.kernels.scan.common import (check_array, check_choice, check_positive_int, check_reset,
                                     default_implementation, interpret_default, state_dtype)
from lsm.kernels.scan.ssd_xla import HIGHEST, ssd_chunked
from lsm.log import log_once

IMPLEMENTATIONS = ("reference", "xla_chunked", "pallas_tpu", "pallas_gpu")
_KERNELS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_OP = "ssd"


def ssd(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, reset=None, delta_softplus=True,
        chunk_size=64, implementation=None, interpret=None):
  """Mamba-2 SSD scan.

  Args:
    x: [B, T, H, P] inputs per head.
    dt: [B, T, H] step sizes before ``dt_bias`` and softplus.
    A: [H] decay rate per head (negative).
    B, C: [B, T, G, N] input and output projections; ``H % G == 0``.
    D: [H] skip connection, or None.
    dt_bias: [H] added to ``dt``, or None.
    h0: [B, H, P, N] initial state, or None (zeros).
    reset: None or bool [B, T]; True at t zeroes the state entering step t.
    delta_softplus: apply softplus to ``dt + dt_bias``.
    chunk_size: steps per chunk of the chunked implementations (T need not be a multiple).
    implementation: one of IMPLEMENTATIONS, or None: the Pallas kernel of the backend when it
      can run these arguments, else "xla_chunked" (logged once, with the reason). A Pallas
      implementation asked for on CPU runs in interpret mode.
    interpret: force Pallas interpret mode on (True) or off (False); None: on for CPU.

  Returns:
    y [B, T, H, P] in x's dtype, and h_last [B, H, P, N] in the state dtype (float32, or float64
    for float64 inputs).
  """
  _check(x, dt, A, B, C, D, dt_bias, h0, reset, delta_softplus)
  chunk_size = check_positive_int(_OP, "chunk_size", chunk_size)
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f"{_OP}: interpret must be None or a bool, got {interpret!r}")
  dtype = state_dtype(x, dt, A, B, C, D, dt_bias, h0)
  if implementation is None:
    implementation = _default(x, B, C, dtype, chunk_size)
  check_choice(_OP, "implementation", implementation, IMPLEMENTATIONS)
  if implementation in _KERNELS:
    interpret = interpret_default(_OP, implementation, interpret)
    reason = _kernel_unsupported(implementation, x, B, C, dtype, chunk_size, interpret)
    if reason:
      raise ValueError(f"{_OP}: implementation={implementation!r} cannot run this call: {reason}")

  delta_BTH = dt.astype(dtype)
  if dt_bias is not None:
    delta_BTH = delta_BTH + dt_bias.astype(dtype)
  if delta_softplus:
    delta_BTH = jax.nn.softplus(delta_BTH)
  if implementation == "reference":
    y, h_last = ssd_reference(x, delta_BTH, A, B, C, D, h0, reset, dtype=dtype)
  elif implementation == "xla_chunked":
    y, h_last = ssd_chunked(x, delta_BTH, A, B, C, D, h0, reset, chunk=chunk_size, dtype=dtype)
  else:
    backend = _KERNELS[implementation]
    b, t, h, p = x.shape
    D = jnp.zeros((h,), jnp.float32) if D is None else D
    h0 = jnp.zeros((b, h, p, B.shape[3]), jnp.float32) if h0 is None else h0
    chunk = ssd_pallas.kernel_chunk(backend, chunk_size, t, interpret)
    y, h_last = ssd_pallas.ssd_pallas(x, delta_BTH, A, B, C, D, h0, reset, backend=backend,
                                      chunk=chunk, interpret=interpret)
  return y.astype(x.dtype), h_last


def _kernel_unsupported(implementation, x, B, C, dtype, chunk_size, interpret) -> str | None:
  """Why a Pallas implementation cannot run these arguments, or None."""
  if dtype != jnp.float32 or any(v.dtype not in _KERNEL_DTYPES for v in (x, B, C)):
    return ("the kernels take bfloat16, float16 or float32 inputs with a float32 state, got "
            f"x {x.dtype}, B {B.dtype}, C {C.dtype} (state {jnp.dtype(dtype).name})")
  if not interpret:
    return ssd_pallas.hardware_error(_KERNELS[implementation], chunk_size)
  return None


def _default(x, B, C, dtype, chunk_size) -> str:
  implementation = default_implementation(_OP, _KERNELS, "xla_chunked")
  if implementation in _KERNELS:
    reason = _kernel_unsupported(implementation, x, B, C, dtype, chunk_size, interpret=False)
    if reason:
      log_once(f"{_OP}: {implementation!r} cannot run this call ({reason}); using 'xla_chunked'")
      return "xla_chunked"
  return implementation


def _check(x, dt, A, B, C, D, dt_bias, h0, reset, delta_softplus):
  check_array(_OP, "x", x, ndim=4)
  b, t, h, p = x.shape
  if t < 1:
    raise ValueError(f"{_OP}: x must have at least one time step, got shape {tuple(x.shape)}")
  check_array(_OP, "dt", dt, shape=(b, t, h))
  check_array(_OP, "A", A, shape=(h,))
  check_array(_OP, "B", B, ndim=4)
  g, n = B.shape[2:]
  check_array(_OP, "B", B, shape=(b, t, g, n))
  if g < 1 or h % g:
    raise ValueError(f"{_OP}: the number of heads H={h} (x.shape[2]) must be a multiple of the "
                     f"number of groups G={g} (B.shape[2])")
  check_array(_OP, "C", C, shape=(b, t, g, n))
  check_array(_OP, "D", D, shape=(h,), allow_none=True)
  check_array(_OP, "dt_bias", dt_bias, shape=(h,), allow_none=True)
  check_array(_OP, "h0", h0, shape=(b, h, p, n), allow_none=True)
  check_reset(_OP, reset, b, t)
  if not isinstance(delta_softplus, bool):
    raise TypeError(f"{_OP}: delta_softplus must be a bool, got {delta_softplus!r}")


def ssd_reference(x_BTHP, delta_BTH, A_H, B_BTGN, C_BTGN, D_H, h0_BHPN, reset_BT, *, dtype):
  """The definition: one step per token, lax.scan over time, everything in ``dtype``."""
  b, t, h, p = x_BTHP.shape
  g, n = B_BTGN.shape[2:]
  rep = h // g
  x = x_BTHP.astype(dtype)
  B_BTHN = jnp.repeat(B_BTGN.astype(dtype), rep, axis=2)
  C_BTHN = jnp.repeat(C_BTGN.astype(dtype), rep, axis=2)
  decay_BTH = jnp.exp(delta_BTH * A_H.astype(dtype))
  keep_BT = jnp.ones((b, t), bool) if reset_BT is None else ~reset_BT
  h0 = jnp.zeros((b, h, p, n), dtype) if h0_BHPN is None else h0_BHPN.astype(dtype)

  def step(state_BHPN, inputs):
    x_BHP, delta_BH, decay_BH, B_BHN, C_BHN, keep_B = inputs
    state_BHPN = jnp.where(keep_B[:, None, None, None], state_BHPN, jnp.zeros((), dtype))
    update = (delta_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
    state_BHPN = decay_BH[..., None, None] * state_BHPN + update
    y_BHP = jnp.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN, precision=HIGHEST)
    return state_BHPN, y_BHP

  time_major = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731
  inputs = tuple(map(time_major, (x, delta_BTH, decay_BTH, B_BTHN, C_BTHN, keep_BT)))
  h_last, y_TBHP = lax.scan(step, h0, inputs)
  y = jnp.moveaxis(y_TBHP, 0, 1)
  if D_H is not None:
    y = y + D_H.astype(dtype)[:, None] * x
  return y, h_last
