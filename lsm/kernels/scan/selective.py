"""`selective_scan` (Mamba-1): argument checks and the choice of implementation."""

from __future__ import annotations

import jax.numpy as jnp

from lsm.kernels.scan import common
from lsm.kernels.scan.selective_pallas import selective_scan_pallas, sublanes
from lsm.kernels.scan.selective_xla import selective_scan_chunked, selective_scan_reference

OP = "selective_scan"
IMPLEMENTATIONS = ("reference", "xla_chunked", "pallas_tpu", "pallas_gpu")
_KERNEL_PLATFORMS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, h0=None, *, reset=None,
                   delta_softplus: bool = True, chunk_size: int = 64,
                   implementation: str | None = None, interpret=None):
  """The selective state-space scan of Mamba-1, per inner channel e and state index n:

    Δ_t = softplus(dt_t + dt_bias)  (or dt_t + dt_bias without ``delta_softplus``)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,   y_t = (C_t · h_t + D x_t) * silu(z_t)

  Args:
    x, dt: [B, T, E] inputs and step sizes before the softplus.
    A: [E, N] (negative real) state matrix diagonal per channel.
    B, C: [B, T, N] input and output projections (shared by the channels).
    D: [E] skip connection; z: [B, T, E] gate; dt_bias: [E]; h0: [B, E, N] initial state.
      Each may be None (no skip, no gate, no bias, zero state).
    reset: None or bool [B, T]; True at t: the state entering token t is zero (packed documents).
    delta_softplus: apply the softplus to dt + dt_bias.
    chunk_size: tokens per chunk of the chunked paths; the backward pass of every fast path keeps
      only the states at chunk boundaries. ``pallas_tpu`` needs a multiple of 8 (16 with
      16-bit x, dt or z).
    implementation: "reference", "xla_chunked", "pallas_tpu", "pallas_gpu", or None: the Pallas
      kernel of the backend, else "xla_chunked" (logged once). A Pallas implementation asked for
      on CPU runs in interpret mode.
    interpret: force Pallas interpret mode on (True) or off (False); None: on exactly on CPU.

  Returns:
    y [B, T, E] in x's dtype and h_last [B, E, N], the state after the last token, in the state
    dtype (float32; float64 when an input is float64).
  """
  checked = _checked(x, dt, A, B, C, D, z, dt_bias, h0, reset, chunk_size, implementation,
                     interpret)
  implementation, dtype, interpret = checked
  args = (x, dt, A, B, C, D, z, dt_bias, h0, reset)
  if implementation == "reference":
    return selective_scan_reference(*args, delta_softplus=bool(delta_softplus), dtype=dtype)
  if implementation == "xla_chunked":
    return selective_scan_chunked(*args, delta_softplus=bool(delta_softplus),
                                  chunk_size=chunk_size, dtype=dtype)
  return selective_scan_pallas(
      *args, delta_softplus=bool(delta_softplus), chunk_size=chunk_size, dtype=dtype,
      kernel=implementation, interpret=interpret)


def _checked(x, dt, A, B, C, D, z, dt_bias, h0, reset, chunk_size, implementation, interpret):
  """Validates every argument; returns (implementation, state dtype, interpret)."""
  common.check_array(OP, "x", x, ndim=3)
  batch, length, channels = x.shape
  common.check_array(OP, "A", A, ndim=2)
  if A.shape[0] != channels:
    raise ValueError(f"{OP}: A must have shape [{channels}, N] (E = x.shape[2]), got "
                     f"{tuple(A.shape)}")
  state = A.shape[1]
  seq_e, seq_n, per_e = (batch, length, channels), (batch, length, state), (channels,)
  common.check_array(OP, "dt", dt, shape=seq_e)
  common.check_array(OP, "B", B, shape=seq_n)
  common.check_array(OP, "C", C, shape=seq_n)
  common.check_array(OP, "D", D, shape=per_e, allow_none=True)
  common.check_array(OP, "z", z, shape=seq_e, allow_none=True)
  common.check_array(OP, "dt_bias", dt_bias, shape=per_e, allow_none=True)
  common.check_array(OP, "h0", h0, shape=(batch, channels, state), allow_none=True)
  common.check_reset(OP, reset, batch, length)
  chunk_size = common.check_positive_int(OP, "chunk_size", chunk_size)
  if implementation is None:
    implementation = common.default_implementation(OP, _KERNEL_PLATFORMS, "xla_chunked")
  common.check_choice(OP, "implementation", implementation, IMPLEMENTATIONS)
  if interpret not in (None, True, False):
    raise ValueError(f"{OP}: interpret must be None, True or False, got {interpret!r}")
  dtype = common.state_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
  if implementation in _KERNEL_PLATFORMS:
    interpret = common.interpret_default(OP, implementation, interpret)
    rows = sublanes(x, dt, z)
    if implementation == "pallas_tpu" and chunk_size % rows:
      raise ValueError(f"{OP}: implementation='pallas_tpu' needs chunk_size a multiple of {rows} "
                       f"(a sublane tile of {rows} tokens for these dtypes), got {chunk_size}")
    if not interpret and jnp.dtype(dtype) != jnp.float32:
      raise TypeError(f"{OP}: compiled {implementation!r} kernels carry the state in float32; "
                      f"got inputs that need {jnp.dtype(dtype).name} (use 'reference' or "
                      f"'xla_chunked' for float64)")
  return implementation, dtype, interpret
