"""Pieces every recurrence op shares: argument checks, resets from segment ids, state dtypes and
the default implementation per backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lsm.kernels.attention.pallas_common import platform
from lsm.log import log_once


def check_array(op: str, name: str, x, *, ndim: int | None = None, shape=None,
                complex_ok: bool = False, allow_none: bool = False):
  """``x`` as a floating (or, with ``complex_ok``, complex) array of rank ``ndim`` / ``shape``.

  ``shape`` may hold None for "any size". Errors name the op, the argument, what was given and
  what is allowed."""
  if x is None:
    if allow_none:
      return None
    raise ValueError(f"{op}: {name} is required, got None")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
  kinds = (jnp.floating, jnp.complexfloating) if complex_ok else (jnp.floating,)
  if not any(jnp.issubdtype(x.dtype, k) for k in kinds):
    allowed = "a floating or complex dtype" if complex_ok else "a floating dtype"
    raise TypeError(f"{op}: {name} must have {allowed}, got {x.dtype}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{op}: {name} must have rank {ndim}, got shape {tuple(x.shape)}")
  if shape is not None:
    want = tuple(shape)
    if len(want) != x.ndim or any(w is not None and w != g for w, g in zip(want, x.shape)):
      shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
      raise ValueError(f"{op}: {name} must have shape {shown}, got {tuple(x.shape)}")
  return x


def check_reset(op: str, reset, batch: int, length: int):
  """``reset``: None or a [B, T] boolean array (True: token t starts a new document, so the state
  entering step t is zero)."""
  if reset is None:
    return None
  if not hasattr(reset, "shape") or not hasattr(reset, "dtype"):
    raise TypeError(f"{op}: reset must be a [B, T] boolean array or None, got "
                    f"{type(reset).__name__}")
  if reset.dtype != jnp.bool_:
    raise TypeError(f"{op}: reset must have dtype bool, got {reset.dtype}")
  if tuple(reset.shape) != (batch, length):
    raise ValueError(f"{op}: reset must have shape [{batch}, {length}], got "
                     f"{tuple(reset.shape)}")
  return reset


def check_choice(op: str, name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
  return value


def check_positive_int(op: str, name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
  return int(value)


def resets_from_segments(segment_ids):
  """[B, T] bool: True where a token's segment id differs from the previous token's (a packed
  document starts). Token 0 is never a reset: it continues whatever state came in."""
  if segment_ids is None:
    return None
  seg = jnp.asarray(segment_ids)
  if seg.ndim != 2:
    raise ValueError(f"resets_from_segments: segment_ids must be [B, T], got shape {seg.shape}")
  first = jnp.zeros_like(seg[:, :1], dtype=jnp.bool_)
  return jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)


def state_dtype(*xs):
  """The dtype recurrent state is carried in: float32 (complex64 when any input is complex),
  float64 / complex128 when any input is 64-bit (the references run there)."""
  xs = [x for x in xs if x is not None]
  wide = any(jnp.dtype(x.dtype) in (jnp.float64, jnp.complex128) for x in xs)
  complex_ = any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in xs)
  if complex_:
    return jnp.complex128 if wide else jnp.complex64
  return jnp.float64 if wide else jnp.float32


def default_implementation(op: str, kernels: dict[str, str], fallback: str) -> str:
  """``kernels`` maps implementation name -> platform it compiles for ('tpu', 'gpu'); the one for
  this backend, else ``fallback`` (logged once, with the reason)."""
  here = platform()
  for name, kernel_platform in kernels.items():
    if kernel_platform == here:
      return name
  log_once(f"{op}: backend '{here}' has no Pallas kernel; using {fallback!r}")
  return fallback


def interpret_default(op: str, implementation: str, interpret=None):
  """``interpret`` for pallas_call: the caller's choice, else on whenever the backend is CPU."""
  if interpret is not None:
    return interpret
  if platform() == "cpu":
    log_once(f"{op}: implementation={implementation!r} runs in Pallas interpret mode on CPU "
             f"(correct but slow)")
    return True
  return False


def is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)
