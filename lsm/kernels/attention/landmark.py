"""Landmark attention (Mohtashami & Jaggi, 2023): a grouped softmax over blocks of tokens.

Token layout (`lsm.data.landmarks`): with ``S = block_size + 1``, the token at position ``p`` is a
landmark iff ``p % S == block_size`` and belongs to block ``p // S``; positions restart at 0 in
every document. For query i and key j of the *same segment*, with ``s_ij = scale * q_i . k_j``,
``c`` the block of i and ``b`` the block of j:

- own block (``b == c`` and ``pos_j <= pos_i``): ``s_ij`` enters the top-level softmax (the own
  landmark only when the query is that landmark);
- earlier block (``b < c``): its landmark's logit ``s_i,lm(b)`` enters the top-level softmax, and
  the probability it gets there is spread over the block's regular tokens by their own softmax
  of ``s_i.`` within the block; earlier landmarks carry no value themselves.

Equivalently ``out_i = softmax_j(a_ij) v_j`` with ``a_ij = s_ij`` (own block, causal),
``a_ij = s_i,lm(b) + s_ij - lse_b(i)`` (regular tokens of earlier blocks; ``lse_b(i)`` is the
log-sum-exp of ``s_i.`` over block b's regular tokens), and ``-inf`` elsewhere. An earlier block
takes part only with its landmark and at least one regular token present. ``retrieved`` restricts
the earlier blocks (top-k inference): a block not retrieved contributes neither its landmark logit
nor its tokens; the own block always takes part. A row that sees nothing returns 0.

Positions within a segment must be distinct (each document laid out once); the array order of the
tokens does not matter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsm.kernels.attention.landmark_pallas import landmark_pallas, tiles_in_order
from lsm.kernels.attention.pallas_common import is_concrete
from lsm.log import log_once

LANDMARK_IMPLEMENTATIONS = ("reference", "xla", "pallas")
_PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def is_landmark(positions, block_size: int):
  """Whether each position is a landmark under the layout convention."""
  return positions % (block_size + 1) == block_size


def landmark_attention(q, k, v, *, block_size: int, positions=None, segment_ids=None,
                       scale=None, retrieved=None, implementation: str = "xla",
                       query_chunk: int = 128):
  """Landmark attention over q, k already rotated by the caller (see the module docstring).

  Args:
    q: [B, T, Hq, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv]; ``Hq % Hkv == 0`` (GQA by
      grouping: K/V are never repeated).
    block_size: regular tokens per block (the landmark not counted).
    positions: [T] or [B, T] integers in the landmark layout (default ``arange(T)``).
    segment_ids: [T] or [B, T] integers; tokens see only their own segment (default: one).
    scale: score scale (default ``D ** -0.5``).
    retrieved: None (every earlier block) or a bool [B, Hq, T, NB]: ``retrieved[b, h, i, n]``
      says whether block n of query i's segment takes part for head h; entries of blocks
      ``n >= block(i)`` are ignored, and blocks ``n >= NB`` count as not retrieved.
    implementation: "reference" (dense [T, T] scores, the grouped softmax literally; the
      definition), "xla" (queries in chunks of ``query_chunk`` under `jax.checkpoint`:
      memory linear in T, forward and backward) or "pallas" (the kernels of
      `landmark_pallas`, interpreted on CPU; float32, bfloat16 or float16 only). The kernels
      take block-aligned layouts (`is_block_aligned`) whose tiles of each segment are in block
      order (`tiles_in_order`); any other layout runs the "xla" path (logged once). The choice
      is made at trace time when positions and segment ids are concrete, else on device per
      call (`lax.cond`).
    query_chunk: queries per chunk of the "xla" path (and of "pallas" on other layouts).

  Returns out [B, T, Hq, Dv] in q's dtype; accumulation in float32 (float64 for float64).
  """
  b, t, hq, d = _check_qkv(q, k, v)
  block_size = _positive_int("block_size", block_size)
  query_chunk = _positive_int("query_chunk", query_chunk)
  if implementation not in LANDMARK_IMPLEMENTATIONS:
    raise ValueError(f"landmark_attention: implementation must be one of "
                     f"{LANDMARK_IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas" and jnp.dtype(q.dtype) not in _PALLAS_DTYPES:
    raise TypeError(f"landmark_attention: implementation='pallas' takes q, k, v in float32, "
                    f"bfloat16 or float16 (the kernels compute in float32), got {q.dtype}; use "
                    f"'xla' or 'reference'")
  positions = _token_array(positions, "positions", b, t)
  segment_ids = _token_array(segment_ids, "segment_ids", b, t)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None \
      else positions
  segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  if scale is None:
    scale = d ** -0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or (
      not (math.isfinite(scale) and scale > 0)):
    raise ValueError(f"landmark_attention: scale must be a positive finite number or None, got "
                     f"{scale!r}")
  if retrieved is not None:
    if not hasattr(retrieved, "shape") or not hasattr(retrieved, "dtype"):
      raise TypeError(f"landmark_attention: retrieved must be a bool array [B, Hq, T, NB] or "
                      f"None, got {type(retrieved).__name__}")
    if retrieved.dtype != jnp.bool_:
      raise TypeError(f"landmark_attention: retrieved must have dtype bool, got "
                      f"{retrieved.dtype}")
    if retrieved.ndim != 4 or tuple(retrieved.shape[:3]) != (b, hq, t) or retrieved.shape[3] < 1:
      raise ValueError(f"landmark_attention: retrieved must have shape [B, Hq, T, NB] = "
                       f"[{b}, {hq}, {t}, NB >= 1], got {tuple(retrieved.shape)}")
    retrieved = jnp.asarray(retrieved)
  if implementation == "reference":
    return _reference(q, k, v, positions, segment_ids, retrieved, block_size, float(scale))
  if implementation == "pallas":
    return _pallas(q, k, v, positions, segment_ids, retrieved, block_size, float(scale),
                   min(query_chunk, t))
  return _xla(q, k, v, positions, segment_ids, retrieved, block_size, float(scale),
              min(query_chunk, t))


def _positive_int(name, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"landmark_attention: {name} must be a positive int, got {value!r}")
  return int(value)


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"landmark_attention: {name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"landmark_attention: {name} must have rank 4 [B, T, H, D], got shape "
                       f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"landmark_attention: {name} must have a floating dtype, got {x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"landmark_attention: q, k and v must share one dtype, got {q.dtype}, "
                    f"{k.dtype}, {v.dtype}")
  b, t, hq, d = q.shape
  if tuple(k.shape[:2]) != (b, t) or tuple(v.shape[:3]) != tuple(k.shape[:3]):
    raise ValueError(f"landmark_attention: k [B, T, Hkv, D] and v [B, T, Hkv, Dv] must match q "
                     f"[B, T, Hq, D] on B, T (self-attention) and each other on Hkv, got q "
                     f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
  if k.shape[3] != d:
    raise ValueError(f"landmark_attention: q and k must have the same head dim D, got q {d} and "
                     f"k {k.shape[3]}")
  if t == 0:
    raise ValueError("landmark_attention: the sequence length T must be positive, got 0")
  if hq % k.shape[2]:
    raise ValueError(f"landmark_attention: the query heads Hq={hq} must be a multiple of the "
                     f"key/value heads Hkv={k.shape[2]}")
  return b, t, hq, d


def _token_array(x, name, batch, length):
  if x is None:
    return None
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"landmark_attention: {name} must have an integer dtype, got {x.dtype}")
  if tuple(x.shape) not in ((length,), (batch, length)):
    raise ValueError(f"landmark_attention: {name} must have shape [{length}] or [{batch}, "
                     f"{length}], got {tuple(x.shape)}")
  return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch, length))


# ------------------------------------------------------------------------- group reductions


def _segment(op, x, ids, num: int):
  """``op`` (a ``jax.ops.segment_*``) over the last axis of x [B, ..., T] grouped by ids [B, T]
  -> [B, ..., num]."""

  def one(x_T, ids_T):
    return jnp.moveaxis(op(jnp.moveaxis(x_T, -1, 0), ids_T, num_segments=num), 0, -1)

  return jax.vmap(one)(x, ids)


def _take(x, ids):
  """x [B, ..., G] at ids [B, T] along the last axis -> [B, ..., T]."""
  ids = ids.reshape(ids.shape[:1] + (1,) * (x.ndim - 2) + ids.shape[1:])
  return jnp.take_along_axis(x, jnp.broadcast_to(ids, x.shape[:-1] + ids.shape[-1:]), axis=-1)


def _retrieved_keys(retrieved, block_BT, hkv):
  """retrieved [B, Hq, Tq, NB] at each key's block -> [B, Hkv, G, Tq, Tk]."""
  b, hq, tq, nb = retrieved.shape
  ret = retrieved.reshape(b, hkv, hq // hkv, tq, nb)
  taken = _take(ret, jnp.clip(block_BT, 0, nb - 1))
  return taken & ((block_BT >= 0) & (block_BT < nb))[:, None, None, None, :]


def _scores(q_BTHD, k_BSKD, scale, acc):
  b, t, hq, d = q_BTHD.shape
  hkv = k_BSKD.shape[2]
  q = q_BTHD.reshape(b, t, hkv, hq // hkv, d).astype(acc)
  return jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD.astype(acc)) * scale


def _weighted_values(p_BKGTS, v_BSKD, out_dtype):
  b, hkv, g, t, _ = p_BKGTS.shape
  out = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v_BSKD.astype(p_BKGTS.dtype))
  return out.reshape(b, t, hkv * g, v_BSKD.shape[-1]).astype(out_dtype)


