"""Query-aware block selection (Quest / HiP / TokenSelect family) on the attention op.

Keys are cut into array blocks of ``block_size`` tokens. Each block is summarised per KV head
by the element-wise minimum and maximum of its keys (`block_summaries`). For a query ``q`` the
block's score is the upper bound of ``q . k`` over any key inside the box (Quest)::

    ub(q, block) = sum_d max(q_d * min_d, q_d * max_d) = relu(q) . max + min(q, 0) . min

(two matmuls, no [.., D] intermediate). A *query block* (``block_size`` queries, the same
blocks as the keys) scores each key block by the largest bound over its queries, summed over
the query heads of each KV head: one selection per KV head and query block, shared by the
heads of its group (`block_scores`). `select_blocks` keeps, among the causally visible blocks
(``key block <= query block``), the first ``sink_blocks`` and the last ``local_blocks``
always, and the ``top_k`` best-scoring others (ties: the lower block). `block_select_attention`
gathers those blocks' keys, values, positions and segment ids and runs the attention op over
them with a causal mask on the true positions: cost and memory grow with
``sink_blocks + local_blocks + top_k`` blocks per query block, not with T; within the chosen
blocks causality and packing are exact. `block_select_decode` does the same for a few new
queries over a dense KV cache (the query's own block is the local one).

With ``top_k`` at least the number of earlier blocks this is full causal attention. Blocks are
array blocks: with packed documents a block of another document may be picked and then masked
by segment ids (a wasted pick, never a wrong result).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsm.kernels.attention.api import attention
from lsm.kernels.attention.blocks import FAR_FUTURE
from lsm.kernels.attention.mask import Mask

_NO_SEGMENT = np.iinfo(np.int32).min  # gathered padding: a segment of its own
_FAR = FAR_FUTURE  # gathered padding: a position no causal query reaches


def _positive_int(owner, name, value, low=1):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    allowed = "a positive int" if low == 1 else f"an int >= {low}"
    raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
  return int(value)


def _blocks(x, block: int, fill):
  """[B, T, ...] -> [B, NB, block, ...], T padded with ``fill``."""
  b, t = x.shape[:2]
  n = -(-t // block)
  x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  return x.reshape((b, n, block) + x.shape[2:])


def block_summaries(k, block_size: int, valid=None):
  """(min, max) of the keys of each block and KV head: two [B, NB, Hkv, D] arrays.

  k [B, T, Hkv, D]; valid [B, T] bool (default: all) — invalid tokens and the padding of the
  last block are ignored; a block with no valid token gets min = +inf, max = -inf (it scores
  -inf)."""
  block_size = _positive_int("block_summaries", "block_size", block_size)
  if getattr(k, "ndim", None) != 4:
    raise ValueError(f"block_summaries: k must be [B, T, Hkv, D], got shape "
                     f"{getattr(k, 'shape', None)}")
  b, t = k.shape[:2]
  valid = jnp.ones((b, t), bool) if valid is None else jnp.asarray(valid, bool)
  kb = _blocks(k.astype(jnp.float32), block_size, 0.0)  # [B, NB, S, Hkv, D]
  ok = _blocks(valid, block_size, False)[..., None, None]
  return (jnp.min(jnp.where(ok, kb, jnp.inf), axis=2),
          jnp.max(jnp.where(ok, kb, -jnp.inf), axis=2))


def block_scores(q, summaries, *, block_size: int):
  """[B, NQ, Hkv, NB] float32: per query block and KV head, each key block's score (the largest
  Quest bound over the block's queries, summed over the group's query heads).

  q [B, T, Hq, D] with Hq a multiple of the summaries' Hkv; query blocks are ``block_size``
  queries (the last one padded; padding never raises a score)."""
  block_size = _positive_int("block_scores", "block_size", block_size)
  lo, hi = summaries
  b, t, hq, d = q.shape
  hkv = lo.shape[2]
  if hq % hkv or lo.shape[-1] != d or lo.shape[0] != b:
    raise ValueError(f"block_scores: q [B, T, Hq, D] = {tuple(q.shape)} must match the "
                     f"summaries [B, NB, Hkv, D] = {tuple(lo.shape)} (same B and D, Hq a "
                     f"multiple of Hkv)")
  qb = _blocks(q.astype(jnp.float32), block_size, 0.0)  # [B, NQ, S, Hq, D]
  qb = qb.reshape(qb.shape[:3] + (hkv, hq // hkv, d))
  pos, neg = jnp.maximum(qb, 0.0), jnp.minimum(qb, 0.0)
  # Empty blocks (min = +inf, max = -inf) must score -inf, never nan: 0 * inf -> use finite
  # stand-ins and mask after.
  empty = ~jnp.isfinite(hi[..., 0])  # [B, NB, Hkv]
  hi_f, lo_f = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (hi, lo))
  bound = (jnp.einsum("bqskgd,bnkd->bqskgn", pos, hi_f)
           + jnp.einsum("bqskgd,bnkd->bqskgn", neg, lo_f))  # [B, NQ, S, Hkv, G, NB]
  real = _blocks(jnp.ones((b, t), bool), block_size, False)[:, :, :, None, None, None]
  bound = jnp.max(jnp.where(real, bound, -jnp.inf), axis=2)  # over the block's queries
  score = jnp.sum(bound, axis=3)  # over the group's query heads -> [B, NQ, Hkv, NB]
  return jnp.where(empty.transpose(0, 2, 1)[:, None], -jnp.inf, score)


def select_blocks(scores, top_k: int, *, sink_blocks: int = 1, local_blocks: int = 1,
                  query_blocks=None):
  """[B, NQ, Hkv, sink_blocks + local_blocks + top_k] int32 key blocks per query block and KV
  head: the always-kept ones (the first ``sink_blocks`` and the ``local_blocks`` up to the query
  block, in that order) then the ``top_k`` best-scoring other visible blocks, best first (ties:
  the lower block); -1 where fewer exist. A block is visible when ``block <= query block``.

  scores [B, NQ, Hkv, NB]; query_blocks: [NQ] or [B, NQ] int block index of each query block
  (default ``arange(NQ)``)."""
  owner = "select_blocks"
  top_k = _positive_int(owner, "top_k", top_k, 0)
  sink_blocks = _positive_int(owner, "sink_blocks", sink_blocks, 0)
  local_blocks = _positive_int(owner, "local_blocks", local_blocks)
  b, nq, hkv, nb = scores.shape
  qblock = jnp.arange(nq) if query_blocks is None else jnp.asarray(query_blocks)
  qblock = jnp.broadcast_to(qblock, (b, nq))[:, :, None, None]  # [B, NQ, 1, 1]
  blocks = jnp.arange(nb)
  visible = blocks <= qblock
  own = qblock[..., 0]  # [B, NQ, 1]
  sinks = [jnp.where(n <= own, n, -1) for n in range(sink_blocks)]
  local = [own - r for r in range(local_blocks - 1, -1, -1)]
  local = [jnp.where(x >= sink_blocks, x, -1) for x in local]  # not a sink again, not < 0
  chosen = jnp.broadcast_to(jnp.concatenate(sinks + local, axis=-1)[:, :, None],
                            (b, nq, hkv, sink_blocks + local_blocks))
  if top_k == 0:
    return chosen.astype(jnp.int32)
  always = (blocks < sink_blocks) | (blocks > qblock - local_blocks)
  key = jnp.where(visible & ~always, scores, -jnp.inf)
  k = min(top_k, nb)
  best, index = lax.top_k(key, k)  # ties: the lower index first
  picked = jnp.where(best > -jnp.inf, index, -1)
  if k < top_k:
    picked = jnp.concatenate([picked, jnp.full(picked.shape[:-1] + (top_k - k,), -1)], -1)
  return jnp.concatenate([chosen, picked], axis=-1).astype(jnp.int32)


def _attend_selected(q, k, v, q_pos, kv_pos, q_seg, kv_seg, indices, block_size, scale,
                     logits_soft_cap, implementation):
  """The op per (row, query block, KV head) over the gathered key blocks ``indices``
  [B, NQ, Hkv, K]; q [B, NQ, bq, Hq, D] etc. -> out [B, NQ, bq, Hq, Dv]."""
  b, nq, bq, hq, d = q.shape
  hkv, kk = indices.shape[2], indices.shape[3]
  g = hq // hkv
  kb = _blocks(k, block_size, 0)  # [B, NB, S, Hkv, D]
  vb = _blocks(v, block_size, 0)
  pb = _blocks(kv_pos, block_size, _FAR)  # [B, NB, S]
  sb = _blocks(kv_seg, block_size, _NO_SEGMENT)
  safe = jnp.maximum(indices, 0)
  rows = jnp.arange(b)[:, None, None, None]
  heads = jnp.arange(hkv)[None, None, :, None]
  keys = kb[rows, safe, :, heads]  # [B, NQ, Hkv, K, S, D]
  values = vb[rows, safe, :, heads]
  taken = (indices >= 0)[..., None]
  positions = jnp.where(taken, pb[rows, safe], _FAR)  # [B, NQ, Hkv, K, S]
  segments = jnp.where(taken, sb[rows, safe], _NO_SEGMENT)
  n = b * nq * hkv
  flat = lambda x: x.reshape((n, kk * block_size) + x.shape[5:])
  qf = q.reshape(b, nq, bq, hkv, g, d).transpose(0, 1, 3, 2, 4, 5).reshape(n, bq, g, d)
  rep = lambda x: jnp.broadcast_to(x[:, :, None], (b, nq, hkv, bq)).reshape(n, bq)
  out = attention(qf, flat(keys)[:, :, None], flat(values)[:, :, None], mask=Mask(causal=True),
                  q_positions=rep(q_pos), kv_positions=flat(positions),
                  q_segment_ids=rep(q_seg), kv_segment_ids=flat(segments), scale=scale,
                  logits_soft_cap=logits_soft_cap, implementation=implementation)
  out = out.reshape(b, nq, hkv, bq, g, -1).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, nq, bq, hq, -1)


def token_ids(owner, name, x, b, t):
  """Positions or segment ids: [T] or [B, T] integers -> [B, T] int32 (None stays None)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.shape not in ((t,), (b, t)):
    raise ValueError(f"{owner}: {name} must be integers of shape [{t}] or [{b}, {t}], got "
                     f"{x.dtype} {tuple(x.shape)}")
  return jnp.broadcast_to(x.astype(jnp.int32), (b, t))


