"""Causal self-attention mixer: GQA, RoPE, sliding window with sink tokens; a dense, ring,
block-memory or fixed-budget (`lsm.layers.kv_policies`) cache.

Follows the mixer contract of DESIGN.md::

    y = mixer(x[B,T,D], *, positions, segment_ids)
    cache = mixer.init_cache(batch_size, max_length, dtype)
    y, cache = mixer(x[B,t,D], *, positions, segment_ids, cache=cache)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.kernels.attention import IMPLEMENTATIONS, Mask, attention, merge
from lsm.layers import checks
from lsm.layers.block_memory import BlockMemoryKVCache, BlockMemoryPolicy
from lsm.layers.kv_cache import EMPTY_POSITION, DenseKVCache, RingKVCache
from lsm.layers.kv_policies import (BUDGET_POLICIES, BlockSelectPolicy, ScoredKVCache,
                                    SelectKVCache, SinkWindowPolicy)
from lsm.layers.projections import add_attention_projections
from lsm.layers.rope import RopeScaling, apply_rope
from lsm.parallel.context import ContextParallel, context_attention
from lsm.parallel.decode import shard_cache, sharded_cache_attention
from lsm.parallel.layout import permutation

KVCache = DenseKVCache | RingKVCache | BlockMemoryKVCache | ScoredKVCache | SelectKVCache
CACHE_POLICIES = (BlockMemoryPolicy, *BUDGET_POLICIES)


class Attention(nnx.Module):
  """Multi-head causal self-attention with ``num_kv_heads`` key/value heads (GQA/MQA).

  Args:
    d_model: width of x.
    num_heads, num_kv_heads: query and key/value heads; ``num_heads % num_kv_heads == 0``.
    head_dim: per-head width (default ``d_model // num_heads``); even, for RoPE.
    window: a query at position p sees keys at positions ``p - window .. p`` (None: all of
      ``0 .. p``). With a window, `init_cache` makes a ring buffer of O(window) memory.
    sink_tokens: with a window, positions ``< sink_tokens`` stay visible to every later query.
    rope_base, rope_scaling: the rotary embedding of q and k (`apply_rope`).
    logits_soft_cap: scores become ``cap * tanh(s / cap)``.
    implementation: passed to the attention op (None: its default for the backend).
    qk_norm: RMSNorm over head_dim of q and k before RoPE.
    context_parallel: a `ContextParallel`: when the current mesh (``jax.set_mesh``) shards its
      axis over several devices, training attention runs `context_attention` (the tokens must
      then be in its layout, with their true positions) and a dense cache is sharded over the
      axis (`sharded_cache_attention`). None: the plain op, whatever the mesh.
    dtype: compute dtype; param_dtype: parameter dtype.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, window: int | None = None, sink_tokens: int | None = None,
               rope_base: float = 10000.0, rope_scaling: RopeScaling = RopeScaling(),
               logits_soft_cap: float | None = None, implementation: str | None = None,
               qk_norm: bool = False, context_parallel: ContextParallel | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.d_model = checks.positive_int("Attention", "d_model", d_model)
    self.num_heads = checks.positive_int("Attention", "num_heads", num_heads)
    self.num_kv_heads = checks.positive_int("Attention", "num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(f"Attention: num_heads must be a multiple of num_kv_heads, got "
                       f"num_heads={num_heads} and num_kv_heads={num_kv_heads}")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"Attention: d_model={d_model} is not a multiple of num_heads="
                         f"{num_heads}; give head_dim")
      head_dim = d_model // num_heads
    self.head_dim = checks.positive_int("Attention", "head_dim", head_dim)
    if head_dim % 2:
      raise ValueError(f"Attention: head_dim must be even (RoPE rotates pairs), got {head_dim}")
    self.window = checks.positive_int("Attention", "window", window, allow_none=True)
    if sink_tokens is not None:
      if window is None:
        raise ValueError(f"Attention: sink_tokens={sink_tokens!r} needs a window (without one "
                         f"every earlier token is visible already)")
      if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, (int, np.integer)) or (
          sink_tokens < 0):
        raise ValueError(f"Attention: sink_tokens must be a non-negative int or None, got "
                         f"{sink_tokens!r}")
    self.sink_tokens = int(sink_tokens or 0)
    self.rope_base = checks.positive_float("Attention", "rope_base", rope_base)
    if not isinstance(rope_scaling, RopeScaling):
      raise TypeError(f"Attention: rope_scaling must be a RopeScaling, got "
                      f"{type(rope_scaling).__name__}")
    self.rope_scaling = rope_scaling
    self.logits_soft_cap = checks.positive_float("Attention", "logits_soft_cap", logits_soft_cap,
                                                 allow_none=True)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(f"Attention: implementation must be one of {IMPLEMENTATIONS} or None, "
                       f"got {implementation!r}")
    self.implementation = implementation
    if context_parallel is not None and not isinstance(context_parallel, ContextParallel):
      raise TypeError(f"Attention: context_parallel must be a ContextParallel or None, got "
                      f"{type(context_parallel).__name__}")
    self.context_parallel = context_parallel
    self.dtype = checks.float_dtype("Attention", "dtype", dtype)
    param_dtype = checks.float_dtype("Attention", "param_dtype", param_dtype)
    self.mask = Mask(causal=True, window=None if window is None else (self.window, 0),
                     sink_tokens=self.sink_tokens or None)

    add_attention_projections(self, d_model, num_heads, num_kv_heads, head_dim, qk_norm=qk_norm,
                              rngs=rngs, param_dtype=param_dtype)

  def init_cache(self, batch_size: int, max_length: int, dtype=None, *,
                 policy=None) -> KVCache:
    """An empty cache: a ring buffer of ``sink_tokens + window`` slots when the layer has a
    window (``max_length`` then bounds nothing), else a dense cache of ``max_length`` slots, or
    with a ``policy`` (one of CACHE_POLICIES) a `BlockMemoryKVCache`, a `RingKVCache` read with
    the policy's window (`SinkWindowPolicy`) or a `ScoredKVCache` (`HeavyHitterPolicy`,
    `SnapKVPolicy`); the layer must then have no window (a window bounds the cache already).
    ``dtype`` defaults to the compute dtype."""
    dtype = self.dtype if dtype is None else dtype
    max_length = checks.positive_int("Attention.init_cache", "max_length", max_length)
    if policy is not None:
      if not isinstance(policy, CACHE_POLICIES):
        names = ", ".join(p.__name__ for p in CACHE_POLICIES)
        raise TypeError(f"Attention.init_cache: policy must be one of {names} or None, got "
                        f"{type(policy).__name__}")
      if self.window is not None:
        raise ValueError(f"Attention.init_cache: a cache policy needs a layer without a window "
                         f"(window={self.window} bounds the cache already); give policy=None")
      if isinstance(policy, SinkWindowPolicy):
        return RingKVCache.create(batch_size, self.num_kv_heads, self.head_dim, dtype,
                                  window=policy.window, sink_tokens=policy.sink_tokens,
                                  renumber_sinks=policy.positions == "renumbered")
      if isinstance(policy, BlockSelectPolicy):
        return SelectKVCache(dense=DenseKVCache.create(batch_size, max_length, self.num_kv_heads,
                                                       self.head_dim, dtype), policy=policy)
      if not isinstance(policy, BlockMemoryPolicy):
        return ScoredKVCache.create(batch_size, self.num_kv_heads, self.head_dim, dtype,
                                    policy=policy)
      return BlockMemoryKVCache.create(batch_size, max_length, self.num_kv_heads, self.head_dim,
                                       dtype, policy=policy)
    if self.window is None:
      cache = DenseKVCache.create(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype)
      if self._shards() > 1 and max_length % self._shards() == 0:
        cache = shard_cache(cache, axis=self.context_parallel.axis)
      return cache
    return RingKVCache.create(batch_size, self.num_kv_heads, self.head_dim, dtype,
                              window=self.window, sink_tokens=self.sink_tokens)

  def __call__(self, x_BTD, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    """x [B, T, D] -> y [B, T, D] in ``dtype`` (and the updated cache when one is given).

    positions: [B, T] or [T] integers, to RoPE and the mask (default ``arange(T)``; required with
      a cache). segment_ids: [B, T] or [T] integers; tokens only see their own segment (packed
      documents). With a cache, None means segment 0 for every token.
    cache: from `init_cache`; x then holds the next t >= 1 tokens (a prefill chunk or one
      decoding step), and the call returns ``(y, cache)``.
    """
    positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    b, t, _ = x_BTD.shape
    shards = self._shards()
    if positions is None and cache is None and shards > 1:
      # Tokens sharded over the sequence axis are in the layout's order.
      positions = np.broadcast_to(permutation(t, shards, self.context_parallel.layout), (b, t))
    rope_positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD)
    q_raw_BTHK = q_BTHK
    q_BTHK, k_BTGK = (self._rope(z, rope_positions) for z in (q_BTHK, k_BTGK))

    mask = self.mask
    if isinstance(cache, RingKVCache) and self.window is None:  # a SinkWindowPolicy cache
      if cache.renumber_sinks and cache.sink_tokens:
        return self._renumbered_sinks(q_raw_BTHK, q_BTHK, k_BTGK, v_BTGK, positions,
                                      segment_ids, cache)
      mask = SinkWindowPolicy(sink_tokens=cache.sink_tokens, window=cache.window).mask()
    common = dict(mask=mask, logits_soft_cap=self.logits_soft_cap,
                  implementation=self.implementation)
    if cache is None and shards > 1:
      cp = self.context_parallel
      out_BTHK = context_attention(q_BTHK, k_BTGK, v_BTGK, strategy=cp.strategy, axis=cp.axis,
                                   layout=cp.layout, q_positions=positions,
                                   kv_positions=positions, q_segment_ids=segment_ids,
                                   kv_segment_ids=segment_ids, **common)
      return self._output(out_BTHK)
    if isinstance(cache, DenseKVCache) and shards > 1 and cache.max_length % shards == 0:
      out_BTHK, cache = sharded_cache_attention(
          q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, cache, axis=self.context_parallel.axis,
          **common)
      return self._output(out_BTHK), cache
    if isinstance(cache, (BlockMemoryKVCache, ScoredKVCache, SelectKVCache)):
      out_BTHK, cache = cache.attend(q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, **common)
      return self._output(out_BTHK), cache
    if cache is None:
      kv_positions, kv_segment_ids = positions, segment_ids
    else:
      (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), cache = cache.append(
          k_BTGK, v_BTGK, positions, segment_ids)
      k_BTGK, v_BTGK = k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype)
    out_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, mask=mask, q_positions=positions,
                         kv_positions=kv_positions, q_segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, logits_soft_cap=self.logits_soft_cap,
                         implementation=self.implementation)
    y_BTD = self._output(out_BTHK)
    return y_BTD if cache is None else (y_BTD, cache)

  def _renumbered_sinks(self, q_raw_BTHK, q_BTHK, k_BTGK, v_BTGK, positions, segment_ids,
                        cache: RingKVCache):
    """A sink + window cache read at cache-relative positions (`SinkWindowPolicy`): the window
    part with the true queries, the sinks with each query rotated at ``min(p, S + W)``, merged
    by their log-sum-exps."""
    s, w = cache.sink_tokens, cache.window
    sinks = dict(keys=cache.keys[:, :s], values=cache.values[:, :s],
                 positions=cache.positions[:, :s], segment_ids=cache.segment_ids[:, :s])
    (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), cache = cache.append(
        k_BTGK, v_BTGK, positions, segment_ids)
    common = dict(logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                  return_lse=True)
    window = attention(q_BTHK, k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype),
                       mask=Mask(causal=True, window=(w, 0)), q_positions=positions,
                       kv_positions=kv_positions, q_segment_ids=segment_ids,
                       kv_segment_ids=kv_segment_ids, **common)
    # Sink candidates: the cache's sink slots and the chunk's first S tokens (a first chunk
    # holds its own sinks); any that is not a sink (position >= S) is hidden as empty.
    head = min(s, k_BTGK.shape[1])
    sink_k, sink_v, sink_pos, sink_seg = (
        jnp.concatenate([old, new[:, :head].astype(old.dtype)], axis=1)
        for old, new in ((sinks["keys"], k_BTGK), (sinks["values"], v_BTGK),
                         (sinks["positions"], positions), (sinks["segment_ids"], segment_ids)))
    sink_pos = jnp.where(sink_pos < s, sink_pos, EMPTY_POSITION)
    q_sink_BTHK = self._rope(q_raw_BTHK, jnp.minimum(positions, s + w))
    # A sink is read here only once it has left the window (key position < p - W): causal on
    # the query position shifted back by W + 1.
    sink = attention(q_sink_BTHK, sink_k.astype(self.dtype), sink_v.astype(self.dtype),
                     mask=Mask(causal=True), q_positions=positions - w - 1,
                     kv_positions=sink_pos, q_segment_ids=segment_ids, kv_segment_ids=sink_seg,
                     **common)
    out_BTHK, _ = merge([window, sink])
    return self._output(out_BTHK), cache

  def _check_call(self, x_BTD, positions, segment_ids, cache):
    """Checks a call's arguments (errors name the class); returns positions and segment ids as
    [B, T] int32 or None (with a cache: positions required, segment ids default to 0)."""
    owner = type(self).__name__
    checks.float_array(owner, "x", x_BTD, rank=3, last_dim=self.d_model)
    b, t, _ = x_BTD.shape
    positions = checks.token_array(owner, "positions", positions, b, t)
    segment_ids = checks.token_array(owner, "segment_ids", segment_ids, b, t)
    if cache is not None:
      self._check_cache(cache, b)
      if positions is None:
        raise ValueError(f"{owner}: positions are required with a cache (the positions of the "
                         f"t new tokens), got None")
      if segment_ids is None:
        segment_ids = np.zeros((b, t), np.int32)
    return positions, segment_ids

  def _project(self, x_BTD):
    """q [B,T,H,K], k and v [B,T,G,K] in the compute dtype; q and k normed, not yet rotated."""
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHK, k_BTGK, v_BTGK = (
        jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(self.dtype))
        for w in (self.query, self.key, self.value))
    if self.query_norm is not None:
      q_BTHK, k_BTGK = self.query_norm(q_BTHK), self.key_norm(k_BTGK)
    return q_BTHK, k_BTGK, v_BTGK

  def _rope(self, z_BTHK, positions):
    return apply_rope(z_BTHK, positions, base=self.rope_base, scaling=self.rope_scaling)

  def _output(self, out_BTHK):
    return jnp.einsum("bthk,hkd->btd", out_BTHK, self.out[...].astype(self.dtype))

  def _shards(self) -> int:
    return 1 if self.context_parallel is None else self.context_parallel.shards()

  def _check_cache(self, cache, batch_size: int):
    if not isinstance(cache, (DenseKVCache, RingKVCache, BlockMemoryKVCache, ScoredKVCache,
                              SelectKVCache)):
      raise TypeError(f"Attention: cache must be a DenseKVCache, RingKVCache, "
                      f"BlockMemoryKVCache, ScoredKVCache or SelectKVCache (from init_cache), "
                      f"got {type(cache).__name__}")
    keys = cache.window.keys if isinstance(cache, BlockMemoryKVCache) else cache.keys
    expected = (batch_size, self.num_kv_heads, self.head_dim)
    got = (keys.shape[0], *keys.shape[2:])
    if got != expected:
      raise ValueError(f"Attention: cache must have (batch, kv heads, head dim) = {expected} to "
                       f"match x and the layer, got {got}")
    if isinstance(cache, (BlockMemoryKVCache, ScoredKVCache, SelectKVCache)) and (
        self.window is not None):
      raise ValueError(f"Attention: a {type(cache).__name__} needs a layer without a window, this "
                       f"one has window={self.window}")
    if isinstance(cache, RingKVCache) and self.window is not None and (
        cache.window, cache.sink_tokens) != (
        self.window, self.sink_tokens):
      raise ValueError(f"Attention: a RingKVCache must have the layer's window={self.window} and "
                       f"sink_tokens={self.sink_tokens}, got window={cache.window} and "
                       f"sink_tokens={cache.sink_tokens}")
