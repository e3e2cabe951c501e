"""`linear_scan`: the elementwise recurrence h_t = a_t * h_{t-1} + b_t over time.

The fast paths work on [B, T, C] (trailing dims flattened) with resets folded into ``a`` (a reset
at t zeroes what enters step t, which is what ``a_t = 0`` does). "xla_chunked" and the Pallas
kernels share one `custom_vjp`: the backward of a linear scan is the linear scan of the output
cotangents in the other direction with ``a`` shifted by one step, so every forward is its own
backward and only ``a``, ``h`` and ``h0`` are kept for it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lsm.kernels.scan import common

OP = "linear_scan"
IMPLEMENTATIONS = ("reference", "xla_chunked", "xla_associative", "pallas_tpu", "pallas_gpu")
KERNEL_PLATFORMS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def linear_scan(a, b, h0=None, *, reset=None, reverse: bool = False,
                implementation: str | None = None, chunk_size: int = 64, interpret=None):
  """h_t = a_t * h_{t-1} + b_t elementwise, with h_{-1} = h0.

  Args:
    a, b: [B, T, *C] floating or complex arrays of one shape.
    h0: [B, *C] initial state (None: zeros). Complex only when ``a`` or ``b`` is.
    reset: None or bool [B, T]; True at t drops the state entering step t (h_t = b_t).
    reverse: scan from t = T - 1 down to 0 (h_t = a_t * h_{t+1} + b_t); ``h_last`` is then h_0.
      A reset then drops the state coming from t + 1: it marks a document's last token.
    implementation: one of `IMPLEMENTATIONS`, or None: the Pallas kernel of the backend, else
      "xla_chunked". The kernels take real float32 / bfloat16 / float16 inputs and run in
      interpret mode on CPU.
    chunk_size: time steps per chunk ("xla_chunked"), per chunk rounded up to a power of two
      ("pallas_gpu"), per sequence block rounded up to whole sublane tiles ("pallas_tpu").
    interpret: force Pallas interpret mode on or off (None: on exactly when the backend is CPU).

  Returns:
    h [B, T, *C] in the result dtype of ``a`` and ``b`` (complex if the state is), and
    h_last [B, *C] in the state dtype (`common.state_dtype`).
  """
  implementation, chunk_size, interpret = _checked(a, b, h0, reset, reverse, implementation,
                                                   chunk_size, interpret)
  state = common.state_dtype(a, b, h0)
  out_dtype = jnp.result_type(a.dtype, b.dtype)
  if jnp.issubdtype(state, jnp.complexfloating):
    out_dtype = jnp.promote_types(out_dtype, jnp.complex64)
  batch, _, *channels = a.shape
  h0 = jnp.zeros((batch, *channels), state) if h0 is None else h0.astype(state)
  if implementation == "reference":
    h, h_last = linear_scan_reference(a, b, h0, reset=reset, reverse=reverse)
    return h.astype(out_dtype), h_last

  if implementation in KERNEL_PLATFORMS:
    # The kernels load a and b in their own (narrow) dtype and carry the state in float32.
    a, b = a.astype(out_dtype), b.astype(out_dtype)
    forward = _Forward(implementation, chunk_size, interpret)
  else:
    a, b = a.astype(state), b.astype(state)
    forward = _Forward(implementation, chunk_size, False)
  a_BTC, b_BTC = a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1)
  if reset is not None:
    a_BTC = jnp.where(reset[:, :, None], jnp.zeros((), a_BTC.dtype), a_BTC)
  h0_BC = h0.reshape(batch, -1)
  if implementation == "xla_associative":
    h_BTC, h_last_BC = _associative(a_BTC, b_BTC, h0_BC, reverse)
  else:
    h_BTC, h_last_BC = _scan_with_vjp(forward, a_BTC, b_BTC, h0_BC, reverse)
  return h_BTC.reshape(a.shape).astype(out_dtype), h_last_BC.reshape(h0.shape)


def linear_scan_reference(a, b, h0=None, *, reset=None, reverse: bool = False):
  """The definition: a sequential `lax.scan` over time in the state dtype (float64 for float64
  inputs). Returns h and h_last, both in the state dtype."""
  state = common.state_dtype(a, b, h0)
  batch, length, *channels = a.shape
  h0 = jnp.zeros((batch, *channels), state) if h0 is None else h0.astype(state)
  if reset is None:
    reset = jnp.zeros((batch, length), jnp.bool_)
  if reverse:
    a, b, reset = (jnp.flip(x, axis=1) for x in (a, b, reset))
  reset = reset.reshape(batch, length, *(1 for _ in channels))

  def step(h_prev, inputs):
    a_t, b_t, reset_t = inputs
    h = a_t.astype(state) * jnp.where(reset_t, jnp.zeros((), state), h_prev) + b_t.astype(state)
    return h, h

  h_last, h_TB = lax.scan(step, h0, tuple(jnp.moveaxis(x, 1, 0) for x in (a, b, reset)))
  h = jnp.moveaxis(h_TB, 0, 1)
  return (jnp.flip(h, axis=1) if reverse else h), h_last


# ------------------------------------------------------------------------------- checks


def _checked(a, b, h0, reset, reverse, implementation, chunk_size, interpret):
  common.check_array(OP, "a", a, complex_ok=True)
  if a.ndim < 2:
    raise ValueError(f"{OP}: a must have shape [B, T, *C], got {tuple(a.shape)}")
  common.check_array(OP, "b", b, shape=a.shape, complex_ok=True)
  batch, length, *channels = a.shape
  if length < 1:
    raise ValueError(f"{OP}: a and b must have at least one time step, got shape "
                     f"{tuple(a.shape)}")
  common.check_array(OP, "h0", h0, shape=(batch, *channels), complex_ok=True, allow_none=True)
  real_inputs = not any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in (a, b))
  if h0 is not None and real_inputs and jnp.issubdtype(h0.dtype, jnp.complexfloating):
    raise TypeError(f"{OP}: h0 may be complex only when a or b is, got h0 {h0.dtype} with "
                    f"a {a.dtype} and b {b.dtype}")
  common.check_reset(OP, reset, batch, length)
  if not isinstance(reverse, bool):
    raise TypeError(f"{OP}: reverse must be a bool, got {reverse!r}")
  chunk_size = common.check_positive_int(OP, "chunk_size", chunk_size)
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f"{OP}: interpret must be None or a bool, got {interpret!r}")
  if implementation is None:
    implementation = common.default_implementation(OP, KERNEL_PLATFORMS, "xla_chunked")
  common.check_choice(OP, "implementation", implementation, IMPLEMENTATIONS + (None,))
  if implementation in KERNEL_PLATFORMS:
    for name, x in (("a", a), ("b", b), ("h0", h0)):
      if x is not None and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{OP}: implementation={implementation!r} takes real float32, bfloat16 "
                        f"or float16 inputs, got {name} of dtype {x.dtype}; use 'xla_chunked' "
                        f"for complex or float64 scans")
    here, kernel_platform = common.platform(), KERNEL_PLATFORMS[implementation]
    if here not in ("cpu", kernel_platform):
      raise ValueError(f"{OP}: implementation={implementation!r} runs on {kernel_platform} (or "
                       f"interpreted on cpu), but the default backend is {here!r}")
    interpret = common.interpret_default(OP, implementation, interpret)
  return implementation, chunk_size, interpret


# ------------------------------------------------------------------------------ XLA paths


def _combine(earlier, later):
  """Composition of two steps h -> a h + b (``earlier`` applied first)."""
  a_1, b_1 = earlier
  a_2, b_2 = later
  return a_2 * a_1, a_2 * b_1 + b_2


def _associative(a_BTC, b_BTC, h0_BC, reverse: bool):
  """`lax.associative_scan` over the whole sequence, h0 folded into the first b."""
  if reverse:
    a_BTC, b_BTC = jnp.flip(a_BTC, axis=1), jnp.flip(b_BTC, axis=1)
  b_BTC = b_BTC.at[:, 0].add(a_BTC[:, 0] * h0_BC)
  _, h_BTC = lax.associative_scan(_combine, (a_BTC, b_BTC), axis=1)
  h_last = h_BTC[:, -1]
  return (jnp.flip(h_BTC, axis=1) if reverse else h_BTC), h_last


def _chunked(a_BTC, b_BTC, h0_BC, reverse: bool, chunk_size: int):
  """Chunks of ``chunk_size`` steps: within every chunk at once, the cumulative products of a and
  the zero-start scan (exact products, so a == 0 and complex a need no care); across chunks, a
  scan of T / chunk_size chunk-end states; then h = h_local + (prod a) * h_chunk_start."""
  if reverse:
    a_BTC, b_BTC = jnp.flip(a_BTC, axis=1), jnp.flip(b_BTC, axis=1)
  batch, length, channels = a_BTC.shape
  chunk = min(chunk_size, length)
  chunks = -(-length // chunk)
  pad = ((0, 0), (0, chunks * chunk - length), (0, 0))
  # Padding steps (a = 1, b = 0) keep the state, so the last chunk's end state is h_last.
  a_BNLC = jnp.pad(a_BTC, pad, constant_values=1).reshape(batch, chunks, chunk, channels)
  b_BNLC = jnp.pad(b_BTC, pad).reshape(batch, chunks, chunk, channels)
  prod_BNLC, local_BNLC = lax.associative_scan(_combine, (a_BNLC, b_BNLC), axis=2)

  def across(h_start, ends):
    prod_end, local_end = ends
    return prod_end * h_start + local_end, h_start

  ends = (jnp.moveaxis(prod_BNLC[:, :, -1], 1, 0), jnp.moveaxis(local_BNLC[:, :, -1], 1, 0))
  h_last, start_NBC = lax.scan(across, h0_BC, ends)
  h_BNLC = local_BNLC + prod_BNLC * jnp.moveaxis(start_NBC, 0, 1)[:, :, None]
  h_BTC = h_BNLC.reshape(batch, chunks * chunk, channels)[:, :length]
  return (jnp.flip(h_BTC, axis=1) if reverse else h_BTC), h_last


# ------------------------------------------------------------------- shared custom_vjp


@dataclasses.dataclass(frozen=True)
class _Forward:
  """One forward scan ``(a, b, h0, reverse) -> (h, h_last)`` on [B, T, C] (a and b of one dtype),
  h in the state dtype; hashable, so it can be a static argument of the `custom_vjp`."""
  implementation: str
  chunk_size: int
  interpret: bool

  def __call__(self, a_BTC, b_BTC, h0_BC, reverse: bool):
    if self.implementation == "xla_chunked":
      return _chunked(a_BTC, b_BTC, h0_BC, reverse, self.chunk_size)
    if self.implementation == "pallas_tpu":
      from lsm.kernels.scan import linear_pallas_tpu as kernel
    else:
      from lsm.kernels.scan import linear_pallas_gpu as kernel
    return kernel.linear_scan_kernel(a_BTC, b_BTC, h0_BC, reverse=reverse,
                                     chunk_size=self.chunk_size, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _scan_with_vjp(forward: _Forward, a_BTC, b_BTC, h0_BC, reverse: bool):
  return forward(a_BTC, b_BTC, h0_BC, reverse)


def _scan_fwd(forward, a_BTC, b_BTC, h0_BC, reverse):
  h_BTC, h_last = forward(a_BTC, b_BTC, h0_BC, reverse)
  return (h_BTC, h_last), (a_BTC, h_BTC, h0_BC)


def _scan_bwd(forward, reverse, residuals, cotangents):
  """g_t = dh_t + a_{t+1} g_{t+1} (a step later in scan order), started from d h_last; then
  db = g, da_t = g_t h_{t-1}, dh0 = a_first g_first. JAX's complex convention is the plain
  transpose (no conjugates), which is what these products are."""
  a_BTC, h_BTC, h0_BC = residuals
  dh_BTC, dh_last = cotangents
  one = jnp.ones_like(a_BTC[:, :1])
  if reverse:
    a_next = jnp.concatenate([one, a_BTC[:, :-1]], axis=1)
    h_prev = jnp.concatenate([h_BTC[:, 1:], h0_BC[:, None].astype(h_BTC.dtype)], axis=1)
    a_first = a_BTC[:, -1]
  else:
    a_next = jnp.concatenate([a_BTC[:, 1:], one], axis=1)
    h_prev = jnp.concatenate([h0_BC[:, None].astype(h_BTC.dtype), h_BTC[:, :-1]], axis=1)
    a_first = a_BTC[:, 0]
  g_BTC, g_first = forward(a_next, dh_BTC, dh_last, not reverse)
  da = (g_BTC * h_prev).astype(a_BTC.dtype)
  dh0 = (a_first.astype(g_first.dtype) * g_first).astype(h0_BC.dtype)
  return da, g_BTC.astype(a_BTC.dtype), dh0


_scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)
