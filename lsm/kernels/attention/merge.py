"""Exact combination of attention partials computed over disjoint sets of keys."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge(partials: Sequence[tuple[jax.Array, jax.Array]], *, sinks=None):
  """Combine ``[(out[B,T,H,Dv], lse[B,H,T]), ...]`` into the attention over the union of keys.

  Each partial is ``attention(..., return_lse=True)`` over one disjoint part of the keys.
  ``sinks`` ([H] logits) joins the merged softmax once; either pass it here or to exactly one
  of the partials, never both. Rows no partial saw stay 0 with ``lse = -inf``.
  Returns ``(out, lse)`` with out in the dtype of the first partial and lse float32 (float64
  if the partials' lse are float64).
  """
  if not isinstance(partials, (list, tuple)) or not partials:
    raise ValueError(f"merge: partials must be a non-empty list of (out, lse) pairs, got "
                     f"{type(partials).__name__} of length "
                     f"{len(partials) if hasattr(partials, '__len__') else '?'}")
  out_shape = None
  for n, pair in enumerate(partials):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f"merge: partials[{n}] must be an (out, lse) pair, got {type(pair).__name__}")
    o, lse = pair
    if o.ndim != 4:
      raise ValueError(f"merge: partials[{n}] out must be [B, T, H, Dv], got shape {o.shape}")
    b, t, h, _ = o.shape
    if lse.shape != (b, h, t):
      raise ValueError(f"merge: partials[{n}] lse must have shape [B, H, T] = {(b, h, t)}, got "
                       f"{lse.shape}")
    if out_shape is not None and o.shape != out_shape:
      raise ValueError(f"merge: partials[{n}] out has shape {o.shape}, partials[0] has "
                       f"{out_shape}; all partials must have one shape")
    out_shape = o.shape
  if sinks is not None and jnp.shape(sinks) != (out_shape[2],):
    raise ValueError(f"merge: sinks must have shape [H] = ({out_shape[2]},), got "
                     f"{jnp.shape(sinks)}")

  acc = jnp.promote_types(partials[0][1].dtype, jnp.float32)
  lses = jnp.stack([lse.astype(acc) for _, lse in partials])  # [P, B, H, T]
  top = jnp.max(lses, axis=0)
  if sinks is not None:
    sinks_H1 = jnp.asarray(sinks, acc)[:, None]
    top = jnp.maximum(top, sinks_H1)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  weights = jnp.exp(lses - top)  # exactly 0 for lse = -inf
  denom = jnp.sum(weights, axis=0)
  if sinks is not None:
    denom = denom + jnp.exp(sinks_H1 - top)
  seen = denom > 0
  safe = jnp.where(seen, denom, 1.0)
  out = sum(jnp.einsum("bht,bthd->bthd", w / safe, o.astype(acc))
            for w, (o, _) in zip(weights, partials))
  lse = jnp.where(seen, top + jnp.log(safe), -jnp.inf)
  return out.astype(partials[0][0].dtype), lse