def _softmax(logits, visible):
  """Softmax over the last axis of the visible entries; 0 where nothing is visible. Infinities
  never enter a differentiated expression."""
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  e = jnp.where(visible, jnp.exp(jnp.where(visible, logits, 0.0) - row_max), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


def _block_stats(s, regular_T, ids, num):
  """Per (query, group): the max and the sum of ``exp(s - max)`` over the group's regular keys."""
  regular = regular_T[:, None, None, None, :]
  m = _segment(jax.ops.segment_max, jnp.where(regular, s, -jnp.inf), ids, num)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(regular, jnp.exp(jnp.where(regular, s - _take(m, ids), 0.0)), 0.0)
  return m, e, _segment(jax.ops.segment_sum, e, ids, num)


# ------------------------------------------------------------------------------- reference


def _reference(q, k, v, positions, segment_ids, retrieved, block_size, scale):
  t = q.shape[1]
  hkv = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  span = block_size + 1
  block, landmark = positions // span, is_landmark(positions, block_size)
  s = _scores(q, k, scale, acc)  # [B, Hkv, G, Tq, Tk]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  # Groups are (segment, block); each is named by the index of its first token.
  group = jnp.argmax(same & (block[:, :, None] == block[:, None, :]), axis=-1)
  own = same & (block[:, None, :] == block[:, :, None]) & (
      positions[:, None, :] <= positions[:, :, None])
  earlier = (same & (block[:, None, :] < block[:, :, None]))[:, None, None]
  if retrieved is not None:
    earlier = earlier & _retrieved_keys(retrieved, block, hkv)
  own = own[:, None, None]
  _, e, z = _block_stats(s, ~landmark, group, t)
  within = e / _take(jnp.where(z > 0, z, 1.0), group)  # softmax inside each block
  has_regular = _take(z > 0, group)
  lm = landmark[:, None, None, None, :]
  top = _softmax(s, own | (earlier & lm & has_regular))
  landmark_mass = _segment(jax.ops.segment_sum, jnp.where(earlier & lm, top, 0.0), group, t)
  p = jnp.where(own, top, 0.0) + jnp.where(earlier & ~lm, _take(landmark_mass, group) * within,
                                           0.0)
  return _weighted_values(p, v, q.dtype)


# ------------------------------------------------------------------------------------- xla


def _group_ids(segment_ids, block):
  """Dense ids in [0, T) of the (segment, block) groups of each row, by sorting: linear memory,
  any token order."""

  def one(seg_T, block_T):
    order = jnp.lexsort((block_T, seg_T))
    seg_sorted, block_sorted = seg_T[order], block_T[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), (seg_sorted[1:] != seg_sorted[:-1]) | (
        block_sorted[1:] != block_sorted[:-1])])
    rank = jnp.cumsum(starts.astype(jnp.int32)) - 1
    return jnp.zeros_like(seg_T).at[order].set(rank)

  return jax.vmap(one)(segment_ids, block)


