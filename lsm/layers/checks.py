"""Argument checks shared by the layers: each error names the argument, the value and what is
allowed, and is raised before anything is traced."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(owner: str, name: str, value, *, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    allowed = "a positive int" + (" or None" if allow_none else "")
    raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
  return int(value)


def positive_float(owner: str, name: str, value, *, allow_none: bool = False) -> float | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not (math.isfinite(value) and value > 0)):
    allowed = "a positive finite number" + (" or None" if allow_none else "")
    raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
  return float(value)


def float_dtype(owner: str, name: str, value) -> jnp.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{owner}: {name} must be a floating dtype such as jnp.float32 or "
                    f"jnp.bfloat16, got {value!r}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{owner}: {name} must be a floating dtype such as jnp.float32 or "
                    f"jnp.bfloat16, got {dtype}")
  return dtype


def float_array(owner: str, name: str, x, *, rank: int | None, last_dim: int | None = None):
  """A floating array of the given rank (None: any rank >= 1) and last dimension."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{owner}: {name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{owner}: {name} must have a floating dtype, got {x.dtype}")
  rank_ok = x.ndim >= 1 if rank is None else x.ndim == rank
  if not rank_ok or (last_dim is not None and x.shape[-1] != last_dim):
    last = "..." if last_dim is None else str(last_dim)
    dims = "..., " + last if rank is None else ", ".join(["..."] * (rank - 1) + [last])
    raise ValueError(f"{owner}: {name} must have shape [{dims}], got shape {tuple(x.shape)}")
  return x


def token_array(owner: str, name: str, x, batch: int, length: int):
  """Positions or segment ids given as [T] or [B, T] integers -> [B, T] int32 (None stays None).

  Host (numpy) arrays stay numpy, so the attention op still sees them as known at trace time.
  """
  if x is None:
    return None
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{owner}: {name} must have an integer dtype, got {x.dtype}")
  if x.shape not in ((length,), (batch, length)):
    raise ValueError(f"{owner}: {name} must have shape [{length}] or [{batch}, {length}] to "
                     f"match the input, got {tuple(x.shape)}")
  return xp.broadcast_to(x.astype(np.int32), (batch, length))
