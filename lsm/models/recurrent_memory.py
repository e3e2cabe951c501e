"""`RecurrentMemoryLM`: recurrent memory (RMT, Bulatov et al. 2022) around any layer pattern.

The sequence is cut into segments of ``S = model.recurrent_memory.segment_length`` tokens and the
segments run in order through the blocks of an `LM` backbone (any ``layer_pattern``). Each
segment is read as ``[read memory (M) | segment tokens (S) | write memory (M)]``, where
``M = model.recurrent_memory.slots`` and both memory blocks hold the memory carried into the
segment; the backbone's outputs at the write slots, after the final norm, are the next segment's
memory. The memory of the first segment is a learned ``[M, D]`` parameter. Logits come from the
segment tokens only.

Positions are local to a segment: read slots ``0..M-1``, tokens ``M..M+S-1``, write slots
``M+S..2M+S-1``; the positions given with the tokens only mark document starts.

Packed documents (``segment_ids`` / ``positions``):
- the memory entering a segment is reset to the learned initial memory when the segment's first
  token starts a document (its position is 0, or its segment id differs from the previous token's);
- the read slots carry the segment id of the segment's first token and the write slots that of its
  last token, so the mixers' own masking keeps a document that starts inside a segment from
  reading the previous document's memory;
- when a document starts inside a segment (first and last token ids differ), the write slots are
  fed the initial memory instead of the carried one, so the next memory depends on the new
  document only.
A new document's memory therefore never depends on earlier documents.

Truncated BPTT (``bptt_segments = k``): of a sequence of ``n`` segments, the memory transitions
into segments ``n-k .. n-1`` (the last ``k``) carry gradients; the memory passed from segment
``s-1`` into segment ``s < n-k`` is under `lax.stop_gradient`. The loss of the last segment thus
reaches the inputs of segments ``n-1-k .. n-1`` and nothing older. The learned initial memory
(at segment 0 and at document resets) always gets its gradient. ``None``: no transition is cut.

Training runs a `lax.scan` over segments with each segment rematerialised (`jax.checkpoint`), so
what the backward pass keeps per segment is its inputs and the carried memory.

Decoding keeps the memory, the backbone caches of the current segment (``2M + S`` slots, whatever
``max_length`` says) and the count of its tokens. Tokens are fed one at a time (a `lax.scan` over
the ``t`` given): the first token of a segment resets the backbone caches and prefills the read
slots (with the reset rule above); the segment's last token is followed by the write slots,
whose outputs become the memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

from lsm.layers import checks
from lsm.models.lm import LM

_OWNER = "RecurrentMemoryLM"


@struct.dataclass
class RecurrentMemoryCache:
  """Decoding state of a `RecurrentMemoryLM`.

  memory [B, M, D] (compute dtype): the memory the current segment read, or, between segments,
  the memory the next one will read. blocks: the backbone caches of the current segment.
  count [] int32: tokens of the current segment fed so far (0: the next token opens a segment).
  first_segment_ids, last_segment_ids [B] int32: segment ids of the current segment's first
  token and of the last token fed.
  """

  memory: jax.Array
  blocks: object
  count: jax.Array
  first_segment_ids: jax.Array
  last_segment_ids: jax.Array


class RecurrentMemoryLM(nnx.Module):
  """``logits = model(tokens[B, T], positions=..., segment_ids=...)`` (float32), ``T`` a multiple
  of ``model.recurrent_memory.segment_length``; the same interface as `LM`."""

  def __init__(self, config, *, vocab_size: int | None = None, rngs: nnx.Rngs):
    memory = config.recurrent_memory
    self.slots = _positive(memory.slots, "model.recurrent_memory.slots",
                           " (0 turns recurrent memory off: build an LM)")
    self.segment_length = _positive(memory.segment_length,
                                    "model.recurrent_memory.segment_length")
    self.bptt_segments = (None if memory.bptt_segments is None else
                          _positive(memory.bptt_segments, "model.recurrent_memory.bptt_segments",
                                    " or None"))
    self.backbone = LM(config, vocab_size=vocab_size, rngs=rngs)
    self.vocab_size = self.backbone.vocab_size
    self.dtype = jnp.dtype(config.dtype)
    # Unit RMS, like the final-normed write-slot outputs that replace it after segment 0.
    init = nnx.initializers.normal(stddev=1.0)
    self.memory = nnx.Param(
        init(rngs.params(), (self.slots, config.d_model), jnp.dtype(config.param_dtype)),
        out_sharding=(None, "embed"), eager_sharding=False)

  # ------------------------------------------------------------------------------- training

  def token_layout(self, length: int) -> tuple[str, int]:
    """Always ``("contiguous", 1)``: segments run in order, so the sequence axis cannot be
    sharded (ValueError under a mesh whose ``sequence`` axis has more than one device)."""
    shards = self.backbone.context_parallel.shards()
    if shards > 1:
      raise ValueError(f"{_OWNER}: model.recurrent_memory.slots={self.slots} runs the segments "
                       f"of a sequence in order and cannot shard the sequence axis (it spans "
                       f"{shards} devices); set parallel.sequence=1 or "
                       f"model.recurrent_memory.slots=0")
    self._check_length(length)
    return "contiguous", 1

  def initial_memory(self, batch_size: int):
    """The learned memory, [batch_size, M, D] in the compute dtype."""
    memory = self.memory[...].astype(self.dtype)
    return jnp.broadcast_to(memory, (batch_size, *memory.shape))

  def segment(self, memory, x_BSD, *, segment_ids):
    """One segment: ``(logits [B, S, V] float32, next memory [B, M, D])`` of the embedded tokens
    ``x_BSD`` reading ``memory [B, M, D]``; ``segment_ids`` [B, S] or [S]. No memory reset or
    gradient cut happens here (the scan over segments does those: see the module docstring)."""
    checks.float_array(_OWNER, "x", x_BSD, rank=3, last_dim=self.memory.shape[1])
    b, s, _ = x_BSD.shape
    checks.float_array(_OWNER, "memory", memory, rank=3, last_dim=self.memory.shape[1])
    if memory.shape[:2] != (b, self.slots):
      raise ValueError(f"{_OWNER}: memory must have shape [{b}, {self.slots}, ...] (batch, "
                       f"model.recurrent_memory.slots), got {tuple(memory.shape)}")
    seg_BS = jnp.asarray(checks.token_array(_OWNER, "segment_ids", segment_ids, b, s))
    m = self.slots
    first_B1, last_B1 = seg_BS[:, :1], seg_BS[:, -1:]
    memory = memory.astype(x_BSD.dtype)
    write = jnp.where((first_B1 == last_B1)[:, :, None], memory,
                      self.initial_memory(b).astype(x_BSD.dtype))
    x = jnp.concatenate([memory, x_BSD, write], axis=1)
    seg = jnp.concatenate([jnp.repeat(first_B1, m, 1), seg_BS, jnp.repeat(last_B1, m, 1)], 1)
    positions = np.broadcast_to(np.arange(2 * m + s, dtype=np.int32), (b, 2 * m + s))
    h, _ = self.backbone._run_blocks(x, positions, seg, None)
    return self.backbone._logits(h[:, m:m + s]), self._next_memory(h[:, m + s:])

  def __call__(self, tokens, *, positions=None, segment_ids=None):
    """Logits [B, T, V] (float32) of ``tokens [B, T]``."""
    _check_tokens(tokens)
    return self.from_embeddings(self.backbone.embed(tokens), positions=positions,
                                segment_ids=segment_ids)

  def from_embeddings(self, x_BTD, *, positions=None, segment_ids=None):
    """Logits [B, T, V] of already embedded tokens ``x_BTD`` (what `__call__` runs after the
    embedding lookup): the scan over segments."""
    checks.float_array(_OWNER, "x", x_BTD, rank=3, last_dim=self.memory.shape[1])
    b, t, d = x_BTD.shape
    self.token_layout(t)
    s = self.segment_length
    n = t // s
    pos_BT, seg_BT = _meta(positions, segment_ids, b, t)
    first_BN, last_BN = seg_BT[:, ::s], seg_BT[:, s - 1::s]
    previous_BN = jnp.concatenate([first_BN[:, :1], last_BN[:, :-1]], axis=1)
    reset_BN = (pos_BT[:, ::s] == 0) | (first_BN != previous_BN)
    reset_BN = reset_BN.at[:, 0].set(True)
    k = self.bptt_segments
    keep_N = np.arange(n) >= n - k if k is not None else np.ones(n, bool)
    xs = (x_BTD.reshape(b, n, s, d).swapaxes(0, 1), seg_BT.reshape(b, n, s).swapaxes(0, 1),
          reset_BN.T, jnp.asarray(keep_N))
    graphdef, state = nnx.split(self)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(state, memory, xs):
      model = nnx.merge(graphdef, state)
      x_BSD, seg_BS, reset_B, keep = xs
      memory = jnp.where(keep, memory, lax.stop_gradient(memory))
      memory = jnp.where(reset_B[:, None, None], model.initial_memory(b), memory)
      logits, memory = model.segment(memory, x_BSD, segment_ids=seg_BS)
      return memory, logits

    _, logits_NBSV = lax.scan(lambda memory, xs: body(state, memory, xs),
                              self.initial_memory(b).astype(x_BTD.dtype), xs)
    return logits_NBSV.swapaxes(0, 1).reshape(b, t, -1)

  # ------------------------------------------------------------------------------- decoding

  def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32,
                 policy=None) -> RecurrentMemoryCache:
    """An empty decoding state. The backbone caches hold one segment (``2M + S`` slots) however
    long the decoding runs; ``max_length`` is checked and otherwise unused. ``policy`` must be
    None (the memory already bounds the caches)."""
    batch_size = checks.positive_int(f"{_OWNER}.init_cache", "batch_size", batch_size)
    checks.positive_int(f"{_OWNER}.init_cache", "max_length", max_length)
    if policy is not None:
      raise ValueError(f"{_OWNER}.init_cache: policy must be None (decode.cache_policy=full): the "
                       f"recurrent memory bounds the caches to one segment already, got "
                       f"{type(policy).__name__}")
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return RecurrentMemoryCache(
        memory=self.initial_memory(batch_size),
        blocks=self.backbone.init_cache(batch_size, self._cache_length, dtype),
        count=jnp.zeros((), jnp.int32), first_segment_ids=zeros, last_segment_ids=zeros)

  def decode(self, tokens, *, positions, segment_ids=None, cache: RecurrentMemoryCache):
    """(logits [B, t, V], cache) for ``tokens [B, t]`` (t >= 1) appended to the cache.

    ``positions`` [B, t] or [t]: only a position of 0 matters (a document starts there);
    ``segment_ids`` default to 1 for every token."""
    _check_tokens(tokens)
    b, t = tokens.shape
    if positions is None:
      raise ValueError(f"{_OWNER}.decode: positions are required (the positions of the {t} new "
                       f"tokens), got None")
    if not isinstance(cache, RecurrentMemoryCache):
      raise TypeError(f"{_OWNER}.decode: cache must be a RecurrentMemoryCache (from init_cache), "
                      f"got {type(cache).__name__}")
    if cache.memory.shape[0] != b:
      raise ValueError(f"{_OWNER}.decode: cache holds a batch of {cache.memory.shape[0]}, tokens "
                       f"have {b} rows")
    pos_BT, seg_BT = _meta(positions, segment_ids, b, t)
    x_BTD = self.backbone.embed(tokens)
    empty = jax.tree.map(lambda new, old: new.astype(old.dtype),
                         self.backbone.init_cache(b, self._cache_length, jnp.float32),
                         cache.blocks)
    graphdef, state = nnx.split(self)
    merge = functools.partial(nnx.merge, graphdef)

    # The parameters travel as the scan's carry and the conds' operands: nnx transforms inside
    # (the backbone's layer scan) need their module made at the level they run at.
    def step(carry, inputs):
      state, cache = carry
      x_BD, pos_B, seg_B = inputs
      cache = lax.cond(cache.count == 0,
                       lambda st, c: merge(st)._open_segment(c, empty, pos_B, seg_B),
                       lambda st, c: c, state, cache)
      logits_BV, cache = merge(state)._feed_token(cache, x_BD, seg_B)
      cache = lax.cond(cache.count == self.segment_length,
                       lambda st, c: merge(st)._close_segment(c), lambda st, c: c, state, cache)
      return (state, cache), logits_BV

    (_, cache), logits_TBV = lax.scan(step, (state, cache),
                                      (x_BTD.swapaxes(0, 1), pos_BT.T, seg_BT.T))
    return logits_TBV.swapaxes(0, 1), cache

  def _open_segment(self, cache, empty, pos_B, seg_B):
    """Replaces the backbone caches by ``empty`` ones and prefills the read slots, resetting the
    memory where a document starts."""
    b = pos_B.shape[0]
    reset_B = (pos_B == 0) | (seg_B != cache.last_segment_ids)
    memory = jnp.where(reset_B[:, None, None], self.initial_memory(b), cache.memory)
    positions = np.broadcast_to(np.arange(self.slots, dtype=np.int32), (b, self.slots))
    seg = jnp.broadcast_to(seg_B[:, None], (b, self.slots))
    _, blocks = self.backbone._run_blocks(memory, positions, seg, empty)
    return cache.replace(memory=memory, blocks=blocks, first_segment_ids=seg_B)

  def _feed_token(self, cache, x_BD, seg_B):
    b = x_BD.shape[0]
    positions = jnp.broadcast_to(self.slots + cache.count, (b, 1))
    h, blocks = self.backbone._run_blocks(x_BD[:, None], positions, seg_B[:, None],
                                          cache.blocks)
    logits = self.backbone._logits(h)[:, 0]
    return logits, cache.replace(blocks=blocks, count=cache.count + 1, last_segment_ids=seg_B)

  def _close_segment(self, cache):
    """Runs the write slots; their outputs become the memory."""
    b, m = cache.memory.shape[:2]
    same_B = cache.first_segment_ids == cache.last_segment_ids
    write = jnp.where(same_B[:, None, None], cache.memory, self.initial_memory(b))
    start = self.slots + self.segment_length
    positions = np.broadcast_to(np.arange(start, start + m, dtype=np.int32), (b, m))
    seg = jnp.broadcast_to(cache.last_segment_ids[:, None], (b, m))
    h, blocks = self.backbone._run_blocks(write, positions, seg, cache.blocks)
    return cache.replace(memory=self._next_memory(h), blocks=blocks,
                         count=jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------------------------- helpers

  @property
  def _cache_length(self) -> int:
    return 2 * self.slots + self.segment_length

  def _next_memory(self, h_BMD):
    return self.backbone.final_norm(h_BMD).astype(self.dtype)

  def _check_length(self, length: int):
    if length < 1 or length % self.segment_length:
      raise ValueError(f"{_OWNER}: a sequence of {length} tokens cannot be cut into segments of "
                       f"model.recurrent_memory.segment_length={self.segment_length}; the length "
                       f"must be a positive multiple of it")


def _positive(value, name: str, allowed_extra: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{_OWNER}: {name} must be a positive int{allowed_extra}, got {value!r}")
  return int(value)


def _check_tokens(tokens):
  if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
    raise TypeError(f"{_OWNER}: tokens must be an integer array [B, T], got "
                    f"{type(tokens).__name__}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"{_OWNER}: tokens must have an integer dtype, got {tokens.dtype}")
  if tokens.ndim != 2:
    raise ValueError(f"{_OWNER}: tokens must have shape [B, T], got {tuple(tokens.shape)}")


def _meta(positions, segment_ids, b: int, t: int):
  """[B, T] int32 positions (default ``arange``) and segment ids (default 1) as jax arrays."""
  positions = checks.token_array(_OWNER, "positions", positions, b, t)
  segment_ids = checks.token_array(_OWNER, "segment_ids", segment_ids, b, t)
  if positions is None:
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  if segment_ids is None:
    segment_ids = np.ones((b, t), np.int32)
  return jnp.asarray(positions), jnp.asarray(segment_ids)
