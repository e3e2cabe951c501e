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
from lsm.kernels.attention import LANDMARK_IMPLEMENTATIONS
from lsm.log import log_once
from lsm.parallel.context import ContextParallel

_MIXERS: dict[str, Callable] = {}
_IN_ORDER: set[str] = set()


def register_mixer(name: str, *, in_order: bool = False):
  """Decorator: registers ``factory(model_config, rngs) -> nnx.Module`` under ``name``.

  ``in_order``: the mixer reads its tokens as a sequence in order (a scan), so under sequence
  sharding the tokens must be in the ``contiguous`` layout."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}")

  def decorate(factory):
    if name in _MIXERS and _MIXERS[name] is not factory:
      raise ValueError(f"register_mixer: a mixer named {name!r} is already registered")
    _MIXERS[name] = factory
    if in_order:
      _IN_ORDER.add(name)
    return factory

  return decorate


def in_order_mixers(pattern) -> tuple[str, ...]:
  """The names in ``pattern`` whose mixers need their tokens in order (scans)."""
  return tuple(dict.fromkeys(name for name in pattern if name in _IN_ORDER))


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


@register_mixer("landmark")
def _landmark(config, rngs):
  att, rope, landmark = config.attention, config.rope, config.landmark
  implementation = att.implementation
  if implementation in ("pallas_tpu", "pallas_gpu"):
    implementation = "pallas"  # one landmark kernel serves both backends
  if implementation not in (None, *LANDMARK_IMPLEMENTATIONS):
    log_once(f"landmark mixer: model.attention.implementation={implementation!r} has no landmark "
             f"kernel; using 'xla'")
    implementation = "xla"
  return layers.LandmarkAttention(
      config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim,
      block_size=landmark.block_size, top_k=landmark.top_k, positions=landmark.positions,
      cache_memory=landmark.cache_memory,
      rope_base=rope.base,
      rope_scaling=layers.RopeScaling(kind=rope.scaling, factor=rope.factor,
                                      original_length=rope.original_length),
      implementation=implementation, qk_norm=att.qk_norm, rngs=rngs, dtype=config.dtype,
      param_dtype=config.param_dtype)


def _sparse_pattern_params(sparse) -> dict:
  """The parameters of ``model.sparse.pattern``'s function in `lsm.kernels.attention.patterns`."""
  if sparse.pattern == "sink_window":
    return dict(window=sparse.window, sink_tokens=sparse.sink_tokens)
  if sparse.pattern == "lambda":
    return dict(window=sparse.window, global_tokens=sparse.global_tokens,
                distance_cap=sparse.distance_cap)
  if sparse.pattern == "bigbird":
    return dict(block=sparse.block, num_local_blocks=sparse.local_blocks,
                num_global_blocks=sparse.global_blocks, num_random_blocks=sparse.random_blocks,
                seed=sparse.seed, max_length=sparse.max_length)
  if sparse.pattern == "routing":
    return dict(num_clusters=sparse.num_clusters)
  if sparse.pattern == "select":
    return dict(block_size=sparse.block, top_k=sparse.top_k, sink_blocks=sparse.sink_blocks,
                local_blocks=sparse.local_blocks)
  return dict(block=sparse.block, local_blocks=sparse.local_blocks, stride=sparse.stride,
              max_length=sparse.max_length)


@register_mixer("sparse_attention")
def _sparse_attention(config, rngs):
  att, rope = config.attention, config.rope
  return layers.SparseAttention(
      config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim,
      pattern=config.sparse.pattern, rope_base=rope.base,
      rope_scaling=layers.RopeScaling(kind=rope.scaling, factor=rope.factor,
                                      original_length=rope.original_length),
      logits_soft_cap=att.logits_soft_cap, implementation=att.implementation,
      qk_norm=att.qk_norm, rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype,
      **_sparse_pattern_params(config.sparse))


@register_mixer("duo_attention")
def _duo_attention(config, rngs):
  att, rope, sparse = config.attention, config.rope, config.sparse
  return layers.DuoAttention(
      config.d_model, config.num_heads, config.num_kv_heads, config.resolved_head_dim,
      window=sparse.window, sink_tokens=sparse.sink_tokens,
      head_types=None if sparse.head_types is None else tuple(sparse.head_types),
      rope_base=rope.base,
      rope_scaling=layers.RopeScaling(kind=rope.scaling, factor=rope.factor,
                                      original_length=rope.original_length),
      logits_soft_cap=att.logits_soft_cap, implementation=att.implementation,
      qk_norm=att.qk_norm, rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)


def _ssm_common(config, rngs):
  ssm = config.ssm
  return dict(dt_min=ssm.dt_min, dt_max=ssm.dt_max, rngs=rngs, dtype=config.dtype,
              param_dtype=config.param_dtype)


@register_mixer("mamba", in_order=True)
def _mamba(config, rngs):
  ssm = config.ssm
  return layers.Mamba(config.d_model, state_size=ssm.state_size, expand=ssm.expand,
                      conv_width=ssm.conv_width, dt_rank=ssm.dt_rank, chunk_size=ssm.chunk_size,
                      implementation=ssm.implementation, **_ssm_common(config, rngs))


@register_mixer("mamba2", in_order=True)
def _mamba2(config, rngs):
  ssm = config.ssm
  return layers.Mamba2(config.d_model, state_size=ssm.state_size, expand=ssm.expand,
                       head_dim=ssm.head_dim, num_groups=ssm.num_groups,
                       conv_width=ssm.conv_width, chunk_size=ssm.chunk_size,
                       implementation=ssm.implementation, **_ssm_common(config, rngs))


@register_mixer("s4d", in_order=True)
def _s4d(config, rngs):
  ssm = config.ssm
  return layers.S4D(config.d_model, state_size=ssm.state_size,
                    discretization=ssm.discretization or "zoh", implementation=ssm.implementation,
                    **_ssm_common(config, rngs))


@register_mixer("s4", in_order=True)
def _s4(config, rngs):
  ssm = config.ssm
  return layers.S4(config.d_model, state_size=ssm.state_size,
                   discretization=ssm.discretization or "bilinear",
                   **_ssm_common(config, rngs))
