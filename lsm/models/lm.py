"""`LM`: a decoder language model built from a layer pattern of sequence mixers.

``layer_pattern`` (e.g. ``["attention"]`` or ``["mamba2", "mamba2", "attention"]``) is one
*block*: for each name, a pre-norm mixer and a pre-norm SwiGLU MLP, each residual. The block is
repeated ``num_layers / len(layer_pattern)`` times; the repeats are stacked (every parameter gets a
leading ``layers`` axis) and run with `nnx.scan`, optionally rematerialised. Positions and segment
ids flow unchanged into every mixer, so packed documents and decoding offsets need nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lsm import layers
from lsm.models.registry import check_layer_pattern, in_order_mixers, make_mixer
from lsm.parallel.context import ContextParallel
from lsm.parallel.layout import layout_multiple, permutation
from lsm.parallel.mesh import activation_spec

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_STACK = {nnx.PARTITION_NAME: "layers"}


class Block(nnx.Module):
  """One pass over the layer pattern."""

  def __init__(self, config, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    norm = dict(eps=config.norm_eps, param_dtype=config.param_dtype)
    pattern = config.layer_pattern
    self.mixer_norms = nnx.List([layers.RMSNorm(config.d_model, **norm) for _ in pattern])
    self.mixers = nnx.List([make_mixer(name, config, rngs) for name in pattern])
    self.mlp_norms = nnx.List([layers.RMSNorm(config.d_model, **norm) for _ in pattern])
    self.mlps = nnx.List([layers.SwiGLU(config.d_model, config.resolved_mlp_dim, **kw)
                          for _ in pattern])

  def __call__(self, x, positions, segment_ids, caches=None):
    new_caches = []
    for i, mixer in enumerate(self.mixers):
      h = self.mixer_norms[i](x)
      if caches is None:
        y = mixer(h, positions=positions, segment_ids=segment_ids)
      else:
        y, cache = mixer(h, positions=positions, segment_ids=segment_ids, cache=caches[i])
        new_caches.append(cache)
      x = x + y
      x = x + self.mlps[i](self.mlp_norms[i](x))
    return x, (None if caches is None else new_caches)

  def init_cache(self, batch_size: int, max_length: int, dtype, policy=None):
    """Each mixer's cache; ``policy`` (one of `layers.CACHE_POLICIES`) goes to attention only."""

    def cache(mixer):
      if policy is not None and isinstance(mixer, layers.Attention):
        return mixer.init_cache(batch_size, max_length, dtype, policy=policy)
      return mixer.init_cache(batch_size, max_length, dtype)

    return [cache(mixer) for mixer in self.mixers]