def is_block_aligned(positions, segment_ids, block_size: int):
  """Whether every array tile ``[n * S, (n + 1) * S)`` holds exactly one block (``S =
  block_size + 1``): each segment starts on a tile boundary with position ``0 mod S`` and counts
  up by one inside a tile. One document per row laid out from position 0 is aligned; so is
  packing with documents padded to whole blocks. A scalar bool (traceable)."""
  span = block_size + 1
  t = positions.shape[-1]
  index = jnp.arange(t)
  phase = jnp.all(positions % span == index % span)
  inside = index[1:] % span != 0
  runs = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (positions[:, 1:] == positions[:, :-1] + 1)
  return phase & jnp.all(runs | ~inside)


def _xla(q, k, v, positions, segment_ids, retrieved, block_size, scale, chunk):
  """The grouped softmax by block tiles when the layout is aligned (reductions over a block
  axis), by sorted group ids and segment reductions otherwise; chosen per call in the graph."""
  args = (q, k, v, positions, segment_ids, retrieved)
  return lax.cond(is_block_aligned(positions, segment_ids, block_size),
                  lambda *a: _xla_aligned(*a, block_size, scale, chunk),
                  lambda *a: _xla_general(*a, block_size, scale, chunk), *args)


def _pallas(q, k, v, positions, segment_ids, retrieved, block_size, scale, chunk):
  """The Pallas kernels where the layout suits them, `_xla_general` elsewhere."""
  args = (q, k, v, positions, segment_ids, retrieved)
  suits = is_block_aligned(positions, segment_ids, block_size) & tiles_in_order(
      positions, segment_ids, block_size)

  def kernels(*a):
    return landmark_pallas(*a, block_size, scale)

  def general(*a):
    return _xla_general(*a, block_size, scale, chunk)

  if is_concrete(positions, segment_ids):
    if bool(suits):
      return kernels(*args)
    log_once("landmark_attention: implementation='pallas' runs block-aligned layouts with the "
             "tiles of each segment in block order; this layout is not, so the XLA path runs it")
    return general(*args)
  log_once("landmark_attention: implementation='pallas' with traced positions or segment ids "
           "checks the layout on device per call: block-aligned layouts with tiles in order run "
           "the kernels, any other the XLA path")
  return lax.cond(suits, kernels, general, *args)