def _check_qkv(owner, q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{owner}: {name} must have rank 4, got shape {getattr(x, 'shape', None)}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or (
      q.shape[2] % k.shape[2]):
    raise ValueError(f"{owner}: q [B, Tq, Hq, D] = {tuple(q.shape)}, k [B, Tk, Hkv, D] = "
                     f"{tuple(k.shape)} and v [B, Tk, Hkv, Dv] = {tuple(v.shape)} must agree "
                     f"(Hq a multiple of Hkv)")


def block_select_attention(q, k, v, *, block_size: int, top_k: int, sink_blocks: int = 1,
                           local_blocks: int = 1, positions=None, segment_ids=None, scale=None,
                           logits_soft_cap=None, implementation=None,
                           return_indices: bool = False):
  """Causal self-attention of q [B, T, Hq, D] over k, v [B, T, Hkv, D(v)] restricted, per query
  block and KV head, to the selected key blocks (module docstring).

  positions, segment_ids: [T] or [B, T] (default ``arange(T)``, one segment); the op masks
  causally on positions and by segment inside the selected blocks. Returns out [B, T, Hq, Dv]
  (and the selected blocks [B, NQ, Hkv, K] with ``return_indices``)."""
  owner = "block_select_attention"
  _check_qkv(owner, q, k, v)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"{owner}: self-attention needs q and k of one length, got "
                     f"{q.shape[1]} and {k.shape[1]}")
  block_size = _positive_int(owner, "block_size", block_size)
  b, t, hq, d = q.shape
  positions = token_ids(owner, "positions", positions, b, t)
  segment_ids = token_ids(owner, "segment_ids", segment_ids, b, t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None \
      else positions
  segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  scale = d ** -0.5 if scale is None else scale
  scores = block_scores(q, block_summaries(k, block_size), block_size=block_size)
  indices = lax.stop_gradient(select_blocks(scores, top_k, sink_blocks=sink_blocks,
                                            local_blocks=local_blocks))
  qb = _blocks(q, block_size, 0)
  out = _attend_selected(qb, k, v, _blocks(positions, block_size, -1),
                         positions, _blocks(segment_ids, block_size, _NO_SEGMENT + 1),
                         segment_ids, indices, block_size, scale, logits_soft_cap,
                         implementation)
  out = out.reshape(b, -1, hq, out.shape[-1])[:, :t]
  return (out, indices) if return_indices else out


def block_select_decode(q, cache_k, cache_v, *, q_positions, cache_positions, block_size: int,
                        top_k: int, sink_blocks: int = 1, local_blocks: int = 1,
                        q_segment_ids=None, cache_segment_ids=None, scale=None,
                        logits_soft_cap=None, implementation=None, return_indices=False):
  """New queries q [B, t, Hq, D] (already written to the cache) over a dense KV cache
  cache_k, cache_v [B, S, Hkv, D(v)] whose slot i holds position i (``cache_positions`` [B, S];
  empty slots at a position past every query). Each query selects for itself (Quest's decode
  step): the cache blocks holding positions up to the last query are scored against it, and its
  own block (``q_position // block_size``) is the local one. Returns out [B, t, Hq, Dv] (and the
  blocks [B, t, Hkv, K] with ``return_indices``)."""
  owner = "block_select_decode"
  _check_qkv(owner, q, cache_k, cache_v)
  block_size = _positive_int(owner, "block_size", block_size)
  b, t, hq, d = q.shape
  s = cache_k.shape[1]
  hkv = cache_k.shape[2]
  q_positions = token_ids(owner, "q_positions", q_positions, b, t)
  cache_positions = token_ids(owner, "cache_positions", cache_positions, b, s)
  q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else token_ids(
      owner, "q_segment_ids", q_segment_ids, b, t)
  kv_seg = jnp.zeros((b, s), jnp.int32) if cache_segment_ids is None else token_ids(
      owner, "cache_segment_ids", cache_segment_ids, b, s)
  scale = d ** -0.5 if scale is None else scale
  valid = cache_positions <= jnp.max(q_positions, axis=1, keepdims=True)
  lo, hi = block_summaries(cache_k, block_size, valid)
  qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  hi_f, lo_f = (jnp.where(jnp.isfinite(x), x, 0.0) for x in (hi, lo))
  bound = (jnp.einsum("btkgd,bnkd->btkgn", jnp.maximum(qg, 0.0), hi_f)
           + jnp.einsum("btkgd,bnkd->btkgn", jnp.minimum(qg, 0.0), lo_f))
  scores = jnp.sum(bound, axis=3)  # [B, t, Hkv, NB]: each query is its own query block
  scores = jnp.where(jnp.isfinite(hi[..., 0]).transpose(0, 2, 1)[:, None], scores, -jnp.inf)
  indices = lax.stop_gradient(select_blocks(scores, top_k, sink_blocks=sink_blocks,
                                            local_blocks=local_blocks,
                                            query_blocks=q_positions // block_size))
  out = _attend_selected(q[:, :, None], cache_k, cache_v, q_positions[:, :, None],
                         cache_positions, q_seg[:, :, None], kv_seg, indices, block_size, scale,
                         logits_soft_cap, implementation)
  out = out[:, :, 0]
  return (out, indices) if return_indices else out
