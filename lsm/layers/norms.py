"""RMSNorm with a learned scale."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lsm.layers import checks
from lsm.layers.params import logical_param


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x**2, -1) + eps) * scale`` over the last axis.

  Computes in float32 whatever the input dtype and returns the input's dtype. ``axis_name`` is
  the logical name of the normalised axis (``"head_dim"`` for a q/k norm).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed",
               param_dtype=jnp.float32):
    self.dim = checks.positive_int("RMSNorm", "dim", dim)
    self.eps = checks.positive_float("RMSNorm", "eps", eps)
    param_dtype = checks.float_dtype("RMSNorm", "param_dtype", param_dtype)
    self.scale = logical_param(nnx.initializers.ones, None, (self.dim,), (axis_name,),
                               param_dtype)

  def __call__(self, x):
    checks.float_array("RMSNorm", "x", x, rank=None, last_dim=self.dim)
    x32 = x.astype(jnp.float32)
    inv_rms = jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x.dtype)
