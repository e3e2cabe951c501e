"""Blockwise attention in plain XLA: online softmax, float32 accumulators, skipped blocks.

Queries are cut into blocks of ``bq`` tokens and keys into blocks of ``bk``. For every query block
the key blocks that may hold a visible pair are found from per-block position and segment ranges
(`Mask.block_may_be_visible`), so the test works with traced positions; a ``while_loop`` visits only
those, so a sliding window or a block-sparse layout costs work proportional to what is visible.
Blocks known to be wholly visible skip the element mask. The backward pass is a ``custom_vjp``
that recomputes probabilities block by block from the saved log-sum-exp: nothing of size Tq x Tk
is stored. GQA: the ``G = Hq / Hkv`` query heads of a KV head are stacked against one K/V block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lsm.kernels.attention.backward import row_terms, sinks_grad
from lsm.kernels.attention.blocks import BlockSizes, TokenBlocks, block_tables, visit_lists
from lsm.kernels.attention.mask import Mask, allowed_pairs
from lsm.kernels.attention.reference import accumulation_dtype


@dataclasses.dataclass(frozen=True)
class _Static:
  mask: Mask
  scale: float
  cap: float | None
  bq: int
  bk: int


# ------------------------------------------------------------------------------------ layout


def _blocks(x_BTHD, block: int, hkv: int):
  """[B, T, H, D] -> [n, B, Hkv, G * block, D], T zero-padded to a multiple of block.

  The G query heads of one KV head are stacked as rows (G-major), so every matmul is a plain
  batched [rows, D] x [D, bk] product against one K/V block.
  """
  b, t, h, d = x_BTHD.shape
  g = h // hkv
  n = -(-t // block)
  x = jnp.pad(x_BTHD, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  x = x.reshape(b, n, block, hkv, g, d).transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(n, b, hkv, g * block, d)


def _unblock(x_NBKRD, t: int, block: int):
  """Inverse of `_blocks`: [n, B, Hkv, G * block, D] -> [B, T, H, D]."""
  n, b, hkv, rows, d = x_NBKRD.shape
  g = rows // block
  x = x_NBKRD.reshape(n, b, hkv, g, block, d).transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(b, n * block, hkv * g, d)[:, :t]


def _token_blocks(st: _Static, q_pos, kv_pos, q_seg, kv_seg):
  """Per-block tokens as jax arrays: the loops below index them with traced block numbers."""
  as_jax = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
  return (TokenBlocks.build(as_jax(q_pos), as_jax(q_seg), st.bq),
          TokenBlocks.build(as_jax(kv_pos), as_jax(kv_seg), st.bk))


def _element_mask(st: _Static, qt: TokenBlocks, kt: TokenBlocks, i, j):
  """Allowed [B, 1, 1, bq, bk] for query block i against key block j (broadcast over G)."""
  segments = (None, None) if qt.seg is None else (qt.seg[i], kt.seg[j])
  ok = allowed_pairs(st.mask, qt.pos[i], kt.pos[j], *segments)
  ok &= kt.valid[j][:, None, :]
  return ok[:, None, None]


def _scaled(q, scale, acc):
  """q * scale, rounded once to q's dtype: saves a multiply per score."""
  return (q.astype(acc) * scale).astype(q.dtype)


def _scores(st: _Static, qs_blk, k_blk, acc):
  """Soft-capped scores [B, Hkv, G * bq, bk] from pre-scaled queries, and tanh(s/cap)."""
  s = jnp.einsum("bkrd,bksd->bkrs", qs_blk, k_blk, preferred_element_type=acc)
  if st.cap is None:
    return s, None
  t = jnp.tanh(s / st.cap)
  return st.cap * t, t