def _in_query_chunks(chunk_out, q, positions, segment_ids, retrieved, chunk, dv):
  """``chunk_out`` over chunks of ``chunk`` queries under `jax.checkpoint` -> [B, T, Hq, Dv]."""
  b, t, hq, _ = q.shape
  n = -(-t // chunk)
  pad = n * chunk - t

  def chunks(x, axis):
    x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  xs = (chunks(q, 1), chunks(positions, 1), chunks(segment_ids, 1),
        None if retrieved is None else chunks(retrieved, 2))
  out = lax.map(jax.checkpoint(chunk_out), xs)  # [n, B, C, Hq, Dv]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, hq, dv)
  return out[:, :t]


_PAD_SEGMENT = np.iinfo(np.int32).min  # tail padding of the aligned path: a segment of its own


def _xla_aligned(q, k, v, positions, segment_ids, retrieved, block_size, scale, chunk):
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  span = block_size + 1
  nb = -(-t // span)
  pad = nb * span - t

  def tiles(x, fill=0):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((b, nb, span) + x.shape[2:])

  k_tiles, v_tiles = tiles(k), tiles(v)  # [B, NB, S, Hkv, D]
  key_pos, key_seg = tiles(positions), tiles(segment_ids, _PAD_SEGMENT)  # [B, NB, S]
  key_block = key_pos[:, :, 0] // span  # [B, NB]: every token of a tile is in this block
  tile_seg = key_seg[:, :, 0]
  regular = jnp.arange(span) < block_size
  # A tile's tokens take part as an earlier block only when its landmark is present.
  carried = key_seg[:, :, block_size] == tile_seg  # [B, NB]

  def chunk_out(args):
    q_c, pos_c, seg_c, ret_c = args
    c = q_c.shape[1]
    q_g = q_c.reshape(b, c, hkv, hq // hkv, -1).astype(acc)
    s = jnp.einsum("bckgd,bnskd->bkgcns", q_g, k_tiles.astype(acc)) * scale
    same = (seg_c[:, :, None] == tile_seg[:, None, :])  # [B, C, NB]
    q_block = (pos_c // span)[:, :, None]
    own = (same & (key_block[:, None, :] == q_block))[..., None] & (
        key_pos[:, None] <= pos_c[:, :, None, None]) & (
        key_seg[:, None] == seg_c[:, :, None, None])  # [B, C, NB, S]: not the tail padding
    earlier = same & (key_block[:, None, :] < q_block) & carried[:, None, :]  # [B, C, NB]
    earlier = earlier[:, None, None]
    if ret_c is not None:
      earlier = earlier & _retrieved_keys(ret_c, key_block, hkv)
    m = jnp.max(jnp.where(regular, s, -jnp.inf), axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    z = jnp.sum(jnp.where(regular, jnp.exp(jnp.where(regular, s - m, 0.0)), 0.0), axis=-1,
                keepdims=True)
    lse = m + jnp.log(jnp.where(z > 0, z, 1.0))
    earlier = earlier[..., None] & regular
    shifted = s + s[..., block_size:] - lse
    own = own[:, None, None]
    logits = jnp.where(own, s, jnp.where(earlier, shifted, 0.0)).reshape(s.shape[:4] + (-1,))
    visible = jnp.broadcast_to(own | earlier, s.shape).reshape(logits.shape)
    p = _softmax(logits, visible)
    return _weighted_values(p, v_tiles.reshape(b, nb * span, hkv, -1), q.dtype)

  return _in_query_chunks(chunk_out, q, positions, segment_ids, retrieved, chunk, v.shape[-1])


def _xla_general(q, k, v, positions, segment_ids, retrieved, block_size, scale, chunk):
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  span = block_size + 1
  block, landmark = positions // span, is_landmark(positions, block_size)
  group = _group_ids(segment_ids, block)
  rows = jnp.arange(b)[:, None]
  token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  landmark_of = jnp.full((b, t), -1, jnp.int32).at[rows, group].max(
      jnp.where(landmark, token, -1))  # [B, groups]: the landmark's index, -1 if none
  landmark_index = jnp.maximum(landmark_of, 0)
  # Keys that can take part as earlier-block tokens: regular, in a block with a landmark.
  carried = ~landmark & jnp.take_along_axis(landmark_of >= 0, group, axis=1)

  def chunk_out(args):
    q_c, pos_c, seg_c, ret_c = args
    s = _scores(q_c, k, scale, acc)  # [B, Hkv, G, C, T]
    same = seg_c[:, :, None] == segment_ids[:, None, :]
    q_block = pos_c // span
    own = (same & (block[:, None, :] == q_block[:, :, None]) & (
        positions[:, None, :] <= pos_c[:, :, None]))[:, None, None]
    earlier = (same & (block[:, None, :] < q_block[:, :, None]) & carried[:, None, :])[
        :, None, None]
    if ret_c is not None:
      earlier = earlier & _retrieved_keys(ret_c, block, hkv)
    m, _, z = _block_stats(s, ~landmark, group, t)
    lse = m + jnp.log(jnp.where(z > 0, z, 1.0))
    landmark_logit = _take(s, landmark_index)  # [B, Hkv, G, C, groups]
    shifted = s + _take(landmark_logit - lse, group)
    logits = jnp.where(own, s, jnp.where(earlier, shifted, 0.0))
    return _weighted_values(_softmax(logits, own | earlier), v, q.dtype)

  return _in_query_chunks(chunk_out, q, positions, segment_ids, retrieved, chunk, v.shape[-1])
