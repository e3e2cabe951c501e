"""Key/value caches of the attention mixer: a dense one, and a ring buffer for sliding windows.

Both are pytrees holding each slot's key, value, position and segment id. The attention mask is
evaluated on positions, so the order of slots in memory does not matter, and an unused slot is
hidden by a position after every real one (``EMPTY_POSITION``), which the causal mask excludes.

``append(keys, values, positions, segment_ids)`` takes a chunk of t >= 1 new tokens and returns
what the chunk's queries attend over — ``(keys, values, positions, segment_ids)`` — and the
updated cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from lsm.kernels.attention.blocks import FAR_FUTURE
from lsm.layers import checks

# Masks take positions in (-2**30, 2**30); this one is after every real position.
EMPTY_POSITION = FAR_FUTURE


def _empty(owner, batch_size, length, num_kv_heads, head_dim, dtype):
  batch_size = checks.positive_int(owner, "batch_size", batch_size)
  num_kv_heads = checks.positive_int(owner, "num_kv_heads", num_kv_heads)
  head_dim = checks.positive_int(owner, "head_dim", head_dim)
  dtype = checks.float_dtype(owner, "dtype", dtype)
  kv = jnp.zeros((batch_size, length, num_kv_heads, head_dim), dtype)
  return dict(keys=kv, values=kv,
              positions=jnp.full((batch_size, length), EMPTY_POSITION, jnp.int32),
              segment_ids=jnp.zeros((batch_size, length), jnp.int32))


@struct.dataclass
class DenseKVCache:
  """Every token written so far, in order: slots ``[0, length)`` are filled.

  keys, values [B, max_length, Hkv, D]; positions, segment_ids [B, max_length] int32; length []
  int32. Writing past ``max_length`` is a ValueError when the fill count is known (eager calls);
  under ``jit`` it is not known while tracing, and an overflowing write turns the values written,
  and so the outputs that read them, into NaN.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> DenseKVCache:
    max_length = checks.positive_int("DenseKVCache", "max_length", max_length)
    return cls(**_empty("DenseKVCache", batch_size, max_length, num_kv_heads, head_dim, dtype),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.keys.shape[1]

  def append(self, keys, values, positions, segment_ids):
    t = keys.shape[1]
    if t > self.max_length or (not isinstance(self.length, jax.core.Tracer)
                               and int(self.length) + t > self.max_length):
      filled = "?" if isinstance(self.length, jax.core.Tracer) else int(self.length)
      raise ValueError(f"DenseKVCache: cannot write {t} tokens into a cache of max_length="
                       f"{self.max_length} with {filled} slots filled; create the cache with a "
                       f"larger max_length")
    overflow = self.length + t > self.max_length
    values = jnp.where(overflow, jnp.nan, values)

    def write(buffer, new):
      return lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), self.length, 1)

    cache = DenseKVCache(keys=write(self.keys, keys), values=write(self.values, values),
                         positions=write(self.positions, positions),
                         segment_ids=write(self.segment_ids, segment_ids),
                         length=self.length + t)
    return (cache.keys, cache.values, cache.positions, cache.segment_ids), cache


@struct.dataclass
class RingKVCache:
  """The sink tokens and the last ``window`` tokens: all that a causal window reaching
  ``window`` positions back, plus ``sink_tokens`` attention sinks, lets later queries see.

  keys, values [B, sink_tokens + window, Hkv, D]; positions, segment_ids [B, sink_tokens + window]
  int32. A token at position ``p < sink_tokens`` lives in slot ``p``, any other in slot
  ``sink_tokens + (p - sink_tokens) % window``; a chunk's queries attend over the ring as it was
  before the chunk plus the chunk itself, so chunks of any length are exact. Where several tokens
  of a chunk map to one slot (long chunks, packed documents), the last one in the chunk is kept.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  window: int = struct.field(pytree_node=False)
  sink_tokens: int = struct.field(pytree_node=False)
  # Read the sinks at cache-relative positions (`SinkWindowPolicy(positions="renumbered")`).
  renumber_sinks: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, batch_size: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32, *,
             window: int, sink_tokens: int = 0, renumber_sinks: bool = False) -> RingKVCache:
    window = checks.positive_int("RingKVCache", "window", window)
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, (int, np.integer)) or (
        sink_tokens < 0):
      raise ValueError(f"RingKVCache: sink_tokens must be a non-negative int, got "
                       f"{sink_tokens!r}")
    size = int(sink_tokens) + window
    return cls(**_empty("RingKVCache", batch_size, size, num_kv_heads, head_dim, dtype),
               window=window, sink_tokens=int(sink_tokens), renumber_sinks=bool(renumber_sinks))

  def slots(self, positions):
    """The ring slot of each position."""
    ring_slot = self.sink_tokens + (positions - self.sink_tokens) % self.window
    return jnp.where(positions < self.sink_tokens, positions, ring_slot)

  def append(self, keys, values, positions, segment_ids):
    visible = tuple(jnp.concatenate([old, new.astype(old.dtype)], axis=1) for old, new in
                    ((self.keys, keys), (self.values, values), (self.positions, positions),
                     (self.segment_ids, segment_ids)))
    b, t = keys.shape[:2]
    rows = jnp.arange(b)[:, None]
    # The chunk index of the last token written to each slot, -1 where none is.
    latest_BS = jnp.full(self.positions.shape, -1, jnp.int32).at[rows, self.slots(positions)].max(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    written_BS = latest_BS >= 0
    source_BS = jnp.maximum(latest_BS, 0)

    def write(buffer, new):
      taken = new[rows, source_BS].astype(buffer.dtype)
      return jnp.where(written_BS.reshape(written_BS.shape + (1,) * (buffer.ndim - 2)), taken,
                       buffer)

    cache = self.replace(keys=write(self.keys, keys), values=write(self.values, values),
                         positions=write(self.positions, positions),
                         segment_ids=write(self.segment_ids, segment_ids))
    return visible, cache