def _masked(st, qt, kt, i, j, x, fill):
  """``x`` [B, Hkv, G * bq, bk] with the disallowed entries set to ``fill``."""
  b, hkv, rows, bk = x.shape
  x = x.reshape(b, hkv, rows // st.bq, st.bq, bk)
  return jnp.where(_element_mask(st, qt, kt, i, j), x, fill).reshape(b, hkv, rows, bk)


def _step_maybe_masked(is_full, step, carry):
  """``step(carry, masked)``, with the element mask traced only into the branch that needs it.

  Branching over the whole step (not just the masking) keeps XLA from copying score blocks.
  """
  return lax.cond(is_full, lambda c: step(c, False), lambda c: step(c, True), carry)


# ------------------------------------------------------------------------------------ forward


def _forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
  b, tq, hq, _ = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  dv = v.shape[-1]
  acc = accumulation_dtype(q.dtype)
  qt, kt = _token_blocks(st, q_pos, kv_pos, q_seg, kv_seg)
  q_blocks = _blocks(_scaled(q, st.scale, acc), st.bq, hkv)  # [nq, B, Hkv, G * bq, D]
  k_blocks = _blocks(k, st.bk, hkv)  # [nk, B, Hkv, bk, D]
  v_blocks = _blocks(v, st.bk, hkv)
  visible, full = block_tables(st.mask, qt, kt)
  order, counts = visit_lists(visible)

  def one_q_block(i):
    q_blk = q_blocks[i]

    def step(carry, masked):
      n, m, l, o = carry
      j = order[i, n]
      s, _ = _scores(st, q_blk, k_blocks[j], acc)
      if masked:
        s = _masked(st, qt, kt, i, j, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = l * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v_blocks[j],
                      preferred_element_type=acc)
      return n + 1, m_new, l, o * correction[..., None] + pv

    def body(carry):
      return _step_maybe_masked(full[i, order[i, carry[0]]], step, carry)

    stats_shape = (b, hkv, g * st.bq)
    init = (jnp.int32(0), jnp.full(stats_shape, -jnp.inf, acc), jnp.zeros(stats_shape, acc),
            jnp.zeros(stats_shape + (dv,), acc))
    _, m, l, o = lax.while_loop(lambda c: c[0] < counts[i], body, init)
    if sinks is not None:
      sink = jnp.repeat(sinks.astype(acc).reshape(1, hkv, g), st.bq, axis=-1)
      m_all = jnp.maximum(m, sink)
      correction = jnp.exp(m - m_all)
      l = l * correction + jnp.exp(sink - m_all)
      o = o * correction[..., None]
      m = m_all
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out = (o / safe_l[..., None]).astype(q.dtype)
    lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)
    return out, lse

  out_blocks, lse_blocks = lax.map(one_q_block, jnp.arange(q_blocks.shape[0]))
  out = _unblock(out_blocks, tq, st.bq)
  lse = _unblock(lse_blocks[..., None], tq, st.bq)[..., 0]  # [B, Tq, Hq]
  return out, lse.transpose(0, 2, 1)


# ------------------------------------------------------------------------------------ backward


