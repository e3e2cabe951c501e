"""Pallas GPU kernels of the attention op: forward, dq, and dk/dv.

Grid (row block, batch, head); each program loops over its row block's visit list (read from
memory), so only key blocks that may be visible are loaded and computed, and wholly visible ones
skip the element mask. The body uses only `pl.ds` loads, matmuls, elementwise ops and row
reductions, which every Pallas GPU lowering and interpret mode accept; jax <= 0.11 lowers it
through Triton (`compiler_params` below are Triton's).

GQA: forward and dq programs run per query head and read K/V of head ``h // G`` (shared through
L2); the dk/dv program of a KV head loops over its G query heads, so dk/dv are summed in
registers and never written per query head.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lsm.kernels.attention import pallas_common as pc
from lsm.kernels.attention.backward import row_terms, sinks_grad
from lsm.kernels.attention.blocks import BlockSizes
from lsm.kernels.attention.mask import Mask

MIN_BLOCK = 16  # the smallest matmul tile GPU lowerings accept


def _pow2(x: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(x))


def default_block_sizes(groups: int) -> BlockSizes:
  del groups
  return BlockSizes(q=128, kv=64)


def kernel_block_sizes(block_sizes: BlockSizes, mask: Mask, tq: int, tk: int):
  bq, bk = pc.layout_block_sizes(mask, block_sizes.q, block_sizes.kv)
  return min(bq, _pow2(tq)), min(bk, _pow2(tk))


def hardware_block_error(bq: int, bk: int) -> str | None:
  for name, x in (("query", bq), ("key", bk)):
    if x < MIN_BLOCK or x & (x - 1):
      return (f"pallas_gpu needs {name} blocks that are powers of two >= {MIN_BLOCK}, got "
              f"({bq}, {bk}) (after clipping to the sequence and to mask.layout_block)")
  return None


def _compiler_params(d: int):
  from jax.experimental.pallas import triton as pl_triton  # only needed when compiling
  return pl_triton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


# ------------------------------------------------------------------------------------ kernels


def _visit(code, step, carry):
  """``step(masked, carry)``: without the element mask on wholly visible blocks."""
  return lax.cond((code & pc.FULL) != 0, functools.partial(step, False),
                  functools.partial(step, True), carry)


def _unpack(refs, has_seg, has_sinks=False):
  """(q_pos, kv_pos, q_seg, kv_seg, sinks, rest) refs; absent ones are None."""
  refs = list(refs)
  q_pos, kv_pos = refs.pop(0), refs.pop(0)
  q_seg = kv_seg = sinks = None
  if has_seg:
    q_seg, kv_seg = refs.pop(0), refs.pop(0)
  if has_sinks:
    sinks = refs.pop(0)
  return q_pos, kv_pos, q_seg, kv_seg, sinks, refs


def _forward_kernel(index_ref, code_ref, count_ref, q_ref, k_ref, v_ref, *refs, st: pc.KernelStatic,
                    has_seg: bool, has_sinks: bool):
  q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, sinks_ref, (o_ref, lse_ref) = _unpack(
      refs, has_seg, has_sinks)
  i, h = pl.program_id(0), pl.program_id(2)
  bq, bk = st.bq, st.bk
  q = q_ref[...]
  q_pos = q_pos_ref[...][:, None]
  q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

  def body(n, carry):
    j = index_ref[i * st.visits + n]
    code = code_ref[i * st.visits + n]
    keys = pl.ds(j * bk, bk)

    def step(masked, carry):
      m, l, acc = carry
      s, _ = pc.capped_scores(pc.dot(q, k_ref[keys, :], pc.NT_DIMS), st.cap)
      if masked:
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys][None, :]
        ok = pc.element_mask(st.mask, q_pos, kv_pos_ref[keys][None, :], q_seg, kv_seg, code)
        s = jnp.where(ok, s, -jnp.inf)
      m, p, alpha, l = pc.softmax_step(m, l, s)
      v = v_ref[keys, :]
      return m, l, alpha * acc + pc.dot(p.astype(v.dtype), v, pc.NN_DIMS)

    return _visit(code, step, carry)

  init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, o_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, count_ref[i], body, init)
  sink = None
  if sinks_ref is not None:
    sink = jnp.full((bq, 1), sinks_ref[h], jnp.float32)
  out, lse = pc.finish_rows(m, l, acc, sink)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(index_ref, code_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, row_ref,
               *refs, st: pc.KernelStatic, has_seg: bool):
  q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref, _, (dq_ref,) = _unpack(refs, has_seg)
  i = pl.program_id(0)
  bk = st.bk
  q, do = q_ref[...], do_ref[...]
  lse, row = lse_ref[...][:, None], row_ref[...][:, None]
  q_pos = q_pos_ref[...][:, None]
  q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

  def body(n, dq):
    j = index_ref[i * st.visits + n]
    code = code_ref[i * st.visits + n]
    keys = pl.ds(j * bk, bk)

    def step(masked, dq):
      k = k_ref[keys, :]
      s, tanh = pc.capped_scores(pc.dot(q, k, pc.NT_DIMS), st.cap)
      p = jnp.exp(s - lse)
      if masked:
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys][None, :]
        ok = pc.element_mask(st.mask, q_pos, kv_pos_ref[keys][None, :], q_seg, kv_seg, code)
        p = jnp.where(ok, p, 0.0)
      ds = pc.score_grad(p, pc.dot(do, v_ref[keys, :], pc.NT_DIMS), row, tanh)
      return dq + pc.dot(ds.astype(k.dtype), k, pc.NN_DIMS)

    return _visit(code, step, dq)

  dq = lax.fori_loop(0, count_ref[i], body, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, code_ref, count_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, row_ref,
                *refs, st: pc.KernelStatic, has_seg: bool):
  kv_pos_ref, q_pos_ref, kv_seg_ref, q_seg_ref, _, (dk_ref, dv_ref) = _unpack(refs, has_seg)
  j = pl.program_id(0)
  bq = st.bq
  k, v = k_ref[...], v_ref[...]
  kv_pos = kv_pos_ref[...][:, None]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...][:, None]

  def body(n, carry):
    i = index_ref[j * st.visits_t + n]
    code = code_ref[j * st.visits_t + n]
    queries = pl.ds(i * bq, bq)

    def step(masked, carry):
      dk, dv = carry
      ok = None
      if masked:
        q_seg = None if q_seg_ref is None else q_seg_ref[queries][None, :]
        ok = pc.element_mask(st.mask, q_pos_ref[queries][None, :], kv_pos, q_seg, kv_seg, code)
      for g in range(st.groups):  # the G query heads sharing this K/V block
        q, do = q_ref[queries, g, :], do_ref[queries, g, :]
        s_t, tanh_t = pc.capped_scores(pc.dot(k, q, pc.NT_DIMS), st.cap)  # [bk, bq]
        p_t = jnp.exp(s_t - lse_ref[g, queries][None, :])
        if ok is not None:
          p_t = jnp.where(ok, p_t, 0.0)
        dv = dv + pc.dot(p_t.astype(do.dtype), do, pc.NN_DIMS)
        ds_t = pc.score_grad(p_t, pc.dot(v, do, pc.NT_DIMS), row_ref[g, queries][None, :], tanh_t)
        dk = dk + pc.dot(ds_t.astype(q.dtype), q, pc.NN_DIMS)
      return dk, dv

    return _visit(code, step, carry)

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, count_ref[j], body, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------ calls


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, st: pc.KernelStatic, grid, plan, in_specs, args, out_specs, out_shape, d: int, name):
  plan_args = [plan.index, plan.code, plan.count]
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[_whole(x) for x in plan_args] + in_specs,
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=None if st.interpret else _compiler_params(d),
      interpret=st.interpret, name=name,
  )(*plan_args, *args)


def _prepared(st: pc.KernelStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """Padded q (pre-scaled), k, v, tokens and the padded sizes."""
  tq, tk = q.shape[1], k.shape[1]
  tq_p, tk_p = pc.round_up(tq, st.bq), pc.round_up(tk, st.bk)
  d_p, dv_p = _pow2(q.shape[3]), _pow2(v.shape[3])
  tokens = pc.padded_tokens(q_pos, kv_pos, q_seg, kv_seg, tq_p, tk_p)
  qs = (q.astype(jnp.float32) * st.scale).astype(q.dtype)
  q = pc.padded(pc.padded(qs, 1, tq_p), 3, d_p)
  k = pc.padded(pc.padded(k, 1, tk_p), 3, d_p)
  v = pc.padded(pc.padded(v, 1, tk_p), 3, dv_p)
  return q, k, v, tokens, (tq_p, tk_p, d_p, dv_p)


def _token_args(tokens, first_spec, second_spec):
  q_pos, kv_pos, q_seg, kv_seg = tokens
  args, specs = [q_pos, kv_pos], [first_spec, second_spec]
  if q_seg is not None:
    args += [q_seg, kv_seg]
    specs += [first_spec, second_spec]
  return args, specs


def _forward(st: pc.KernelStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, rows, cols):
  del cols
  b, tq, hq, _ = q.shape
  dv = v.shape[3]
  g, bq = st.groups, st.bq
  q, k, v, tokens, (tq_p, tk_p, d_p, dv_p) = _prepared(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  token_args, token_specs = _token_args(tokens, pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
                                        pl.BlockSpec((None, tk_p), lambda i, b_, h: (b_, 0)))
  in_specs = [
      pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h: (b_, i, h, 0)),
      pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h: (b_, 0, h // g, 0)),
      pl.BlockSpec((None, tk_p, None, dv_p), lambda i, b_, h: (b_, 0, h // g, 0)),
  ] + token_specs
  args = [q, k, v] + token_args
  if sinks is not None:
    args.append(sinks.astype(jnp.float32))
    in_specs.append(_whole(args[-1]))
  kernel = functools.partial(_forward_kernel, st=st, has_seg=tokens[2] is not None,
                             has_sinks=sinks is not None)
  out, lse = _call(
      kernel, st, (tq_p // bq, b, hq), rows, in_specs, args,
      [pl.BlockSpec((None, bq, None, dv_p), lambda i, b_, h: (b_, i, h, 0)),
       pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))],
      [pc.out_struct((b, tq_p, hq, dv_p), q.dtype, q),
       pc.out_struct((b, hq, tq_p), jnp.float32, q)], d_p, "lsm_attention_fwd")
  return out[:, :tq, :, :dv], lse[:, :, :tq]


def _backward(st: pc.KernelStatic, res, cotangents):
  q0, k0, v0, q_pos, kv_pos, q_seg, kv_seg, sinks, rows, cols, out, lse = res
  d_out, d_lse = cotangents
  b, tq, hq, d = q0.shape
  tk, hkv, dv = k0.shape[1], k0.shape[2], v0.shape[3]
  g, bq, bk = st.groups, st.bq, st.bk
  q, k, v, tokens, (tq_p, tk_p, d_p, dv_p) = _prepared(st, q0, k0, v0, q_pos, kv_pos, q_seg,
                                                        kv_seg)
  has_seg = tokens[2] is not None
  row_term, lse_safe = row_terms(out, d_out, lse, d_lse)
  do = pc.padded(pc.padded(d_out.astype(q.dtype), 1, tq_p), 3, dv_p)
  lse_p, row_p = pc.padded(lse_safe, 2, tq_p), pc.padded(row_term, 2, tq_p)

  # dq: per query block and head, over the forward's visit lists.
  token_args, token_specs = _token_args(tokens, pl.BlockSpec((None, bq), lambda i, b_, h: (b_, i)),
                                        pl.BlockSpec((None, tk_p), lambda i, b_, h: (b_, 0)))
  q_rows = lambda i, b_, h: (b_, i, h, 0)  # noqa: E731
  kv_all = lambda i, b_, h: (b_, 0, h // g, 0)  # noqa: E731
  stats = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
  in_specs = [pl.BlockSpec((None, bq, None, d_p), q_rows),
              pl.BlockSpec((None, tk_p, None, d_p), kv_all),
              pl.BlockSpec((None, tk_p, None, dv_p), kv_all),
              pl.BlockSpec((None, bq, None, dv_p), q_rows), stats, stats] + token_specs
  dq = _call(functools.partial(_dq_kernel, st=st, has_seg=has_seg), st, (tq_p // bq, b, hq),
             rows, in_specs, [q, k, v, do, lse_p, row_p] + token_args,
             pl.BlockSpec((None, bq, None, d_p), q_rows),
             pc.out_struct((b, tq_p, hq, d_p), q0.dtype, q), d_p, "lsm_attention_dq")

  # dk/dv: per key block and KV head, over the transposed visit lists and the G query heads.
  kv_pos_p, q_pos_p, kv_seg_p, q_seg_p = tokens[1], tokens[0], tokens[3], tokens[2]
  token_args, token_specs = _token_args(
      (kv_pos_p, q_pos_p, kv_seg_p, q_seg_p),
      pl.BlockSpec((None, bk), lambda j, b_, h: (b_, j)),
      pl.BlockSpec((None, tq_p), lambda j, b_, h: (b_, 0)))
  kv_own = lambda j, b_, h: (b_, j, h, 0)  # noqa: E731
  q_group = lambda j, b_, h: (b_, 0, h, 0)  # noqa: E731
  group_stats = pl.BlockSpec((None, g, tq_p), lambda j, b_, h: (b_, h, 0))
  in_specs = [pl.BlockSpec((None, bk, None, d_p), kv_own),
              pl.BlockSpec((None, bk, None, dv_p), kv_own),
              pl.BlockSpec((None, tq_p, g, d_p), q_group),
              pl.BlockSpec((None, tq_p, g, dv_p), q_group), group_stats, group_stats] + token_specs
  dk, dv_ = _call(
      functools.partial(_dkv_kernel, st=st, has_seg=has_seg), st, (tk_p // bk, b, hkv), cols,
      in_specs, [k, v, q, do, lse_p, row_p] + token_args,
      [pl.BlockSpec((None, bk, None, d_p), kv_own), pl.BlockSpec((None, bk, None, dv_p), kv_own)],
      [pc.out_struct((b, tk_p, hkv, d_p), k0.dtype, q),
       pc.out_struct((b, tk_p, hkv, dv_p), v0.dtype, q)], d_p, "lsm_attention_dkv")
  return (dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv_[:, :tk, :, :dv], None, None, None, None,
          sinks_grad(sinks, lse_safe, row_term), None, None)


# ------------------------------------------------------------------------------------ wiring


KERNEL = pc.Kernel("pallas_gpu", default_block_sizes, kernel_block_sizes, hardware_block_error,
                   _forward, _backward)
attention_pallas_gpu = KERNEL
unsupported_reason = KERNEL.unsupported_reason
