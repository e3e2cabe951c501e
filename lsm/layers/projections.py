"""The query/key/value/output projections (and optional q/k norms) of attention-like mixers."""

from __future__ import annotations

from flax import nnx

from lsm.layers.norms import RMSNorm
from lsm.layers.params import logical_param


def add_attention_projections(module: nnx.Module, d_model: int, num_heads: int,
                              num_kv_heads: int, head_dim: int, *, qk_norm: bool,
                              rngs: nnx.Rngs, param_dtype) -> None:
  """Sets ``query [D,H,K]``, ``key``/``value [D,G,K]``, ``out [H,K,D]`` (fan-in truncated normal,
  logical axes) and ``query_norm``/``key_norm`` (RMSNorm over K, or None) on ``module``."""
  h, g, k = num_heads, num_kv_heads, head_dim
  project_in = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=0, out_axis=(1, 2))
  project_out = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                  in_axis=(0, 1), out_axis=2)
  module.query = logical_param(project_in, rngs.params(), (d_model, h, k),
                               ("embed", "heads", "head_dim"), param_dtype)
  module.key = logical_param(project_in, rngs.params(), (d_model, g, k),
                             ("embed", "kv_heads", "head_dim"), param_dtype)
  module.value = logical_param(project_in, rngs.params(), (d_model, g, k),
                               ("embed", "kv_heads", "head_dim"), param_dtype)
  module.out = logical_param(project_out, rngs.params(), (h, k, d_model),
                             ("heads", "head_dim", "embed"), param_dtype)
  if qk_norm:
    module.query_norm = RMSNorm(k, axis_name="head_dim", param_dtype=param_dtype)
    module.key_norm = RMSNorm(k, axis_name="head_dim", param_dtype=param_dtype)
  else:
    module.query_norm = module.key_norm = None