class LM(nnx.Module):
  """Decoder LM: ``logits = lm(tokens[B, T], positions=..., segment_ids=...)`` (float32)."""

  def __init__(self, config, *, vocab_size: int | None = None, rngs: nnx.Rngs):
    vocab_size = vocab_size or config.vocab_size
    if not isinstance(vocab_size, int) or vocab_size < 1:
      raise ValueError(f"LM: model.vocab_size must be a positive int (or come from the data), "
                       f"got {vocab_size!r}")
    check_layer_pattern(config.layer_pattern)
    self.remat = config.remat
    self.in_order = in_order_mixers(config.layer_pattern)
    cp = config.attention.context_parallel
    self.context_parallel = ContextParallel(strategy=cp.strategy, layout=cp.layout)
    self.vocab_size = vocab_size
    self.repeats = config.num_layers // len(config.layer_pattern)
    kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
    self.embed = layers.Embed(vocab_size, config.d_model, **kw)

    @nnx.split_rngs(splits=self.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK)
    def stacked(rngs):
      return Block(config, rngs)

    self.blocks = stacked(rngs)
    self.final_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps,
                                     param_dtype=config.param_dtype)
    if config.tie_embeddings:
      self.unembed = None
    else:
      self.unembed = nnx.Linear(
          config.d_model, vocab_size, use_bias=False, rngs=rngs, dtype=config.dtype,
          param_dtype=config.param_dtype,
          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")))

  def _logits(self, x):
    x = self.final_norm(x)
    if self.unembed is None:
      return self.embed.attend(x).astype(jnp.float32)
    return self.unembed(x).astype(jnp.float32)

  def _run_blocks(self, x, positions, segment_ids, caches):
    remat = self.remat

    def body(x, block, positions, segment_ids, caches):
      return block(x, positions, segment_ids, caches)

    if remat != "none":
      body = nnx.remat(body, policy=_REMAT[remat])
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None, 0), out_axes=(nnx.Carry, 0),
                    transform_metadata=_STACK)
    return scan(x, self.blocks, positions, segment_ids, caches)

  def token_layout(self, length: int) -> tuple[str, int]:
    """(layout, devices) the tokens of a training batch must be in: under a mesh that shards
    ``sequence`` over P > 1 devices, the context-parallel layout; else contiguous over 1."""
    shards = self.context_parallel.shards()
    if shards == 1:
      return "contiguous", 1
    layout = self.context_parallel.layout
    if self.in_order and layout != "contiguous":
      raise ValueError(f"LM: model.layer_pattern has mixers that scan their tokens in order "
                       f"({', '.join(self.in_order)}); with the sequence sharded over {shards} "
                       f"devices set model.attention.context_parallel.layout=contiguous, got "
                       f"{layout!r}")
    if length % layout_multiple(layout, shards):
      raise ValueError(f"LM: a sequence of {length} tokens cannot be laid out {layout!r} over "
                       f"{shards} devices; it must be a multiple of "
                       f"{layout_multiple(layout, shards)}")
    return layout, shards

  def __call__(self, tokens, *, positions=None, segment_ids=None):
    """Logits of ``tokens [B, T]``. Under context parallelism (see `token_layout`) the tokens are
    in the layout's order; ``positions`` default to the layout's."""
    if positions is None and tokens.ndim == 2:
      layout, shards = self.token_layout(tokens.shape[1])
      if shards > 1:
        positions = jnp.broadcast_to(jnp.asarray(permutation(tokens.shape[1], shards, layout)),
                                     tokens.shape)
    positions, segment_ids = _tokens_meta(tokens, positions, segment_ids)
    x = self.embed(tokens)
    if self.context_parallel.shards() > 1:
      # Activations sharded over the sequence from the start (the batch may arrive replicated).
      mesh = jax.sharding.get_abstract_mesh()
      x = jax.lax.with_sharding_constraint(x, activation_spec(mesh, x.shape))
    x, _ = self._run_blocks(x, positions, segment_ids, None)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32, policy=None):
    """Every mixer's cache, stacked over the block repeats. ``policy``: one of
    `layers.CACHE_POLICIES` for the attention mixers (None: their dense or ring caches)."""
    if policy is not None and not isinstance(policy, layers.CACHE_POLICIES):
      names = ", ".join(p.__name__ for p in layers.CACHE_POLICIES)
      raise TypeError(f"LM.init_cache: policy must be one of {names} or None, got "
                      f"{type(policy).__name__}")

    @nnx.vmap(in_axes=(0,), out_axes=0)
    def caches(block):
      return block.init_cache(batch_size, max_length, dtype, policy)

    return caches(self.blocks)

  def decode(self, tokens, *, positions, segment_ids=None, cache):
    """(logits, cache) for ``tokens[B, t]`` appended to the cache (prefill: t > 1)."""
    positions, segment_ids = _tokens_meta(tokens, positions, segment_ids)
    x = self.embed(tokens)
    x, cache = self._run_blocks(x, positions, segment_ids, cache)
    return self._logits(x), cache


def _tokens_meta(tokens, positions, segment_ids):
  if tokens.ndim != 2:
    raise ValueError(f"LM: tokens must be [B, T], got shape {tokens.shape}")
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  return positions, segment_ids


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