def _backward(st: _Static, res, cotangents, keep_accumulation_dtype: bool = False):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, out, lse = res
  d_out, d_lse = cotangents
  tq = q.shape[1]
  tk, hkv = k.shape[1], k.shape[2]
  acc = accumulation_dtype(q.dtype)
  qt, kt = _token_blocks(st, q_pos, kv_pos, q_seg, kv_seg)
  q_blocks = _blocks(_scaled(q, st.scale, acc), st.bq, hkv)
  do_blocks = _blocks(d_out, st.bq, hkv)
  k_blocks = _blocks(k, st.bk, hkv)
  v_blocks = _blocks(v, st.bk, hkv)

  row_term, lse_safe = row_terms(out, d_out, lse, d_lse, acc)  # [B, Hq, Tq]

  def stat_blocks(x_BHT):
    return _blocks(x_BHT.transpose(0, 2, 1)[..., None], st.bq, hkv)[..., 0]  # [nq, B, Hkv, R]

  lse_blocks = stat_blocks(lse_safe)
  row_blocks = stat_blocks(row_term)

  visible, full = block_tables(st.mask, qt, kt)
  order_T, counts_T = visit_lists(visible.T)
  nq, nk = visible.shape

  def one_kv_block(dq_all, j):
    k_blk, v_blk = k_blocks[j], v_blocks[j]

    def step(carry, masked):
      i, dk, dv = carry
      q_blk, do_blk = q_blocks[i], do_blocks[i]
      s, tanh = _scores(st, q_blk, k_blk, acc)
      p = jnp.exp(s - lse_blocks[i][..., None])
      if masked:
        p = _masked(st, qt, kt, i, j, p, 0.0)
      dv = dv + jnp.einsum("bkrs,bkrd->bksd", p.astype(v.dtype), do_blk,
                           preferred_element_type=acc)
      dp = jnp.einsum("bkrd,bksd->bkrs", do_blk, v_blk, preferred_element_type=acc)
      ds = p * (dp - row_blocks[i][..., None])
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      ds = ds.astype(q.dtype)  # d(loss)/d(q_scaled . k)
      dq_i = jnp.einsum("bkrs,bksd->bkrd", ds, k_blk, preferred_element_type=acc)
      dk = dk + jnp.einsum("bkrs,bkrd->bksd", ds, q_blk, preferred_element_type=acc)
      return dq_i, dk, dv

    def body(carry):
      n, dq_all, dk, dv = carry
      i = order_T[j, n]
      # The large dq buffer stays outside the conditional so XLA updates it in place.
      dq_i, dk, dv = _step_maybe_masked(full[i, j], step, (i, dk, dv))
      dq_all = lax.dynamic_update_index_in_dim(dq_all, dq_all[i] + dq_i, i, 0)
      return n + 1, dq_all, dk, dv

    init = (jnp.int32(0), dq_all, jnp.zeros(k_blk.shape, acc),
            jnp.zeros(v_blk.shape, acc))
    _, dq_all, dk, dv = lax.while_loop(lambda c: c[0] < counts_T[j], body, init)
    return dq_all, (dk, dv)

  dq_all = jnp.zeros(q_blocks.shape, acc)
  dq_all, (dk_blocks, dv_blocks) = lax.scan(one_kv_block, dq_all, jnp.arange(nk))
  dq = _unblock(dq_all, tq, st.bq) * st.scale
  dk = _unblock(dk_blocks, tk, st.bk)
  dv = _unblock(dv_blocks, tk, st.bk)
  if not keep_accumulation_dtype:
    dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

  return dq, dk, dv, None, None, None, None, sinks_grad(sinks, lse_safe, row_term)


# ------------------------------------------------------------------------------------ wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
  return _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks)


def _attention_fwd(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
  out, lse = _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks)
  return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def attention_xla(q, k, v, *, mask: Mask, q_positions, kv_positions, q_segment_ids,
                  kv_segment_ids, sinks, scale: float, logits_soft_cap, block_sizes: BlockSizes):
  """Arguments already validated and normalised by `api.attention` (positions are [B, T])."""
  bq, bk = block_sizes.clipped(q.shape[1], k.shape[1])
  st = _Static(mask=mask, scale=float(scale),
               cap=None if logits_soft_cap is None else float(logits_soft_cap), bq=bq, bk=bk)
  return _attention(st, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sinks)


def xla_parts(*, mask: Mask, scale: float, logits_soft_cap, block_sizes: BlockSizes):
  """(forward, backward) of `attention_parts`: no custom_vjp, gradients in float32 (float64)."""
  cap = None if logits_soft_cap is None else float(logits_soft_cap)

  def static(q, k):
    bq, bk = block_sizes.clipped(q.shape[1], k.shape[1])
    return _Static(mask=mask, scale=float(scale), cap=cap, bq=bq, bk=bk)

  def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _forward(static(q, k), q, k, v, q_pos, kv_pos, q_seg, kv_seg, None)

  def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, d_lse):
    res = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, None, out, lse)
    return _backward(static(q, k), res, (d_out, d_lse), keep_accumulation_dtype=True)[:3]

  return forward, backward
