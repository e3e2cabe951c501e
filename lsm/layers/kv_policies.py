"""Fixed-budget KV caches for decoding any attention model, chosen in the generate config.

Each policy stores at most a fixed number of tokens per sequence (per KV head), however long the
stream; a call with t new tokens attends exactly over what is stored plus those t tokens, then
keeps at most the budget of them:

- `SinkWindowPolicy` (StreamingLLM, Xiao et al. 2023): the first ``sink_tokens`` and the last
  ``window`` tokens — a `RingKVCache` of ``sink_tokens + window`` slots, read with the mask
  ``Mask(causal, window=(window, 0), sink_tokens)`` on true positions, or with the sinks'
  positions renumbered within the cache (``positions="renumbered"``, as StreamingLLM does).
- `HeavyHitterPolicy` (H2O, Zhang et al. 2023; Keyformer-style accumulated scores): every stored
  token accumulates the attention probability it receives (summed over the queries of each call
  and the query heads of its KV head); when more than ``budget`` tokens are held, the non-recent
  ones with the lowest accumulated score leave (the last ``recent`` tokens written always stay;
  ties: the older leaves). Per KV head: each head keeps its own tokens.
- `SnapKVPolicy` (SnapKV, Li et al. 2024): at the first call on an empty cache (the prefill,
  which must hold the whole prompt: ``prefill_chunk >= prompt length``), each prompt key is
  scored by the attention the last ``observation_window`` prompt queries give it (summed over
  them and the group's query heads), max-pooled over neighbouring keys (``pool_kernel``); the
  ``budget - observation_window`` best keys stay, plus the observation window. Tokens written
  later form a window: the last ``observation_window`` tokens always stay, and a token that ages
  out of it leaves before any selected prompt key. Per KV head.

- `BlockSelectPolicy` (Quest, Tang et al. 2024): every token is stored (a dense cache); a
  prefill chunk attends densely, and each single-token decoding step attends only its
  ``sink_blocks``, ``local_blocks`` and the ``top_k`` cache blocks of ``block_size`` tokens with
  the highest Quest bound (`lsm.kernels.attention.select`) — a budget on what each step reads,
  ``(sink_blocks + local_blocks + top_k) * block_size`` keys, not on what is stored.

Keys are stored as the layer caches them (rotated at their true positions); positions are never
renumbered, except by a `SinkWindowPolicy` with ``positions="renumbered"`` (its docstring).
`ScoredKVCache` holds the last two; each stores ``budget`` slots per KV head, and a call of t
tokens attends at most ``budget + t`` keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from lsm.kernels.attention import Mask, attention
from lsm.kernels.attention.select import block_select_decode
from lsm.layers import checks
from lsm.layers.block_memory import Slots, received_attention
from lsm.layers.kv_cache import EMPTY_POSITION, DenseKVCache


def _count(owner, name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    allowed = "a positive int" if low == 1 else f"an int >= {low}"
    raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class SinkWindowPolicy:
  """Keep the first ``sink_tokens`` and the last ``window`` tokens (StreamingLLM).

  ``positions``: ``"stored"`` reads every kept key at its true position; ``"renumbered"`` reads
  them at their positions within the cache, as StreamingLLM does: the window keeps its true
  distances from the query, and a query at position ``p`` sees the sinks as if it stood at
  ``min(p, sink_tokens + window)`` — so a sink is never further than ``sink_tokens + window``
  positions away, however long the stream (RoPE distances stay within what training saw).
  """

  sink_tokens: int = 4
  window: int = 1024
  positions: str = "stored"

  def __post_init__(self):
    object.__setattr__(self, "sink_tokens",
                       _count("SinkWindowPolicy", "sink_tokens", self.sink_tokens, 0))
    object.__setattr__(self, "window", _count("SinkWindowPolicy", "window", self.window, 1))
    if self.positions not in ("stored", "renumbered"):
      raise ValueError(f"SinkWindowPolicy: positions must be 'stored' or 'renumbered', got "
                       f"{self.positions!r}")

  @property
  def budget(self) -> int:
    return self.sink_tokens + self.window

  def mask(self) -> Mask:
    return Mask(causal=True, window=(self.window, 0), sink_tokens=self.sink_tokens or None)


@dataclasses.dataclass(frozen=True)
class HeavyHitterPolicy:
  """Keep the ``budget`` tokens with the most accumulated attention, the last ``recent``
  always (H2O)."""

  budget: int = 1024
  recent: int = 128

  def __post_init__(self):
    owner = "HeavyHitterPolicy"
    object.__setattr__(self, "budget", _count(owner, "budget", self.budget, 1))
    object.__setattr__(self, "recent", _count(owner, "recent", self.recent, 0))
    if self.recent > self.budget:
      raise ValueError(f"{owner}: recent must be <= budget={self.budget}, got {self.recent}")


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy:
  """Compress the prompt to its ``budget`` best keys by observation-window attention (SnapKV)."""

  budget: int = 1024
  observation_window: int = 32
  pool_kernel: int = 7

  def __post_init__(self):
    owner = "SnapKVPolicy"
    object.__setattr__(self, "budget", _count(owner, "budget", self.budget, 1))
    object.__setattr__(self, "observation_window",
                       _count(owner, "observation_window", self.observation_window, 1))
    object.__setattr__(self, "pool_kernel", _count(owner, "pool_kernel", self.pool_kernel, 1))
    if self.observation_window > self.budget:
      raise ValueError(f"{owner}: observation_window must be <= budget={self.budget}, got "
                       f"{self.observation_window}")
    if self.pool_kernel % 2 == 0:
      raise ValueError(f"{owner}: pool_kernel must be odd (a window centred on each key), got "
                       f"{self.pool_kernel}")


@dataclasses.dataclass(frozen=True)
class BlockSelectPolicy:
  """Decode over the ``top_k`` best cache blocks plus sinks and the local block (Quest)."""

  block_size: int = 16
  top_k: int = 4
  sink_blocks: int = 1
  local_blocks: int = 1

  def __post_init__(self):
    owner = "BlockSelectPolicy"
    for name, low in (("block_size", 1), ("top_k", 0), ("sink_blocks", 0), ("local_blocks", 1)):
      object.__setattr__(self, name, _count(owner, name, getattr(self, name), low))

  @property
  def budget(self) -> int:
    """Keys one decoding step attends at most."""
    return (self.sink_blocks + self.local_blocks + self.top_k) * self.block_size


BUDGET_POLICIES = (SinkWindowPolicy, HeavyHitterPolicy, SnapKVPolicy, BlockSelectPolicy)


@struct.dataclass
class SelectKVCache:
  """A `DenseKVCache` read by block selection on single-token steps (`BlockSelectPolicy`)."""

  dense: DenseKVCache
  policy: BlockSelectPolicy = struct.field(pytree_node=False)

  @property
  def keys(self):
    return self.dense.keys

  def attend(self, q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, *, mask: Mask | None = None,
             scale: float | None = None, logits_soft_cap: float | None = None,
             implementation: str | None = None):
    """Writes the t new tokens, then attends: densely for t > 1, by selection for t == 1."""
    mask = Mask(causal=True) if mask is None else mask
    (keys, values, kv_pos, kv_seg), dense = self.dense.append(k_BTGK, v_BTGK, positions,
                                                              segment_ids)
    keys, values = keys.astype(q_BTHK.dtype), values.astype(q_BTHK.dtype)
    common = dict(scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation)
    if q_BTHK.shape[1] > 1:
      out = attention(q_BTHK, keys, values, mask=mask, q_positions=positions,
                      kv_positions=kv_pos, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
                      **common)
    else:
      p = self.policy
      out = block_select_decode(q_BTHK, keys, values, q_positions=positions,
                                cache_positions=kv_pos, q_segment_ids=segment_ids,
                                cache_segment_ids=kv_seg, block_size=p.block_size, top_k=p.top_k,
                                sink_blocks=p.sink_blocks, local_blocks=p.local_blocks, **common)
    return out, self.replace(dense=dense)


@struct.dataclass
class ScoredKVCache:
  """``budget`` slots per KV head, each with a score; see the module docstring.

  keys, values [B, S, Hkv, D]; positions, segment_ids, arrival [B, S, Hkv] int32 (arrival: the
  running count of tokens written to the row when this one was; empty slots have position
  ``EMPTY_POSITION``, which the causal mask hides); scores [B, S, Hkv] float32; written [B]
  int32 tokens written so far.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  arrival: jax.Array
  scores: jax.Array
  written: jax.Array
  policy: HeavyHitterPolicy | SnapKVPolicy = struct.field(pytree_node=False)

  @classmethod
  def create(cls, batch_size: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32, *,
             policy: HeavyHitterPolicy | SnapKVPolicy) -> ScoredKVCache:
    owner = "ScoredKVCache"
    if not isinstance(policy, (HeavyHitterPolicy, SnapKVPolicy)):
      raise TypeError(f"{owner}: policy must be a HeavyHitterPolicy or SnapKVPolicy, got "
                      f"{type(policy).__name__}")
    b = checks.positive_int(owner, "batch_size", batch_size)
    h = checks.positive_int(owner, "num_kv_heads", num_kv_heads)
    d = checks.positive_int(owner, "head_dim", head_dim)
    dtype = checks.float_dtype(owner, "dtype", dtype)
    slots = (b, policy.budget, h)
    kv = jnp.zeros(slots + (d,), dtype)
    return cls(keys=kv, values=kv, positions=jnp.full(slots, EMPTY_POSITION, jnp.int32),
               segment_ids=jnp.zeros(slots, jnp.int32), arrival=jnp.full(slots, -1, jnp.int32),
               scores=jnp.zeros(slots, jnp.float32), written=jnp.zeros((b,), jnp.int32),
               policy=policy)

  def held(self):
    """[B, Hkv] tokens held per row and KV head (never more than the budget)."""
    return jnp.sum(self.positions != EMPTY_POSITION, axis=1)

  def attend(self, q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, *, mask: Mask | None = None,
             scale: float | None = None, logits_soft_cap: float | None = None,
             implementation: str | None = None):
    """Attention of t >= 1 new queries over the stored tokens and the new ones; -> (out, cache).

    q [B, t, Hq, D], k [B, t, Hkv, D], v [B, t, Hkv, Dv]; positions, segment_ids [B, t].
    ``mask`` must be causal (default ``Mask(causal=True)``). out [B, t, Hq, Dv] in q's dtype.
    """
    mask = Mask(causal=True) if mask is None else mask
    if not mask.causal:
      raise ValueError("ScoredKVCache: mask must be causal (empty slots rely on it), got "
                       f"{mask!r}")
    b, t, hq, d = q_BTHK.shape
    hkv = k_BTGK.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    positions = jnp.asarray(positions, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)

    # KV heads fold into the batch: each head keeps its own tokens, so each has its own slots.
    def fold_q(x):  # [B, t, Hkv * G, ...] -> [B * Hkv, t, G, ...]
      x = x.reshape((b, t, hkv, g) + x.shape[3:])
      return jnp.moveaxis(x, 2, 1).reshape((b * hkv, t, g) + x.shape[4:])

    def fold_slots(x):  # [B, S, Hkv, ...] -> [B * Hkv, S, ...]
      return jnp.moveaxis(x, 2, 1).reshape((b * hkv,) + x.shape[1:2] + x.shape[3:])

    def per_head(x):  # [B, t] -> [B * Hkv, t]
      return jnp.repeat(x, hkv, axis=0)

    dtype = self.keys.dtype
    new_arrival = self.written[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, t]
    expand = lambda x: jnp.broadcast_to(x[:, :, None], (b, t, hkv))
    stored = (self.keys, self.values, self.positions, self.segment_ids, self.arrival, self.scores)
    fresh = (k_BTGK.astype(dtype), v_BTGK.astype(dtype), expand(positions), expand(segment_ids),
             expand(new_arrival), jnp.zeros((b, t, hkv), jnp.float32))
    keys, values, kv_pos, kv_seg, arrival, scores = (
        fold_slots(jnp.concatenate([old, new], axis=1)) for old, new in zip(stored, fresh))
    q = fold_q(q_BTHK)
    q_pos, q_seg = per_head(positions), per_head(segment_ids)
    out, lse = attention(q, keys[:, :, None].astype(q.dtype), values[:, :, None].astype(q.dtype),
                         mask=mask, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                         kv_segment_ids=kv_seg, scale=scale, logits_soft_cap=logits_soft_cap,
                         implementation=implementation, return_lse=True)
    visible = Slots(keys=keys[:, :, None], values=values[:, :, None], positions=kv_pos,
                    segment_ids=kv_seg)
    first = jnp.all(self.positions == EMPTY_POSITION, axis=(1, 2))  # [B]: nothing stored yet
    written = self.written + t
    policy = self.policy
    if isinstance(policy, HeavyHitterPolicy):
      scores = scores + received_attention(q, visible, q_pos, q_seg, lse, mask, scale,
                                           logits_soft_cap)[..., 0].astype(jnp.float32)
      recent = policy.recent
    else:
      w = policy.observation_window
      # The last w queries of the chunk (the prompt's observation window at the prefill).
      observed = received_attention(q[:, -w:], visible, q_pos[:, -w:], q_seg[:, -w:],
                                    lse[..., -w:], mask, scale, logits_soft_cap)[..., 0]
      observed = observed.astype(jnp.float32)
      pooled = _max_pool(observed, policy.pool_kernel, kv_pos != EMPTY_POSITION)
      # At the prefill the prompt's keys before the observation window get their pooled
      # scores; the window and every later token score -1, so once out of the window they
      # leave before any selected prompt key.
      in_window = arrival >= per_head(written)[:, None] - w
      later = jnp.concatenate([scores[:, :-t], jnp.full_like(scores[:, -t:], -1.0)], axis=1)
      scores = jnp.where(per_head(first)[:, None], jnp.where(in_window, -1.0, pooled), later)
      recent = w
    keep = _keep(kv_pos, arrival, scores, per_head(written)[:, None] - recent, policy.budget)

    def unfold(x):  # [B * Hkv, S, ...] -> [B, S, Hkv, ...]
      x = jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
      x = x.reshape((b, hkv) + x.shape[1:])
      return jnp.moveaxis(x, 1, 2)

    cache = self.replace(keys=unfold(keys), values=unfold(values), positions=unfold(kv_pos),
                         segment_ids=unfold(kv_seg), arrival=unfold(arrival),
                         scores=unfold(scores), written=written)
    out = out.reshape(b, hkv, t, g, -1)
    return jnp.moveaxis(out, 1, 2).reshape(b, t, hq, -1).astype(q_BTHK.dtype), cache


def _max_pool(x, kernel: int, valid):
  """Max over ``kernel`` neighbouring slots (centred) of x [N, S], among valid slots."""
  if kernel == 1:
    return jnp.where(valid, x, 0.0)
  x = jnp.where(valid, x, -jnp.inf)
  pooled = lax.reduce_window(x, -jnp.inf, lax.max, (1, kernel), (1, 1),
                             [(0, 0), (kernel // 2, kernel // 2)])
  return jnp.where(valid, pooled, 0.0)


def _keep(positions, arrival, scores, recent_from, budget: int):
  """[N, budget] slot indices to keep: occupied slots first, the recent ones (arrival >=
  recent_from) before the others, then by score (descending), then the newer first."""
  occupied = positions != EMPTY_POSITION
  tier = jnp.where(occupied, jnp.where(arrival >= recent_from, 2, 1), 0)
  # lexsort: the last key is the primary one; all ascending, so negate for "larger first".
  order = jax.vmap(lambda a, s, r: jnp.lexsort((-a, -s, -r)))(arrival, scores, tier)
  return order[:, :budget]
