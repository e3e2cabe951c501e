"""Training-free block memory (InfLLM-style) as a decoding cache of the attention mixer.

A `BlockMemoryKVCache` bounds what each query attends, whatever the length of the context:

- the first ``sink_tokens`` tokens written (attention sinks), always visible;
- a local window of the most recent tokens, always visible;
- a store of evicted blocks of ``block_size`` consecutive tokens, of which each query, per KV
  head, attends only the ``top_k`` blocks that score best against it.

Where a token lives follows from its order of arrival, not from its position: the n-th token
written is a sink if ``n < sink_tokens``, else it is local token ``m = n - sink_tokens``. With
M local tokens written, the first ``E = block_size * max(0, ceil((M - window) / block_size))``
are in the store (block ``m // block_size``) and the rest are in the window (a ring: slot
``m % window``); once ``M > window`` that is between ``window - block_size + 1`` and ``window``
tokens. Blocks leave the window whole, so ``window >= block_size``.

Representatives. Every token accumulates, per KV head, the attention it receives while it is in
the window or in the chunk being written: the softmax weights of every query of each call,
summed over the query heads of the group. When its block is evicted, the ``representatives``
tokens that received the most stand for it. This follows InfLLM (keys that the queries of the
following ``window`` tokens found relevant are the ones later queries are likely to need), with
softmax weights rather than raw dot products so that no single query dominates the sum; a
block's keys are the Attention layer's rotated keys, so a representative scores with its rotary
phase at its true position. The representatives' keys stay in a small array beside the store.

Scoring. For a query and KV head, a block scores ``max_r q_g . k_r``, with ``q_g`` the sum of
the group's query heads, over its representatives r that the mask and segment ids let the query
see (-inf if none); the ``top_k`` best blocks are attended (ties: the lower block index; a
picked block's tokens are still masked one by one). Each
chunk of t queries attends ``[sinks || window || chunk]`` with one call of the attention op and
its selected blocks with another (one row per query and KV head, so a chunk gathers
``t * top_k * block_size`` keys per KV head), merged by lse: at most
``sink_tokens + top_k * block_size + window + t`` keys per query (`BlockMemoryPolicy.budget`).
With ``top_k`` at least the number of stored blocks, that is every token: full attention.

Empty slots hold ``EMPTY_POSITION``, which the causal mask hides. The store is a device buffer of
``ceil((max_length - sink_tokens - window) / block_size)`` blocks (at least one); memory kinds
(keeping it in host memory) are not used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from lsm.kernels.attention import Mask, attention, merge
from lsm.kernels.attention.mask import allowed_pairs
from lsm.kernels.attention.reference import soft_cap
from lsm.layers import checks
from lsm.layers.kv_cache import EMPTY_POSITION


@dataclasses.dataclass(frozen=True)
class BlockMemoryPolicy:
  """How a `BlockMemoryKVCache` bounds attention (see the module docstring).

  sink_tokens: the first tokens written, always visible (>= 0).
  window: the most recent tokens always visible (at most this many; >= block_size).
  block_size: tokens per stored block.
  top_k: stored blocks attended per query and KV head.
  representatives: keys per block that stand for it when scoring (<= block_size).
  """

  sink_tokens: int = 4
  window: int = 512
  block_size: int = 64
  top_k: int = 4
  representatives: int = 4

  def __post_init__(self):
    owner = "BlockMemoryPolicy"
    sinks = self.sink_tokens
    if isinstance(sinks, bool) or not isinstance(sinks, (int, np.integer)) or sinks < 0:
      raise ValueError(f"{owner}: sink_tokens must be a non-negative int, got {sinks!r}")
    object.__setattr__(self, "sink_tokens", int(sinks))
    for name in ("window", "block_size", "top_k", "representatives"):
      object.__setattr__(self, name, checks.positive_int(owner, name, getattr(self, name)))
    if self.window < self.block_size:
      raise ValueError(f"{owner}: window must be >= block_size (blocks leave the window whole), "
                       f"got window={self.window} and block_size={self.block_size}")
    if self.representatives > self.block_size:
      raise ValueError(f"{owner}: representatives must be <= block_size={self.block_size}, got "
                       f"{self.representatives}")

  def budget(self, t: int = 1) -> int:
    """The most keys a query of a chunk of ``t`` tokens attends."""
    return self.sink_tokens + self.top_k * self.block_size + self.window + t

  def store_blocks(self, max_length: int) -> int:
    """Blocks of the store of a cache for ``max_length`` tokens (at least one)."""
    overflow = max_length - self.sink_tokens - self.window
    return max(1, -(-overflow // self.block_size))


@struct.dataclass
class Slots:
  """Cached tokens: keys, values [B, *S, Hkv, D]; positions, segment_ids [B, *S] int32."""

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  segment_ids: jax.Array

  @classmethod
  def empty(cls, slots: tuple[int, ...], num_kv_heads: int, head_dim: int, dtype) -> Slots:
    kv = jnp.zeros((*slots, num_kv_heads, head_dim), dtype)
    return cls(keys=kv, values=kv, positions=jnp.full(slots, EMPTY_POSITION, jnp.int32),
               segment_ids=jnp.zeros(slots, jnp.int32))

  def fields(self):
    return (self.keys, self.values, self.positions, self.segment_ids)


@struct.dataclass
class BlockMemoryKVCache:
  """Sinks, a window and a store of blocks with their representative keys.

  sinks: `Slots` [B, sink_tokens]; window: `Slots` [B, window]; window_scores [B, window, Hkv]
  float32: attention received so far; blocks: `Slots` [B, N, block_size]; rep_keys
  [B, N, representatives, Hkv, D], rep_positions and rep_segment_ids [B, N, representatives,
  Hkv]; length [] int32: tokens written. Writing more than the store holds is a ValueError when
  the count is known (eager calls); under ``jit`` the outputs become NaN from then on.
  """

  sinks: Slots
  window: Slots
  window_scores: jax.Array
  blocks: Slots
  rep_keys: jax.Array
  rep_positions: jax.Array
  rep_segment_ids: jax.Array
  length: jax.Array
  policy: BlockMemoryPolicy = struct.field(pytree_node=False)

  @classmethod
  def create(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, policy: BlockMemoryPolicy) -> BlockMemoryKVCache:
    owner = "BlockMemoryKVCache"
    if not isinstance(policy, BlockMemoryPolicy):
      raise TypeError(f"{owner}: policy must be a BlockMemoryPolicy, got "
                      f"{type(policy).__name__}")
    b = checks.positive_int(owner, "batch_size", batch_size)
    max_length = checks.positive_int(owner, "max_length", max_length)
    g = checks.positive_int(owner, "num_kv_heads", num_kv_heads)
    d = checks.positive_int(owner, "head_dim", head_dim)
    dtype = checks.float_dtype(owner, "dtype", dtype)
    n, r = policy.store_blocks(max_length), policy.representatives
    return cls(
        sinks=Slots.empty((b, policy.sink_tokens), g, d, dtype),
        window=Slots.empty((b, policy.window), g, d, dtype),
        window_scores=jnp.zeros((b, policy.window, g), jnp.float32),
        blocks=Slots.empty((b, n, policy.block_size), g, d, dtype),
        rep_keys=jnp.zeros((b, n, r, g, d), dtype),
        rep_positions=jnp.full((b, n, r, g), EMPTY_POSITION, jnp.int32),
        rep_segment_ids=jnp.zeros((b, n, r, g), jnp.int32),
        length=jnp.zeros((), jnp.int32), policy=policy)

  @property
  def num_blocks(self) -> int:
    return self.blocks.keys.shape[1]

  def stored_blocks(self, length):
    """Blocks in the store after ``length`` tokens were written."""
    p = self.policy
    local = jnp.maximum(length - p.sink_tokens, 0)
    return jnp.maximum(0, -((p.window - local) // p.block_size))

  def select(self, q_BTHK, positions, segment_ids, *, mask: Mask = Mask(causal=True)):
    """The stored blocks each query attends: [B, t, Hkv, min(top_k, N)] block indices, best
    first (see the module docstring for the score). q [B, t, Hq, D]; positions, segment_ids
    [B, t] int; ``mask`` causal."""
    positions, segment_ids = self._check_queries("BlockMemoryKVCache.select", q_BTHK, positions,
                                                 segment_ids, mask)
    b, t, h, d = q_BTHK.shape
    g = self.rep_keys.shape[3]
    q_BTGD = q_BTHK.astype(jnp.float32).reshape(b, t, g, h // g, d).sum(3)
    s = jnp.einsum("btgd,bnrgd->btgnr", q_BTGD, self.rep_keys.astype(jnp.float32))
    rep_pos, rep_seg = (x.transpose(0, 3, 1, 2)[:, None] for x in
                        (self.rep_positions, self.rep_segment_ids))  # [B, 1, G, N, R]
    q_pos, q_seg = (x[:, :, None, None, None] for x in (positions, segment_ids))
    ok = mask.allowed(q_pos, rep_pos) & (q_seg == rep_seg)
    score_BTGN = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1)
    return lax.top_k(score_BTGN, min(self.policy.top_k, self.num_blocks))[1]

  def attend(self, q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, *, mask: Mask | None = None,
             scale: float | None = None, logits_soft_cap: float | None = None,
             implementation: str | None = None):
    """Attention of t >= 1 new queries over the memory and the new tokens; -> (out, cache).

    q [B, t, Hq, D], k [B, t, Hkv, D], v [B, t, Hkv, Dv] (rotated as the layer caches them);
    positions, segment_ids [B, t] int. ``mask`` must be causal (empty slots rely on it; default
    ``Mask(causal=True)``); ``scale``, ``logits_soft_cap`` and ``implementation`` go to the
    attention op. out [B, t, Hq, Dv] in q's dtype.
    """
    mask = Mask(causal=True) if mask is None else mask
    positions, segment_ids = self._check(q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, mask)
    scale = q_BTHK.shape[-1] ** -0.5 if scale is None else scale
    common = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                  implementation=implementation, return_lse=True)
    dtype = self.window.keys.dtype
    new = Slots(keys=k_BTGK.astype(dtype), values=v_BTGK.astype(dtype), positions=positions,
                segment_ids=segment_ids)
    near = Slots(*(jnp.concatenate([a, b], axis=1) for a, b in
                   zip(self.sinks.fields(), self.window.fields())))
    near = Slots(*(jnp.concatenate([a, b], axis=1) for a, b in zip(near.fields(), new.fields())))
    partials = [attention(q_BTHK, near.keys.astype(q_BTHK.dtype),
                          near.values.astype(q_BTHK.dtype), q_positions=positions,
                          kv_positions=near.positions, q_segment_ids=segment_ids,
                          kv_segment_ids=near.segment_ids, **common),
                self._far(q_BTHK, positions, segment_ids, **common)]
    out_BTHK, lse_BHT = merge(partials)
    local = Slots(*(x[:, self.sinks.keys.shape[1]:] for x in near.fields()))
    received_BSG = received_attention(q_BTHK, local, positions, segment_ids, lse_BHT, mask,
                                      scale, logits_soft_cap)
    cache = self._write(new, received_BSG)
    overflow = self.stored_blocks(cache.length) > self.num_blocks
    return jnp.where(overflow, jnp.nan, out_BTHK), cache

  def _check_queries(self, owner, q, positions, segment_ids, mask):
    """q, positions, segment_ids and mask checked against the cache; -> [B, t] int32 arrays."""
    checks.float_array(owner, "q", q, rank=4)
    b, t, h, d = q.shape
    cache_b, _, g, cache_d = self.window.keys.shape
    if (b, d) != (cache_b, cache_d) or h % g:
      raise ValueError(f"{owner}: q must be [B, t, Hq, D] with the cache's B={cache_b} and "
                       f"D={cache_d}, and Hq a multiple of its Hkv={g}, got {q.shape}")
    positions = checks.token_array(owner, "positions", positions, b, t)
    segment_ids = checks.token_array(owner, "segment_ids", segment_ids, b, t)
    if positions is None or segment_ids is None:
      raise ValueError(f"{owner}: positions and segment_ids are required, got "
                       f"{'None' if positions is None else 'an array'} and "
                       f"{'None' if segment_ids is None else 'an array'}")
    if not isinstance(mask, Mask) or not mask.causal:
      raise ValueError(f"{owner}: mask must be a causal Mask (empty slots are hidden by "
                       f"causality), got {mask!r}")
    return jnp.asarray(positions), jnp.asarray(segment_ids)

  def _check(self, q, k, v, positions, segment_ids, mask):
    owner = "BlockMemoryKVCache.attend"
    positions, segment_ids = self._check_queries(owner, q, positions, segment_ids, mask)
    for name, x in (("k", k), ("v", v)):
      checks.float_array(owner, name, x, rank=4)
    b, t, _, d = q.shape
    g = self.window.keys.shape[2]
    if k.shape != (b, t, g, d) or v.shape != (b, t, g, self.window.values.shape[3]):
      raise ValueError(f"{owner}: k and v must be [B, t, Hkv, D] = {(b, t, g, d)} to match q "
                       f"and the cache, got k {k.shape} and v {v.shape}")
    if not isinstance(self.length, jax.core.Tracer):
      after = int(self.stored_blocks(int(self.length) + t))
      if after > self.num_blocks:
        raise ValueError(f"{owner}: writing {t} tokens after {int(self.length)} needs {after} "
                         f"stored blocks, the cache holds {self.num_blocks}; create it with a "
                         f"larger max_length")
    return positions, segment_ids

  def _far(self, q_BTHK, positions, segment_ids, **common):
    """Attention over each query's selected blocks: one row per (token, KV head)."""
    b, t, h, d = q_BTHK.shape
    g, bs = self.blocks.keys.shape[3], self.policy.block_size
    picked_BTGK = self.select(q_BTHK, positions, segment_ids, mask=common["mask"])
    k = picked_BTGK.shape[-1]
    rows = jnp.arange(b)[:, None, None, None]
    heads = jnp.arange(g)[None, None, :, None]
    n = b * t * g

    def gather(x):  # [B, N, bs, G, D] -> [B*t*G, k*bs, 1, D]
      x = x[rows, picked_BTGK, :, heads]
      return x.reshape(n, k * bs, 1, x.shape[-1]).astype(q_BTHK.dtype)

    def tokens(x):  # [B, N, bs] -> [B*t*G, k*bs]
      return x[rows, picked_BTGK].reshape(n, k * bs)

    def per_query(x):  # [B, t] -> [B*t*G, 1]
      return jnp.broadcast_to(x[:, :, None], (b, t, g)).reshape(n, 1)

    out, lse = attention(q_BTHK.reshape(n, 1, h // g, d), gather(self.blocks.keys),
                         gather(self.blocks.values), q_positions=per_query(positions),
                         kv_positions=tokens(self.blocks.positions),
                         q_segment_ids=per_query(segment_ids),
                         kv_segment_ids=tokens(self.blocks.segment_ids), **common)
    return out.reshape(b, t, h, out.shape[-1]), lse.reshape(b, t, h).transpose(0, 2, 1)

  def _write(self, new: Slots, received_BSG) -> BlockMemoryKVCache:
    """The cache after ``new`` (t tokens): sinks filled, blocks evicted, the window moved on."""
    p = self.policy
    sinks, w, bs = p.sink_tokens, p.window, p.block_size
    b, t = new.positions.shape
    length = self.length
    old_local = jnp.maximum(length - sinks, 0)
    new_local = jnp.maximum(length + t - sinks, 0)
    old_blocks, new_blocks = self.stored_blocks(length), self.stored_blocks(length + t)
    rows = jnp.arange(b)[:, None]
    # Local tokens come from the window as it was (indices [0, w)) or from the chunk.
    source = Slots(*(jnp.concatenate([a, c], axis=1) for a, c in
                     zip(self.window.fields(), new.fields())))
    scores_BSG = jnp.concatenate([self.window_scores, jnp.zeros((b, t, received_BSG.shape[2]),
                                                                jnp.float32)], 1) + received_BSG

    def index(m):  # local token -> index into the source
      at = jnp.where(m < old_local, m % w, w + m + sinks - length)
      return jnp.clip(at, 0, w + t - 1)

    # Blocks evicted by this chunk: at most ceil(t / bs).
    evicted = old_blocks + jnp.arange(min(-(-t // bs), self.num_blocks))
    at = index(evicted[:, None] * bs + jnp.arange(bs))  # [n, bs]
    block = Slots(*(x[:, at] for x in source.fields()))  # [B, n, bs, ...]
    top_BNGR = lax.top_k(scores_BSG[:, at].transpose(0, 1, 3, 2), p.representatives)[1]
    i = jnp.arange(evicted.size)[None, :, None, None]
    heads = jnp.arange(block.keys.shape[3])[None, None, :, None]
    rep_keys = block.keys[rows[:, :, None, None], i, top_BNGR, heads].transpose(0, 1, 3, 2, 4)
    rep_positions, rep_segment_ids = (
        x[rows[:, :, None, None], i, top_BNGR].transpose(0, 1, 3, 2)
        for x in (block.positions, block.segment_ids))
    target = jnp.where(evicted < new_blocks, evicted, self.num_blocks)  # out of range: dropped

    def store(buffer, x):
      return buffer.at[:, target].set(x.astype(buffer.dtype), mode="drop")

    # Window slot s holds the latest local token m = s (mod w), if it is not in the store.
    m = new_local - 1 - (new_local - 1 - jnp.arange(w)) % w
    kept = m >= new_blocks * bs
    empty = Slots.empty((b, w), *self.window.keys.shape[2:], self.window.keys.dtype)

    def move(x, blank):
      taken = x[:, index(m)]
      return jnp.where(kept.reshape((1, w) + (1,) * (x.ndim - 2)), taken, blank)

    # Sink slot i holds the i-th token written.
    chunk_at = jnp.arange(sinks) - length
    from_chunk = (chunk_at >= 0) & (chunk_at < t)

    def sink(old, x):
      taken = x[:, jnp.clip(chunk_at, 0, t - 1)].astype(old.dtype)
      return jnp.where(from_chunk.reshape((1, sinks) + (1,) * (old.ndim - 2)), taken, old)

    return self.replace(
        sinks=Slots(*(sink(o, x) for o, x in zip(self.sinks.fields(), new.fields()))),
        window=Slots(*(move(x, e) for x, e in zip(source.fields(), empty.fields()))),
        window_scores=move(scores_BSG, 0.0),
        blocks=Slots(*(store(o, x) for o, x in zip(self.blocks.fields(), block.fields()))),
        rep_keys=store(self.rep_keys, rep_keys),
        rep_positions=store(self.rep_positions, rep_positions),
        rep_segment_ids=store(self.rep_segment_ids, rep_segment_ids),
        length=length + t)


def received_attention(q_BTHK, local: Slots, positions, segment_ids, lse_BHT, mask, scale, cap):
  """Attention weight each local key receives from the queries, summed per KV head: [B, S, G]."""
  b, t, h, d = q_BTHK.shape
  g = local.keys.shape[2]
  q = q_BTHK.astype(jnp.float32).reshape(b, t, g, h // g, d)
  s = soft_cap(jnp.einsum("btgjd,bsgd->bgjts", q, local.keys.astype(jnp.float32)) * scale, cap)
  ok = allowed_pairs(mask, positions, local.positions, segment_ids, local.segment_ids)
  ok = ok[:, None, None]  # [B, 1, 1, t, S]
  lse = lse_BHT.reshape(b, g, h // g, t, 1)
  p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse, -jnp.inf)), 0.0)
  return p.sum(axis=(2, 3)).transpose(0, 2, 1)
