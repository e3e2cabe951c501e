"""SwiGLU feed-forward block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers import checks
from lsm.layers.params import logical_param


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``: [B, T, D] -> [B, T, D], computed in ``dtype``."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.d_model = checks.positive_int("SwiGLU", "d_model", d_model)
    self.mlp_dim = checks.positive_int("SwiGLU", "mlp_dim", mlp_dim)
    self.dtype = checks.float_dtype("SwiGLU", "dtype", dtype)
    param_dtype = checks.float_dtype("SwiGLU", "param_dtype", param_dtype)
    init = nnx.initializers.lecun_normal()
    self.gate = logical_param(init, rngs.params(), (d_model, mlp_dim), ("embed", "mlp"),
                              param_dtype)
    self.up = logical_param(init, rngs.params(), (d_model, mlp_dim), ("embed", "mlp"),
                            param_dtype)
    self.down = logical_param(init, rngs.params(), (mlp_dim, d_model), ("mlp", "embed"),
                              param_dtype)

  def __call__(self, x_BTD):
    checks.float_array("SwiGLU", "x", x_BTD, rank=None, last_dim=self.d_model)
    x_BTD = x_BTD.astype(self.dtype)
    gate_BTF = x_BTD @ self.gate[...].astype(self.dtype)
    up_BTF = x_BTD @ self.up[...].astype(self.dtype)
    return (jax.nn.silu(gate_BTF) * up_BTF) @ self.down[...].astype(self.dtype)
