"""Token embedding with a tied output projection."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lsm.layers import checks
from lsm.layers.params import logical_param


class Embed(nnx.Module):
  """``embedding[vocab, embed]``: tokens -> vectors, and ``attend`` for tied output logits."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.vocab_size = checks.positive_int("Embed", "vocab_size", vocab_size)
    self.d_model = checks.positive_int("Embed", "d_model", d_model)
    self.dtype = checks.float_dtype("Embed", "dtype", dtype)
    param_dtype = checks.float_dtype("Embed", "param_dtype", param_dtype)
    # Unit-variance logits from unit-RMS inputs in `attend`.
    init = nnx.initializers.normal(stddev=d_model ** -0.5)
    self.embedding = logical_param(init, rngs.params(), (vocab_size, d_model), ("vocab", "embed"),
                                   param_dtype)

  def __call__(self, tokens_BT):
    """tokens [B, T] integers in [0, vocab_size) -> [B, T, D] in ``dtype``."""
    if not hasattr(tokens_BT, "shape") or not hasattr(tokens_BT, "dtype"):
      raise TypeError(f"Embed: tokens must be an array, got {type(tokens_BT).__name__}")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise TypeError(f"Embed: tokens must have an integer dtype, got {tokens_BT.dtype}")
    if tokens_BT.ndim != 2:
      raise ValueError(f"Embed: tokens must have shape [B, T], got {tuple(tokens_BT.shape)}")
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD):
    """x [B, T, D] -> logits [B, T, V] = x @ embedding.T, in float32."""
    checks.float_array("Embed", "x", x_BTD, rank=3, last_dim=self.d_model)
    return jnp.einsum("btd,vd->btv", x_BTD.astype(self.dtype),
                      self.embedding[...].astype(self.dtype), preferred_element_type=jnp.float32)
