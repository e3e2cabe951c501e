"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                            or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample(logits_BV, key, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None):
  """[B] int32 tokens. ``temperature=0`` is greedy (top-k / top-p then do not matter)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k is not None:
    k = min(top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
