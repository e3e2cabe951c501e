"""Sequence mixers by name: `layer_pattern` entries are looked up here.

A family registers a factory ``(model_config, rngs) -> mixer`` under a name, and the LM builds
whatever its pattern names without being edited::

    @register_mixer("mamba2")
    def _mamba2(config, rngs):
      return Mamba2(config.d_model, ..., rngs=rngs)

Every mixer follows the contract in DESIGN.md: ``mixer(x, *, positions, segment_ids)``,
``mixer.init_cache(batch_size, max_length, dtype)`` and ``mixer(..., cache=cache) -> (y, cache)``.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from lsm import layers
from lsm.parallel.context import ContextParallel

_MIXERS: dict[str, Callable] = {}


def register_mixer(name: str):
  """Decorator: registers ``factory(model_config, rngs) -> nnx.Module`` under ``name``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}")

  def decorate(factory):
    if name in _MIXERS and _MIXERS[name] is not factory:
      raise ValueError(f"register_mixer: a mixer named {name!r} is already registered")
    _MIXERS[name] = factory
    return factory

  return decorate


def mixer_names() -> tuple[str, ...]:
  return tuple(sorted(_MIXERS))


def check_layer_pattern(pattern) -> None:
  """ValueError naming ``model.layer_pattern[i]`` for a name no family registered."""
  for i, name in enumerate(pattern):
    if name not in _MIXERS:
      raise ValueError(f"model.layer_pattern[{i}]={name!r} is not a known mixer; known: "
                       f"{', '.join(mixer_names())}")


def make_mixer(name: str, config, rngs: nnx.Rngs) -> nnx.Module:
  check_layer_pattern([name])
  return _MIXERS[name](config, rngs)


@register_mixer("attention")
def _attention(config, rngs):
  att = config.attention
  rope = config.rope
  return layers.Attention(
      config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim,
      window=att.window, sink_tokens=att.sink_tokens, rope_base=rope.base,
      rope_scaling=layers.RopeScaling(kind=rope.scaling, factor=rope.factor,
                                      original_length=rope.original_length),
      logits_soft_cap=att.logits_soft_cap, implementation=att.implementation,
      qk_norm=att.qk_norm, rngs=rngs,
      context_parallel=ContextParallel(strategy=att.context_parallel.strategy,
                                       layout=att.context_parallel.layout),
      dtype=config.dtype, param_dtype=config.param_dtype)
