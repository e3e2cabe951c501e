"""Pallas TPU (Mosaic) kernels of the attention op: forward, dq, and dk/dv.

Grid (batch, KV head, row block, visit). The last axis walks the row block's visit list, passed
by scalar prefetch, so only key blocks that may be visible are loaded and computed; past the end
of a list the index map repeats the last block (no new DMA) and the step does nothing.

GQA: one grid step holds the G query heads of a KV head as ``G * bq`` rows against one loaded K/V
block. Forward and dq keep float32 ``m/l/acc`` in VMEM scratch across the visit axis. The dk/dv
kernel walks the query blocks of one key block and computes transposed scores ``k @ q.T``, so
every matmul is a plain or right-transposed product and the row statistics arrive lane-major.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lsm.kernels.attention import pallas_common as pc
from lsm.kernels.attention.backward import row_terms, sinks_grad
from lsm.kernels.attention.blocks import BlockSizes
from lsm.kernels.attention.mask import Mask

LANES = 128
SUBLANES = 16  # bf16 packs two rows per sublane


def default_block_sizes(groups: int) -> BlockSizes:
  """About 1024 query rows (G heads stacked) against 512 keys per step."""
  return BlockSizes(q=max(128, min(512, 1024 // groups)), kv=512)


def kernel_block_sizes(block_sizes: BlockSizes, mask: Mask, tq: int, tk: int):
  bq, bk = pc.layout_block_sizes(mask, block_sizes.q, block_sizes.kv)
  return min(bq, pc.round_up(tq, SUBLANES)), min(bk, pc.round_up(tk, LANES))


def hardware_block_error(bq: int, bk: int) -> str | None:
  """Why Mosaic cannot tile these blocks, or None."""
  if bq % SUBLANES or bk % LANES:
    return (f"pallas_tpu needs query blocks that are multiples of {SUBLANES} and key blocks "
            f"that are multiples of {LANES}, got ({bq}, {bk}) (after clipping to the sequence and "
            f"to mask.layout_block)")
  return None


# ------------------------------------------------------------------------------------ kernels


def _visit(code, step):
  """``step(masked)`` for an active visit: without the element mask on wholly visible blocks."""
  pl.when(code == pc.ACTIVE | pc.FULL | pc.LAYOUT_ON)(lambda: step(False))
  pl.when(((code & pc.ACTIVE) != 0) & ((code & pc.FULL) == 0))(lambda: step(True))


def _tokens(refs, has_seg):
  """Loaded (q_pos, kv_pos, q_seg, kv_seg) from their refs (segments may be absent)."""
  if has_seg:
    return tuple(r[...] for r in refs)
  return refs[0][...], refs[1][...], None, None


def _forward_kernel(index_ref, code_ref, *refs, st: pc.KernelStatic, has_seg: bool, has_sinks: bool):
  q_ref, k_ref, v_ref = refs[:3]
  n_tok = 4 if has_seg else 2
  tok_refs = refs[3:3 + n_tok]
  rest = refs[3 + n_tok:]
  sink_ref = rest[0] if has_sinks else None
  o_ref, lse_ref, m_sc, l_sc, acc_sc = rest[1:] if has_sinks else rest
  i, n = pl.program_id(2), pl.program_id(3)
  code = code_ref[i * st.visits + n]
  g, bq, d = q_ref.shape

  @pl.when(n == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...].reshape(g * bq, d)
    s, _ = pc.capped_scores(pc.dot(q, k_ref[...], pc.NT_DIMS), st.cap)
    if masked:
      q_pos, kv_pos, q_seg, kv_seg = _tokens(tok_refs, has_seg)
      ok = pc.element_mask(st.mask, q_pos, kv_pos, q_seg, kv_seg, code)
      s = pc.where_rows(ok, s, -jnp.inf, g)
    m_new, p, alpha, l_new = pc.softmax_step(m_sc[...], l_sc[...], s)
    v = v_ref[...]
    acc_sc[...] = alpha * acc_sc[...] + pc.dot(p.astype(v.dtype), v, pc.NN_DIMS)
    m_sc[...] = m_new
    l_sc[...] = l_new

  _visit(code, step)

  @pl.when(n == st.visits - 1)
  def _finish():
    sink = None
    if sink_ref is not None:
      sink = jnp.broadcast_to(sink_ref[...], (g, bq, 1)).reshape(g * bq, 1)
    out, lse = pc.finish_rows(m_sc[...], l_sc[...], acc_sc[...], sink)
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(lse_ref.shape)


def _dq_kernel(index_ref, code_ref, *refs, st: pc.KernelStatic, has_seg: bool):
  q_ref, k_ref, v_ref, do_ref, lse_ref, row_ref = refs[:6]
  n_tok = 4 if has_seg else 2
  tok_refs = refs[6:6 + n_tok]
  dq_ref, dq_sc = refs[6 + n_tok:]
  i, n = pl.program_id(2), pl.program_id(3)
  code = code_ref[i * st.visits + n]
  g, bq, d = q_ref.shape
  rows = g * bq

  @pl.when(n == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...].reshape(rows, d)
    k = k_ref[...]
    s, tanh = pc.capped_scores(pc.dot(q, k, pc.NT_DIMS), st.cap)
    p = jnp.exp(s - lse_ref[...].reshape(rows, 1))
    if masked:
      q_pos, kv_pos, q_seg, kv_seg = _tokens(tok_refs, has_seg)
      ok = pc.element_mask(st.mask, q_pos, kv_pos, q_seg, kv_seg, code)
      p = pc.where_rows(ok, p, 0.0, g)
    do = do_ref[...].reshape(rows, do_ref.shape[-1])
    dp = pc.dot(do, v_ref[...], pc.NT_DIMS)
    ds = pc.score_grad(p, dp, row_ref[...].reshape(rows, 1), tanh)
    dq_sc[...] += pc.dot(ds.astype(k.dtype), k, pc.NN_DIMS)

  _visit(code, step)

  @pl.when(n == st.visits - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, code_ref, *refs, st: pc.KernelStatic, has_seg: bool):
  k_ref, v_ref, q_ref, do_ref, lse_ref, row_ref = refs[:6]
  n_tok = 4 if has_seg else 2
  tok_refs = refs[6:6 + n_tok]
  dk_ref, dv_ref, dk_sc, dv_sc = refs[6 + n_tok:]
  j, n = pl.program_id(2), pl.program_id(3)
  code = code_ref[j * st.visits_t + n]

  @pl.when(n == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    ok = None
    if masked:
      kv_pos, q_pos, kv_seg, q_seg = _tokens(tok_refs, has_seg)
      ok = pc.element_mask(st.mask, q_pos, kv_pos, q_seg, kv_seg, code)  # [bk, bq]
    dk, dv = dk_sc[...], dv_sc[...]
    for h in range(st.groups):  # the G query heads sharing this K/V block
      q, do = q_ref[h], do_ref[h]
      s_t, tanh_t = pc.capped_scores(pc.dot(k, q, pc.NT_DIMS), st.cap)  # [bk, bq]
      p_t = jnp.exp(s_t - lse_ref[h])
      if ok is not None:
        p_t = jnp.where(ok, p_t, 0.0)
      dv += pc.dot(p_t.astype(do.dtype), do, pc.NN_DIMS)
      dp_t = pc.dot(v, do, pc.NT_DIMS)
      ds_t = pc.score_grad(p_t, dp_t, row_ref[h], tanh_t)
      dk += pc.dot(ds_t.astype(q.dtype), q, pc.NN_DIMS)
    dk_sc[...] = dk
    dv_sc[...] = dv

  _visit(code, step)

  @pl.when(n == st.visits_t - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------ layout


def _heads_major(x_BTHD, hkv: int, t_p: int, d_p: int):
  """[B, T, H, D] -> [B, Hkv, G, T_p, D_p] (zero-padded); G = 1 is squeezed for K/V."""
  b, _, h, _ = x_BTHD.shape
  x = pc.padded(pc.padded(x_BTHD, 1, t_p), 3, d_p)
  return x.reshape(b, t_p, hkv, h // hkv, d_p).transpose(0, 2, 3, 1, 4)


def _tokens_major(x_BHKGT, t: int, d: int):
  """Inverse of `_heads_major`: [B, Hkv, G, T_p, D_p] -> [B, T, H, D]."""
  b, hkv, g, t_p, d_p = x_BHKGT.shape
  return x_BHKGT.transpose(0, 3, 1, 2, 4).reshape(b, t_p, hkv * g, d_p)[:, :t, :, :d]


def _row_stats(x_BHT, hkv: int, t_p: int, lanes: bool):
  """[B, Hq, T] float32 -> [B, Hkv, G, T_p, 1], or [B, Hkv, G, 1, T_p] with ``lanes``."""
  b, h, _ = x_BHT.shape
  x = pc.padded(x_BHT, 2, t_p).reshape(b, hkv, h // hkv, t_p)
  return x[:, :, :, None, :] if lanes else x[..., None]


def _token_specs(block: int, other_block: int, index_fn, other_fn, has_seg: bool):
  """BlockSpecs for (col positions, row positions[, col segments, row segments])."""
  col = pl.BlockSpec((None, block, 1), index_fn)
  row = pl.BlockSpec((None, 1, other_block), other_fn)
  return [col, row, col, row] if has_seg else [col, row]


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _call(kernel, st: pc.KernelStatic, grid, in_specs, out_specs, out_shape, scratch, plan, args,
          name: str):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_compiler_params(),
      interpret=st.interpret,
      name=name,
  )(plan.index, plan.code, *args)


# ------------------------------------------------------------------------------------ calls


def _prepared(st: pc.KernelStatic, q, k, v, tokens):
  """Pre-scaled q [B, Hkv, G, Tq_p, D_p], k/v [B, Hkv, Tk_p, D_p], padded tokens, sizes."""
  tq, hkv, d, dv = q.shape[1], k.shape[2], q.shape[3], v.shape[3]
  tq_p, tk_p = pc.round_up(tq, st.bq), pc.round_up(k.shape[1], st.bk)
  d_p, dv_p = pc.round_up(d, LANES), pc.round_up(dv, LANES)
  qs = (q.astype(jnp.float32) * st.scale).astype(q.dtype)
  return (_heads_major(qs, hkv, tq_p, d_p), _heads_major(k, hkv, tk_p, d_p)[:, :, 0],
          _heads_major(v, hkv, tk_p, dv_p)[:, :, 0], pc.padded_tokens(*tokens, tq_p, tk_p),
          (tq_p, tk_p, d_p, dv_p))


def _forward(st: pc.KernelStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, rows, cols):
  del cols
  b, tq, hq, _ = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  g, bq, bk = st.groups, st.bq, st.bk
  q5, k4, v4, tokens, (tq_p, _, d_p, dv_p) = _prepared(st, q, k, v,
                                                       (q_pos, kv_pos, q_seg, kv_seg))
  q_pos, kv_pos, q_seg, kv_seg = tokens
  has_seg, has_sinks = q_seg is not None, sinks is not None
  visits = st.visits

  def kv_block(b_, h, i, n, index_ref, code_ref):
    return index_ref[i * visits + n]

  in_specs = [
      pl.BlockSpec((None, None, g, bq, d_p), lambda b_, h, i, n, *_: (b_, h, 0, i, 0)),
      pl.BlockSpec((None, None, bk, d_p),
                   lambda b_, h, i, n, *r: (b_, h, kv_block(b_, h, i, n, *r), 0)),
      pl.BlockSpec((None, None, bk, dv_p),
                   lambda b_, h, i, n, *r: (b_, h, kv_block(b_, h, i, n, *r), 0)),
  ] + _token_specs(bq, bk, lambda b_, h, i, n, *_: (b_, i, 0),
                   lambda b_, h, i, n, *r: (b_, 0, kv_block(b_, h, i, n, *r)), has_seg)
  args = [q5, k4, v4, q_pos[..., None], kv_pos[:, None, :]]
  if has_seg:
    args += [q_seg[..., None], kv_seg[:, None, :]]
  if has_sinks:
    in_specs.append(pl.BlockSpec((None, g, 1, 1), lambda b_, h, i, n, *_: (h, 0, 0, 0)))
    args.append(sinks.astype(jnp.float32).reshape(hkv, g, 1, 1))
  out_specs = [
      pl.BlockSpec((None, None, g, bq, dv_p), lambda b_, h, i, n, *_: (b_, h, 0, i, 0)),
      pl.BlockSpec((None, None, g, bq, 1), lambda b_, h, i, n, *_: (b_, h, 0, i, 0)),
  ]
  out_shape = [pc.out_struct((b, hkv, g, tq_p, dv_p), q.dtype, q),
               pc.out_struct((b, hkv, g, tq_p, 1), jnp.float32, q)]
  scratch = [pltpu.VMEM((g * bq, 1), jnp.float32), pltpu.VMEM((g * bq, 1), jnp.float32),
             pltpu.VMEM((g * bq, dv_p), jnp.float32)]
  kernel = functools.partial(_forward_kernel, st=st, has_seg=has_seg, has_sinks=has_sinks)
  out5, lse5 = _call(kernel, st, (b, hkv, tq_p // bq, visits), in_specs, out_specs, out_shape,
                     scratch, rows, args, "lsm_attention_fwd")
  out = _tokens_major(out5, tq, dv)
  lse = lse5[..., 0].reshape(b, hq, tq_p)[:, :, :tq]
  return out, lse


def _backward(st: pc.KernelStatic, res, cotangents):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, rows, cols, out, lse = res
  d_out, d_lse = cotangents
  b, tq, _, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g, bq, bk = st.groups, st.bq, st.bk
  q5, k4, v4, tokens, (tq_p, tk_p, d_p, dv_p) = _prepared(st, q, k, v,
                                                          (q_pos, kv_pos, q_seg, kv_seg))
  q_pos, kv_pos, q_seg, kv_seg = tokens
  has_seg = q_seg is not None
  row_term, lse_safe = row_terms(out, d_out, lse, d_lse)
  do5 = _heads_major(d_out.astype(q.dtype), hkv, tq_p, dv_p)

  # dq: the forward's grid and visit lists.
  visits = st.visits

  def kv_block(b_, h, i, n, index_ref, code_ref):
    return index_ref[i * visits + n]

  q_rows = lambda b_, h, i, n, *_: (b_, h, 0, i, 0)  # noqa: E731
  kv_rows = lambda b_, h, i, n, *r: (b_, h, kv_block(b_, h, i, n, *r), 0)  # noqa: E731
  in_specs = [
      pl.BlockSpec((None, None, g, bq, d_p), q_rows),
      pl.BlockSpec((None, None, bk, d_p), kv_rows),
      pl.BlockSpec((None, None, bk, dv_p), kv_rows),
      pl.BlockSpec((None, None, g, bq, dv_p), q_rows),
      pl.BlockSpec((None, None, g, bq, 1), q_rows),
      pl.BlockSpec((None, None, g, bq, 1), q_rows),
  ] + _token_specs(bq, bk, lambda b_, h, i, n, *_: (b_, i, 0),
                   lambda b_, h, i, n, *r: (b_, 0, kv_block(b_, h, i, n, *r)), has_seg)
  args = [q5, k4, v4, do5, _row_stats(lse_safe, hkv, tq_p, False),
          _row_stats(row_term, hkv, tq_p, False), q_pos[..., None], kv_pos[:, None, :]]
  if has_seg:
    args += [q_seg[..., None], kv_seg[:, None, :]]
  dq5 = _call(functools.partial(_dq_kernel, st=st, has_seg=has_seg), st,
              (b, hkv, tq_p // bq, visits), in_specs,
              pl.BlockSpec((None, None, g, bq, d_p), q_rows),
              pc.out_struct((b, hkv, g, tq_p, d_p), q.dtype, q),
              [pltpu.VMEM((g * bq, d_p), jnp.float32)], rows, args, "lsm_attention_dq")

  # dk/dv: per key block, the transposed visit lists.
  visits_t = st.visits_t

  def q_block(b_, h, j, n, index_ref, code_ref):
    return index_ref[j * visits_t + n]

  kv_own = lambda b_, h, j, n, *_: (b_, h, j, 0)  # noqa: E731
  q_vis = lambda b_, h, j, n, *r: (b_, h, 0, q_block(b_, h, j, n, *r), 0)  # noqa: E731
  q_lanes = lambda b_, h, j, n, *r: (b_, h, 0, 0, q_block(b_, h, j, n, *r))  # noqa: E731
  in_specs = [
      pl.BlockSpec((None, None, bk, d_p), kv_own),
      pl.BlockSpec((None, None, bk, dv_p), kv_own),
      pl.BlockSpec((None, None, g, bq, d_p), q_vis),
      pl.BlockSpec((None, None, g, bq, dv_p), q_vis),
      pl.BlockSpec((None, None, g, 1, bq), q_lanes),
      pl.BlockSpec((None, None, g, 1, bq), q_lanes),
  ] + _token_specs(bk, bq, lambda b_, h, j, n, *_: (b_, j, 0),
                   lambda b_, h, j, n, *r: (b_, 0, q_block(b_, h, j, n, *r)), has_seg)
  args = [k4, v4, q5, do5, _row_stats(lse_safe, hkv, tq_p, True),
          _row_stats(row_term, hkv, tq_p, True), kv_pos[..., None], q_pos[:, None, :]]
  if has_seg:
    args += [kv_seg[..., None], q_seg[:, None, :]]
  dk4, dv4 = _call(
      functools.partial(_dkv_kernel, st=st, has_seg=has_seg), st,
      (b, hkv, tk_p // bk, visits_t), in_specs,
      [pl.BlockSpec((None, None, bk, d_p), kv_own), pl.BlockSpec((None, None, bk, dv_p), kv_own)],
      [pc.out_struct((b, hkv, tk_p, d_p), k.dtype, q),
       pc.out_struct((b, hkv, tk_p, dv_p), v.dtype, q)],
      [pltpu.VMEM((bk, d_p), jnp.float32), pltpu.VMEM((bk, dv_p), jnp.float32)], cols, args,
      "lsm_attention_dkv")

  dq = _tokens_major(dq5, tq, d)
  dk = _tokens_major(dk4[:, :, None], tk, d)
  dv_ = _tokens_major(dv4[:, :, None], tk, dv)
  return (dq, dk, dv_, None, None, None, None, sinks_grad(sinks, lse_safe, row_term), None,
          None)


# ------------------------------------------------------------------------------------ wiring


KERNEL = pc.Kernel("pallas_tpu", default_block_sizes, kernel_block_sizes, hardware_block_error,
                   _forward, _backward)
attention_pallas_tpu = KERNEL
unsupported_reason = KERNEL.unsupported_reason
