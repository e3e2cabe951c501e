"""Landmark attention mixer (Mohtashami & Jaggi, 2023): training by a grouped softmax over
blocks, inference by retrieving the top-k blocks of a block-slot cache.

Tokens follow the landmark layout of `lsm.data.landmarks`: with ``S = block_size + 1`` the token
at position ``p`` is a landmark iff ``p % S == block_size`` and sits in block ``p // S``.

Training (no cache, ``top_k=None``): `lsm.kernels.attention.landmark_attention` over every
earlier block of the document (packed documents allowed).

Inference (a `LandmarkCache`, or the forward with ``top_k`` set): each query, per query head,

1. scores the landmarks of the complete earlier blocks of its document and keeps the ``top_k``
   best (all of them when ``top_k`` is None; fewer where fewer exist; ties: the lower block);
2. attends over its own block (causally) as one partial ``(out, lse)``, and over each kept
   block as another: the softmax over the block's regular tokens, with ``lse`` := the logit of
   the block's landmark, so that the landmark's share of the merged softmax is spread over its
   block exactly as in training;
3. merges the partials with `lsm.kernels.attention.merge`.

The cache holds raw (pre-RoPE) keys, so retrieved blocks can be rotated at either position:

- ``positions="stored"``: every key and landmark at the position it was written at.
- ``positions="renumbered"``: the kept blocks, in their original order, are placed contiguously
  right before the query's own block: with k kept-block slots sorted by block index (slots of
  blocks not found first), slot ``r`` starts at position ``(block(i) - k + r) * S``; their tokens
  *and* their landmark (whose logit is the partial's lse) are rotated there. For *selection*
  every landmark is scored as if it sat right before the own block, at position
  ``block(i) * S - 1``, so the choice depends on content only, not on distance.

With ``top_k`` at least the number of earlier blocks both choices equal training mode for a
document laid out from position 0 without gaps. Per decoded token the cost is the landmark
scoring (linear in the number of blocks) plus ``top_k + 1`` blocks of attention.

Host memory (``cache_memory="host"``): the cache's keys and values (all but a few bytes per
token) live in the backend's pinned host memory; the landmark keys used for scoring, positions
and segment ids stay on the device. Writing a chunk and gathering the own and the retrieved
blocks run as host computations (`jax.experimental.compute_on`), and only the gathered blocks
move to the device, so device memory per step holds ``top_k + 1`` blocks per query instead of
the whole context. Needs a backend with a ``pinned_host`` memory kind (CPU, GPU and TPU in
current jaxlib); tested on CPU only.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax
from jax.experimental.compute_on import compute_on

from lsm.kernels.attention import merge
from lsm.kernels.attention.landmark import LANDMARK_IMPLEMENTATIONS, landmark_attention
from lsm.layers import checks
from lsm.layers.kv_cache import EMPTY_POSITION
from lsm.layers.projections import add_attention_projections
from lsm.layers.rope import RopeScaling, apply_rope

LANDMARK_POSITION_MODES = ("renumbered", "stored")
LANDMARK_CACHE_MEMORY = ("device", "host")  # where a LandmarkCache keeps its keys and values


def check_cache_memory(owner: str, name: str, memory) -> str:
  """``memory`` if it is one of LANDMARK_CACHE_MEMORY that this backend offers, else an error."""
  if memory not in LANDMARK_CACHE_MEMORY:
    raise ValueError(f"{owner}: {name} must be one of {LANDMARK_CACHE_MEMORY}, got {memory!r}")
  if memory == "host":
    kinds = sorted({m.kind for m in jax.devices()[0].addressable_memories()})
    if "pinned_host" not in kinds:
      raise ValueError(f"{owner}: {name}='host' needs a backend with a 'pinned_host' memory "
                       f"kind; {jax.default_backend()} offers {kinds}; use 'device'")
  return memory


def _concrete(x):
  """x as numpy when its values are known now (not traced), else None."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


