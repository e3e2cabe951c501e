"""Per-row terms shared by every blockwise backward pass (XLA and the Pallas kernels).

With ``p = exp(s - lse)``, the gradients of ``out`` and of ``lse`` both run through the
probabilities: ``ds = p * (dp - (delta - dlse))`` where ``delta = sum(d_out * out)`` per row.
"""

from __future__ import annotations

import jax.numpy as jnp


def row_terms(out, d_out, lse, d_lse, acc=jnp.float32):
  """``(delta - dlse, lse with -inf -> +inf)``, both [B, Hq, Tq] in ``acc``.

  ``+inf`` makes ``exp(s - lse)`` exactly 0 on rows that saw nothing.
  """
  delta = jnp.einsum("bthd,bthd->bht", d_out.astype(acc), out.astype(acc))
  row = delta if d_lse is None else delta - d_lse.astype(acc)
  return row, jnp.where(jnp.isfinite(lse), lse, jnp.inf).astype(acc)


def sinks_grad(sinks, lse_safe, row_term):
  """Gradient of the sink logits: the sink column has value 0, so its score gradient is
  ``p_sink * (dlse - delta)``."""
  if sinks is None:
    return None
  p_sink = jnp.exp(sinks.astype(row_term.dtype).reshape(1, -1, 1) - lse_safe)
  return jnp.sum(-p_sink * row_term, axis=(0, 2)).astype(sinks.dtype)
