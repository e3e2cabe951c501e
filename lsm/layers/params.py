"""Parameters that carry one logical axis name per dimension."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

# The logical axis names of lsm (DESIGN.md, contract 4); one rules table maps them to mesh axes.
# "conv" (a causal conv's taps) and "rank" (a low-rank bottleneck, Mamba's dt rank) are lsm's
# additions for the SSM layers; like "state" they are never sharded.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "state", "conv", "rank", "layers")


def logical_param(initializer: Callable, key: jax.Array, shape: Sequence[int],
                  names: Sequence[str], dtype) -> nnx.Param:
  """``nnx.Param(initializer(key, shape, dtype))`` annotated with logical axis ``names``.

  The names live in the variable's ``out_sharding`` metadata, where
  ``nnx.get_partition_spec(nnx.state(module))`` reads them back (and maps them to mesh axes
  under ``nnx.logical_axis_rules(rules)``). They are logical names, not mesh axes, so the value is
  not sharded when created (``eager_sharding=False``); sharding happens when a model is placed on
  a mesh by its rules.
  """
  names = tuple(names)
  if len(names) != len(shape) or any(n not in LOGICAL_AXES for n in names):
    raise ValueError(f"logical_param: names must give one of {LOGICAL_AXES} per dimension of "
                     f"shape {tuple(shape)}, got {names}")
  return nnx.Param(initializer(key, tuple(shape), dtype), out_sharding=names,
                   eager_sharding=False)