@struct.dataclass
class LandmarkCache:
  """Every block of a document in its own slot: the token at position p lives in block slot
  ``p // S``, entry ``p % S`` (``S = block_size + 1``; entry ``block_size`` is the landmark).

  keys, values [B, NB, S, Hkv, D] raw (pre-RoPE) keys and values; positions, segment_ids
  [B, NB, S] int32 (``EMPTY_POSITION`` where nothing was written); landmarks [B, NB, Hkv, D]: the
  raw landmark key of each block, a compact copy for scoring. A block is complete once its
  landmark is written. A row holds one document at a time: writing a new document's tokens
  replaces the old one's slots (within one call a row's tokens must belong to one document).
  Positions outside ``[0, NB * S)`` are a ValueError when known at call time; under ``jit`` the
  outputs of those tokens are NaN.

  memory: "device", or "host": keys and values in pinned host memory, written and gathered by
  host computations (see the module docstring); the other arrays stay on the device.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  landmarks: jax.Array
  block_size: int = struct.field(pytree_node=False)
  memory: str = struct.field(pytree_node=False, default="device")

  @classmethod
  def create(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, block_size: int, memory: str = "device") -> LandmarkCache:
    owner = "LandmarkCache"
    batch_size = checks.positive_int(owner, "batch_size", batch_size)
    max_length = checks.positive_int(owner, "max_length", max_length)
    num_kv_heads = checks.positive_int(owner, "num_kv_heads", num_kv_heads)
    head_dim = checks.positive_int(owner, "head_dim", head_dim)
    block_size = checks.positive_int(owner, "block_size", block_size)
    dtype = checks.float_dtype(owner, "dtype", dtype)
    check_cache_memory(owner, "memory", memory)
    span = block_size + 1
    nb = -(-max_length // span)
    kv = jnp.zeros((batch_size, nb, span, num_kv_heads, head_dim), dtype)
    if memory == "host":
      kv = jax.device_put(kv, jax.memory.Space.Host)
    return cls(keys=kv, values=kv, memory=memory,
               positions=jnp.full((batch_size, nb, span), EMPTY_POSITION, jnp.int32),
               segment_ids=jnp.zeros((batch_size, nb, span), jnp.int32),
               landmarks=jnp.zeros((batch_size, nb, num_kv_heads, head_dim), dtype),
               block_size=block_size)

  @property
  def num_blocks(self) -> int:
    return self.keys.shape[1]

  @property
  def capacity(self) -> int:
    """Positions ``[0, capacity)`` fit."""
    return self.num_blocks * (self.block_size + 1)

  def _on_store(self):
    """Where computations on keys and values run: on the host when they live there."""
    return compute_on("device_host") if self.memory == "host" else contextlib.nullcontext()

  def _to_store(self, xs):
    """The arrays of the tuple xs moved to where keys and values live (slices kept)."""
    if self.memory != "host":
      return xs
    return tuple(jax.device_put(jnp.asarray(x), jax.memory.Space.Host)
                 if not isinstance(x, slice) else x for x in xs)

  def gather(self, index):
    """(keys, values) ``[index]`` (an index into [B, NB, S, Hkv, ...]) as device arrays."""
    index = self._to_store(index)
    with self._on_store():
      keys, values = self.keys[index], self.values[index]
    if self.memory == "host":
      keys, values = (jax.device_put(x, jax.memory.Space.Device) for x in (keys, values))
    return keys, values

  def landmark_positions(self):
    """[B, NB] the position of each block's landmark; ``EMPTY_POSITION`` if not complete."""
    return self.positions[:, :, self.block_size]

  def write(self, keys, values, positions, segment_ids) -> LandmarkCache:
    """The cache with the chunk's raw keys [B, t, Hkv, D], values, positions and ids written."""
    known = _concrete(positions)
    if known is not None and (known.min() < 0 or known.max() >= self.capacity):
      raise ValueError(f"LandmarkCache: positions must lie in [0, {self.capacity}) (max_length "
                       f"rounded up to whole blocks of {self.block_size + 1}), got positions "
                       f"from {known.min()} to {known.max()}; create the cache with a larger "
                       f"max_length")
    span = self.block_size + 1
    inside = (positions >= 0) & (positions < self.capacity)
    block = jnp.where(inside, positions // span, self.num_blocks)  # out of range: dropped
    entry = positions % span
    rows = jnp.arange(positions.shape[0])[:, None]

    def put(buffer, new, index=(block, entry), rows=rows):
      return buffer.at[(rows, *index)].set(new.astype(buffer.dtype), mode="drop")

    landmark_block = jnp.where(entry == self.block_size, block, self.num_blocks)
    where = self._to_store((rows, block, entry))
    keys, values = self._to_store((keys, values))
    with self._on_store():
      new_keys, new_values = (put(buffer, new, where[1:], where[0]) for buffer, new in (
          (self.keys, keys), (self.values, values)))
    return self.replace(keys=new_keys, values=new_values,
                        positions=put(self.positions, positions),
                        segment_ids=put(self.segment_ids, segment_ids),
                        landmarks=put(self.landmarks, keys, (landmark_block,)))


class LandmarkAttention(nnx.Module):
  """Causal landmark attention with GQA and RoPE (see the module docstring).

  Args:
    d_model, num_heads, num_kv_heads, head_dim, rope_base, rope_scaling, qk_norm, dtype,
      param_dtype: as `lsm.layers.Attention`.
    block_size: regular tokens per block (the data must carry landmarks in this layout:
      `lsm.data.insert_landmarks`).
    top_k: blocks retrieved per query and head at inference; None: every earlier block. With
      top_k set, the forward without a cache runs inference mode: a prefill into a fresh cache of
      T positions, so every row must then hold one document at positions in ``[0, T)``.
    positions: "renumbered" or "stored": where retrieved blocks are rotated.
    cache_memory: "device" or "host": where `init_cache` keeps the blocks' keys and values.
    implementation: of the training kernel, "reference", "xla" or "pallas" (None: "xla").
    query_chunk: queries processed at once (training kernel and cached calls), so memory grows
      linearly with the tokens of a call.
    rngs: parameter initialisation.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, block_size: int, top_k: int | None = None, positions: str = "renumbered",
               cache_memory: str = "device", rope_base: float = 10000.0, rope_scaling: RopeScaling = RopeScaling(),
               implementation: str | None = None, qk_norm: bool = False,
               query_chunk: int = 128, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    owner = "LandmarkAttention"
    self.d_model = checks.positive_int(owner, "d_model", d_model)
    self.num_heads = checks.positive_int(owner, "num_heads", num_heads)
    self.num_kv_heads = checks.positive_int(owner, "num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(f"{owner}: num_heads must be a multiple of num_kv_heads, got "
                       f"num_heads={num_heads} and num_kv_heads={num_kv_heads}")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"{owner}: d_model={d_model} is not a multiple of num_heads="
                         f"{num_heads}; give head_dim")
      head_dim = d_model // num_heads
    self.head_dim = checks.positive_int(owner, "head_dim", head_dim)
    if head_dim % 2:
      raise ValueError(f"{owner}: head_dim must be even (RoPE rotates pairs), got {head_dim}")
    self.block_size = checks.positive_int(owner, "block_size", block_size)
    self.top_k = checks.positive_int(owner, "top_k", top_k, allow_none=True)
    if positions not in LANDMARK_POSITION_MODES:
      raise ValueError(f"{owner}: positions must be one of {LANDMARK_POSITION_MODES}, got "
                       f"{positions!r}")
    self.retrieved_positions = positions
    self.cache_memory = check_cache_memory(owner, "cache_memory", cache_memory)
    self.rope_base = checks.positive_float(owner, "rope_base", rope_base)
    if not isinstance(rope_scaling, RopeScaling):
      raise TypeError(f"{owner}: rope_scaling must be a RopeScaling, got "
                      f"{type(rope_scaling).__name__}")
    self.rope_scaling = rope_scaling
    if implementation is not None and implementation not in LANDMARK_IMPLEMENTATIONS:
      raise ValueError(f"{owner}: implementation must be one of {LANDMARK_IMPLEMENTATIONS} or "
                       f"None, got {implementation!r}")
    self.implementation = implementation or "xla"
    self.query_chunk = checks.positive_int(owner, "query_chunk", query_chunk)
    self.dtype = checks.float_dtype(owner, "dtype", dtype)
    param_dtype = checks.float_dtype(owner, "param_dtype", param_dtype)

    add_attention_projections(self, d_model, num_heads, num_kv_heads, head_dim, qk_norm=qk_norm,
                              rngs=rngs, param_dtype=param_dtype)

  def init_cache(self, batch_size: int, max_length: int, dtype=None,
                 memory: str | None = None) -> LandmarkCache:
    """An empty cache for positions ``[0, max_length)`` (rounded up to whole blocks), its keys
    and values in ``memory`` (default: the layer's ``cache_memory``)."""
    owner = "LandmarkAttention.init_cache"
    max_length = checks.positive_int(owner, "max_length", max_length)
    if memory is not None:
      check_cache_memory(owner, "memory", memory)
    return LandmarkCache.create(batch_size, max_length, self.num_kv_heads, self.head_dim,
                                self.dtype if dtype is None else dtype,
                                block_size=self.block_size,
                                memory=self.cache_memory if memory is None else memory)

  def __call__(self, x_BTD, *, positions=None, segment_ids=None,
               cache: LandmarkCache | None = None):
    """x [B, T, D] -> y [B, T, D] in ``dtype`` (and the updated cache when one is given).

    positions: [B, T] or [T] integers in the landmark layout (default ``arange(T)``; required
      with a cache). segment_ids: [B, T] or [T]; tokens only see their own segment (with a cache,
      None means segment 0).
    """
    b, t, positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    if cache is None and self.top_k is None:
      q, k, v = self._project(x_BTD)
      q, k = (self._rope(z, positions) for z in (q, k))
      out = landmark_attention(q, k, v, block_size=self.block_size, positions=positions,
                               segment_ids=segment_ids, implementation=self.implementation,
                               query_chunk=self.query_chunk)
      return self._output(out)
    if cache is None:
      self._check_one_document(positions, segment_ids, t)
      y, _ = self._cached(x_BTD, positions, segment_ids, self.init_cache(b, t))
      return y
    return self._cached(x_BTD, positions, segment_ids, cache)

  def select_blocks(self, x_BTD, *, positions, segment_ids=None, cache: LandmarkCache):
    """The retrieval of a cached call, for inspection: the chunk x is written into (a copy of)
    the cache, then returns ``(blocks, scores)``: blocks [B, t, Hq, k] int32, the kept blocks of
    each query and head in ascending order (-1 in the first slots where fewer exist), and the
    float32 selection scores [B, t, Hq, NB] (-inf for blocks not eligible)."""
    _, _, positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    q_raw, k_raw, v = self._project(x_BTD)
    cache = cache.write(k_raw, v, positions, segment_ids)
    scores = self._landmark_scores(q_raw, positions, segment_ids, cache)
    return self._top_blocks(scores, cache.num_blocks), scores

  # ------------------------------------------------------------------------------- internals

  def _check_call(self, x_BTD, positions, segment_ids, cache):
    owner = "LandmarkAttention"
    checks.float_array(owner, "x", x_BTD, rank=3, last_dim=self.d_model)
    b, t, _ = x_BTD.shape
    positions = checks.token_array(owner, "positions", positions, b, t)
    segment_ids = checks.token_array(owner, "segment_ids", segment_ids, b, t)
    if cache is not None:
      self._check_cache(cache, b)
      if positions is None:
        raise ValueError(f"{owner}: positions are required with a cache (the positions of the "
                         f"t new tokens), got None")
    if positions is None:
      positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    if segment_ids is None:
      segment_ids = np.zeros((b, t), np.int32)
    return b, t, jnp.asarray(positions), jnp.asarray(segment_ids)

  def _check_cache(self, cache, batch_size):
    if not isinstance(cache, LandmarkCache):
      raise TypeError(f"LandmarkAttention: cache must be a LandmarkCache (from init_cache), got "
                      f"{type(cache).__name__}")
    expected = (batch_size, self.num_kv_heads, self.head_dim)
    got = (cache.keys.shape[0], *cache.keys.shape[3:])
    if got != expected:
      raise ValueError(f"LandmarkAttention: cache must have (batch, kv heads, head dim) = "
                       f"{expected} to match x and the layer, got {got}")
    if cache.block_size != self.block_size:
      raise ValueError(f"LandmarkAttention: cache must have the layer's block_size="
                       f"{self.block_size}, got block_size={cache.block_size}")

  def _check_one_document(self, positions, segment_ids, t):
    segments, known = _concrete(segment_ids), _concrete(positions)
    if segments is not None and np.any(segments != segments[:, :1]):
      raise ValueError("LandmarkAttention: with top_k set the forward is a prefill into a fresh "
                       "cache and each row must hold one document, got segment_ids that change "
                       "within a row")
    if known is not None and (known.min() < 0 or known.max() >= t):
      raise ValueError(f"LandmarkAttention: with top_k set the forward is a prefill into a fresh "
                       f"cache of {t} positions; positions must lie in [0, {t}), got "
                       f"{known.min()} to {known.max()}")

  def _project(self, x_BTD):
    x_BTD = x_BTD.astype(self.dtype)
    q, k, v = (jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(self.dtype))
               for w in (self.query, self.key, self.value))
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    return q, k, v

  def _output(self, out_BTHK):
    return jnp.einsum("bthk,hkd->btd", out_BTHK.astype(self.dtype),
                      self.out[...].astype(self.dtype))

  def _rope(self, x, positions):
    """RoPE of x [..., L, H, D] at positions [..., L] (any leading dims)."""
    lead, (length, heads, dim) = x.shape[:-3], x.shape[-3:]
    rows = int(np.prod(lead, dtype=np.int64))
    flat = apply_rope(x.reshape(rows, length, heads, dim),
                      jnp.broadcast_to(positions, lead + (length,)).reshape(rows, length),
                      base=self.rope_base, scaling=self.rope_scaling)
    return flat.reshape(x.shape)

  def _landmark_scores(self, q_raw, positions, segment_ids, cache):
    """[B, t, Hq, NB] float32 selection scores of the eligible blocks, -inf elsewhere."""
    b, t, hq, d = q_raw.shape
    g = hq // self.num_kv_heads
    span = self.block_size + 1
    landmark_pos = cache.landmark_positions()  # [B, NB]
    if self.retrieved_positions == "stored":
      q = self._rope(q_raw, positions)
      marks = self._rope(cache.landmarks, landmark_pos)
    else:  # each landmark right before the own block: only the query's offset in it matters
      q = self._rope(q_raw, positions % span + 1)
      marks = self._rope(cache.landmarks, jnp.zeros_like(landmark_pos))
    scores = jnp.einsum("btkgd,bnkd->btkgn",
                        q.reshape(b, t, self.num_kv_heads, g, d).astype(jnp.float32),
                        marks.astype(jnp.float32)) * d ** -0.5
    blocks = jnp.arange(cache.num_blocks)
    landmark_seg = cache.segment_ids[:, :, self.block_size]
    eligible = ((landmark_pos != EMPTY_POSITION)[:, None, :]
                & (blocks < (positions // span)[:, :, None])
                & (landmark_seg[:, None, :] == segment_ids[:, :, None]))
    return jnp.where(eligible[:, :, None, None], scores, -jnp.inf).reshape(b, t, hq, -1)

  def _top_blocks(self, scores, num_blocks):
    k = num_blocks if self.top_k is None else min(self.top_k, num_blocks)
    best, index = lax.top_k(scores, k)
    return jnp.sort(jnp.where(best > -jnp.inf, index, -1), axis=-1).astype(jnp.int32)

  def _cached(self, x_BTD, positions, segment_ids, cache):
    q_raw, k_raw, v = self._project(x_BTD)
    cache = cache.write(k_raw, v, positions, segment_ids)
    attend = jax.checkpoint(lambda q, p, s: self._attend(q, p, s, cache))
    out = _in_chunks(attend, (q_raw, positions, segment_ids), self.query_chunk)
    inside = (positions >= 0) & (positions < cache.capacity)
    out = jnp.where(inside[:, :, None, None], out, jnp.nan)
    return self._output(out), cache

  def _attend(self, q_raw, positions, segment_ids, cache):
    """float32 out [B, t, Hq, Dv] of queries over a cache that holds them already."""
    blocks = self._top_blocks(self._landmark_scores(q_raw, positions, segment_ids, cache),
                              cache.num_blocks)
    q = self._rope(q_raw, positions)
    partials = [self._own_block(q, positions, segment_ids, cache),
                *self._retrieved(q, blocks, positions, segment_ids, cache)]
    out, _ = merge(partials)
    return out

  def _own_block(self, q, positions, segment_ids, cache):
    """(out [B, t, Hq, Dv] float32, lse [B, Hq, t]) over the query's own block, causally."""
    b, t, hq, d = q.shape
    g = hq // self.num_kv_heads
    rows = jnp.arange(b)[:, None]
    block = jnp.clip(positions // (self.block_size + 1), 0, cache.num_blocks - 1)
    key_pos, key_seg = cache.positions[rows, block], cache.segment_ids[rows, block]  # [B, t, S]
    keys, values = cache.gather((rows, block))  # [B, t, S, Hkv, D]
    keys = self._rope(keys, key_pos)
    logits = jnp.einsum("btkgd,btskd->btkgs",
                        q.reshape(b, t, self.num_kv_heads, g, d).astype(jnp.float32),
                        keys.astype(jnp.float32)) * d ** -0.5
    visible = (key_pos <= positions[:, :, None]) & (key_seg == segment_ids[:, :, None])
    out, lse = _softmax_partial(logits, visible[:, :, None, None, :])
    out = jnp.einsum("btkgs,btskd->btkgd", out, values.astype(jnp.float32))
    return out.reshape(b, t, hq, -1), lse.reshape(b, t, hq).transpose(0, 2, 1)

  def _retrieved(self, q, blocks, positions, segment_ids, cache):
    """One partial per kept-block slot: the softmax over the block's regular tokens, with lse
    the logit of its landmark (-inf for an empty slot)."""
    b, t, hq, d = q.shape
    k = blocks.shape[-1]
    span = self.block_size + 1
    taken = blocks >= 0
    index = (jnp.arange(b)[:, None, None, None], jnp.maximum(blocks, 0), slice(None),
             (jnp.arange(hq) // (hq // self.num_kv_heads))[None, None, :, None])
    keys, values = cache.gather(index)  # [B, t, Hq, k, S, D]
    stored_pos = cache.positions[index[:2]]  # [B, t, Hq, k, S]
    written = (stored_pos != EMPTY_POSITION) & (
        cache.segment_ids[index[:2]] == segment_ids[:, :, None, None, None])
    if self.retrieved_positions == "stored":
      key_pos = stored_pos
    else:
      start = (positions // span)[:, :, None, None] - k + jnp.arange(k)
      key_pos = (start * span)[..., None] + jnp.arange(span)
      key_pos = jnp.broadcast_to(key_pos, (b, t, hq, k, span))
    keys = self._rope(keys.reshape(b, t, hq * k, span, 1, d), key_pos.reshape(b, t, hq * k, span))
    logits = jnp.einsum("bthd,bthrsd->bthrs", q.astype(jnp.float32),
                        keys.reshape(b, t, hq, k, span, d).astype(jnp.float32)) * d ** -0.5
    regular = (jnp.arange(span) < self.block_size) & taken[..., None] & written
    out, _ = _softmax_partial(logits, regular)
    out = jnp.einsum("bthrs,bthrsd->bthrd", out, values.astype(jnp.float32))
    lse = jnp.where(taken, logits[..., self.block_size], -jnp.inf).transpose(0, 2, 1, 3)
    return [(out[:, :, :, r], lse[..., r]) for r in range(k)]


def _in_chunks(fn, xs, chunk: int):
  """``fn(*xs)`` for arrays xs [B, t, ...], ``chunk`` tokens at a time (`lax.map`)."""
  t = xs[0].shape[1]
  if t <= chunk:
    return fn(*xs)
  n = -(-t // chunk)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[:1] + (n, chunk) + x.shape[2:]), 1, 0)

  out = lax.map(lambda args: fn(*args), tuple(split(x) for x in xs))
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(out.shape[:1] + (n * chunk,) + out.shape[3:])[:, :t]


def _softmax_partial(logits, visible):
  """(softmax weights, lse) over the last axis of the visible entries; rows that see nothing get
  weights 0 and lse -inf, with finite gradients."""
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  e = jnp.where(visible, jnp.exp(jnp.where(visible, logits, 0.0) - row_max), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  lse = jnp.where(denom > 0, row_max + jnp.log(safe), -jnp.inf)[..., 0]
  return e / safe, lse
