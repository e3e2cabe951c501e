"""The definition of the attention op: materialises every score. Float64-capable; used by tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lsm.kernels.attention.mask import Mask, allowed_pairs


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32, or float64 when the inputs are float64."""
  return jnp.promote_types(dtype, jnp.float32)


def soft_cap(s, cap):
  return s if cap is None else cap * jnp.tanh(s / cap)


def attention_reference(q, k, v, *, mask: Mask, q_positions, kv_positions, q_segment_ids,
                        kv_segment_ids, sinks, scale: float, logits_soft_cap):
  """Arguments already validated and normalised by `api.attention` (positions are [B, T])."""
  b, tq, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  acc = accumulation_dtype(q.dtype)
  q_BTKGD = q.reshape(b, tq, hkv, g, d).astype(acc)
  s = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k.astype(acc)) * scale
  s = soft_cap(s, logits_soft_cap)
  ok = allowed_pairs(mask, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  ok = ok[:, None, None]  # [B, 1, 1, Tq, Tk]

  # Double `where` keeps infinities out of the differentiated expressions, so rows that see
  # nothing have finite (zero) gradients.
  row_max = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1)
  if sinks is not None:
    sinks_KG = sinks.astype(acc).reshape(hkv, g)
    row_max = jnp.maximum(row_max, sinks_KG[None, :, :, None])
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.where(ok, jnp.exp(jnp.where(ok, s, 0.0) - row_max[..., None]), 0.0)
  denom = jnp.sum(p, axis=-1)
  if sinks is not None:
    denom = denom + jnp.exp(sinks_KG[None, :, :, None] - row_max)
  seen = denom > 0
  safe_denom = jnp.where(seen, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", p / safe_denom[..., None], v.astype(acc))
  out = out.reshape(b, tq, hq, v.shape[-1]).astype(q.dtype)
  lse = jnp.where(seen, row_max + jnp.log(safe_denom), -jnp.inf)
  lse = lse.reshape(b, hq, tq).astype(acc)
  return out, lse
