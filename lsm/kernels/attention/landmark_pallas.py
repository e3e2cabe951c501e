"""Pallas kernels of landmark attention on block-aligned layouts: forward, dq and dk/dv.

The grouped softmax of `landmark.py` computed tile by tile. With ``S = block_size + 1`` and a
block-aligned layout (`landmark.is_block_aligned`), array tile ``n`` (tokens ``[n S, (n + 1) S)``)
holds exactly one block; each tile is padded to ``P`` rows (a power of two) and padding tokens get
segments of their own, so they are never seen and see nothing. The kernels also need the tiles of
one segment in block order (`tiles_in_order`): earlier blocks are then earlier tiles.

Forward, per (batch, query head, query tile n): for the earlier tiles m of n's segment, the
softmax of the scores inside tile m gives a partial output ``o_m`` whose top-level logit is the
landmark's score ``l_m``; (l_m, o_m) enter an online softmax like one key each. The own tile n
enters it key by key (causal by position). The log-sum-exp ``L`` of the top-level logits is saved.

Backward, with ``delta = dO . out``, ``w_m = exp(l_m - L)`` and ``p_mj`` the probabilities inside
earlier tile m: regular keys get ``ds = w_m p_mj (dO . v_j - dO . o_m)`` and ``dv += w_m p_mj dO``,
the landmark key gets ``ds = w_m (dO . o_m - delta)``; own-tile keys get the flash-attention
terms ``p = exp(s - L)``, ``ds = p (dO . v_j - delta)``. The dq kernel walks a query tile's tiles
like the forward; the dk/dv kernel of a key tile walks the later tiles of its segment and the G
query heads of its KV head (GQA: K/V are never repeated, dk/dv are summed in the kernel).

Each program gets its (batch, KV head)'s whole K/V (forward, dq) or Q/dO (dk/dv) as one block
and loads tile by tile inside the kernel, so one body runs in interpret mode, through Triton (GPU)
and through Mosaic (TPU). Loop bounds (the first/last tile of each tile's segment) come by scalar
prefetch on TPU and as an input elsewhere; tiles of other segments interleaved in that range are
masked, not skipped. On TPU the whole block is copied to VMEM, which bounds T (a few thousand
tokens at D = 128): this suits the blocks of memory-augmented models, not long-context prefill.
Matmuls accumulate in float32 and the softmax statistics are float32; float64 is refused.
``retrieved`` is expanded to float32 flags per (query, tile) in two orientations: about 8 times
the memory of the bool mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lsm.kernels.attention import pallas_common as pc

_KEY_PAD = int(np.iinfo(np.int32).min)  # segment of padding keys (the XLA paths' sentinel)
_QUERY_PAD = _KEY_PAD + 1  # segment of padding queries: no key is in it


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernels are specialised on (the custom_vjp's non-differentiable argument)."""

  block_size: int
  scale: float
  groups: int  # query heads per KV head
  target: str  # "tpu" (Mosaic or the TPU interpreter), "gpu" (Triton) or "interpret"
  interpret: object  # False, True or pltpu.InterpretParams


def _target(interpret) -> str:
  if isinstance(interpret, pltpu.InterpretParams):
    return "tpu"
  if interpret:
    return "interpret"
  platform = pc.platform()
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"landmark_pallas: interpret=False needs a TPU or GPU backend, got "
                     f"{platform!r}")
  return platform


def _tile_rows(span: int, target: str, dtype) -> int:
  """Rows P of a tile: the span rounded up to a power of two the target can tile."""
  least = {"gpu": 16, "tpu": 16 if jnp.dtype(dtype).itemsize < 4 else 8, "interpret": 8}[target]
  return max(least, pl.next_power_of_2(span))


def _feature_pad(d: int, target: str) -> int:
  return {"gpu": max(16, pl.next_power_of_2(d)), "tpu": pc.round_up(d, 128),
          "interpret": d}[target]


# ------------------------------------------------------------------------------------ layout


def _tiled(x, span: int, nb: int, rows: int, fill=0):
  """[B, T, ...] -> [B, NB, rows, ...]: tile n holds tokens [n S, (n + 1) S), then ``fill``."""
  x = pc.padded(x, 1, nb * span, fill)
  x = x.reshape(x.shape[:1] + (nb, span) + x.shape[2:])
  return pc.padded(x, 2, rows, fill)


def _sorted_tiles(tile_seg):
  """Per row of [B, NB] tile segments: the tile order sorted by (segment, index) and the rank of
  each sorted tile's segment."""

  def one(seg):
    order = jnp.lexsort((jnp.arange(seg.shape[0]), seg)).astype(jnp.int32)
    seg_sorted = seg[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), seg_sorted[1:] != seg_sorted[:-1]])
    return order, jnp.cumsum(starts.astype(jnp.int32)) - 1

  return jax.vmap(one)(tile_seg)


def tiles_in_order(positions, segment_ids, block_size: int):
  """Whether, within every segment, the block of a tile grows with the tile index (positions and
  segment ids [B, T]; a scalar bool, traceable). With `landmark.is_block_aligned` this is what the
  kernels need: documents laid out front to back, in any interleaving of segments."""
  span = block_size + 1
  nb = -(-positions.shape[1] // span)
  tile_seg = _tiled(segment_ids, span, nb, span)[:, :, 0]
  tile_block = _tiled(positions, span, nb, span)[:, :, 0] // span
  order, rank = _sorted_tiles(tile_seg)
  block_sorted = jnp.take_along_axis(tile_block, order, axis=1)
  same = rank[:, 1:] == rank[:, :-1]
  return jnp.all(~same | (block_sorted[:, 1:] > block_sorted[:, :-1]))


def _segment_tile_range(tile_seg):
  """(first, last) tile index of each tile's segment, [B, NB] int32 each."""
  nb = tile_seg.shape[1]

  def one(order, rank):
    first = jax.ops.segment_min(order, rank, num_segments=nb)[rank]
    last = jax.ops.segment_max(order, rank, num_segments=nb)[rank]
    return (jnp.zeros((nb,), jnp.int32).at[order].set(first),
            jnp.zeros((nb,), jnp.int32).at[order].set(last))

  return jax.vmap(one)(*_sorted_tiles(tile_seg))


def _retrieval_tables(retrieved, tile_block, span: int, rows: int, nb_p: int):
  """``retrieved`` [B, Hq, T, NB'] at each tile's block as float32 flags: [B, Hq, NBq, P, NBk_p]
  (query rows x key tiles) and [B, Hq, NBk, NBq_p, P] (key tile x query tiles x rows)."""
  b, hq, t, nb_r = retrieved.shape
  nb = tile_block.shape[1]
  index = jnp.broadcast_to(jnp.clip(tile_block, 0, nb_r - 1)[:, None, None, :], (b, hq, t, nb))
  taken = jnp.take_along_axis(retrieved, index, axis=3) & (tile_block < nb_r)[:, None, None, :]
  rows_first = _tiled(jnp.moveaxis(taken.astype(jnp.float32), 1, 2), span, nb, rows)
  rows_first = jnp.moveaxis(rows_first, 3, 1)  # [B, Hq, NBq, P, NBk]
  tiles_first = pc.padded(rows_first.transpose(0, 1, 4, 2, 3), 3, nb_p)
  return pc.padded(rows_first, 4, nb_p), tiles_first


# ------------------------------------------------------------------------ in-kernel math


def _scores(a, b, scale: float):
  return pc.dot(a, b, pc.NT_DIMS) * scale


def _pick(table, index, axis: int):
  """Entry ``index`` of a 2-D table along ``axis`` (kept as size 1), by a masked sum: no dynamic
  slicing of values, which not every lowering has."""
  shape = [1, 1]
  shape[axis] = table.shape[axis]
  hit = lax.broadcasted_iota(jnp.int32, tuple(shape), axis) == index
  return jnp.sum(jnp.where(hit, table, 0.0), axis=axis, keepdims=True)


def _earlier_block(s, same, axis: int, block_size: int):
  """Scores ``s`` of queries against an earlier block's tile, keys along ``axis``; ``same``
  whether a (query, key) pair is in one segment (and the block retrieved). Returns (landmark key
  mask, probabilities inside the block (0 off its regular keys), landmark logits (-inf where
  the block does not take part))."""
  shape = [1, 1]
  shape[axis] = s.shape[axis]
  key = lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
  regular = same & (key < block_size)
  top = jnp.max(jnp.where(regular, s, -jnp.inf), axis=axis, keepdims=True)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  e = jnp.where(regular, jnp.exp(s - top), 0.0)
  z = jnp.sum(e, axis=axis, keepdims=True)
  landmark = key == block_size
  logit = jnp.sum(jnp.where(landmark, s, 0.0), axis=axis, keepdims=True)
  return landmark, e / jnp.where(z > 0, z, 1.0), jnp.where(z > 0, logit, -jnp.inf)


def _unpack(refs, has_retrieval: bool):
  return (refs[0], refs[1:]) if has_retrieval else (None, refs)


def _forward_kernel(first_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref,
                    *refs, st: _Static, nb: int, has_retrieval: bool):
  ret_ref, (o_ref, lse_ref) = _unpack(refs, has_retrieval)
  b, n = pl.program_id(0), pl.program_id(2)
  q, q_seg = q_ref[...], q_seg_ref[...]
  ret = None if ret_ref is None else ret_ref[...]

  def earlier(m, carry):
    top, total, acc = carry
    same = q_seg == k_seg_ref[m]
    if ret is not None:
      same = same & (_pick(ret, m, 1) > 0)
    _, p, logit = _earlier_block(_scores(q, k_ref[m], st.scale), same, 1, st.block_size)
    v = v_ref[m]
    top_new = jnp.maximum(top, logit)
    safe = jnp.where(top_new == -jnp.inf, 0.0, top_new)
    alpha, beta = jnp.exp(top - safe), jnp.exp(logit - safe)
    return (top_new, alpha * total + beta,
            alpha * acc + beta * pc.dot(p.astype(v.dtype), v, pc.NN_DIMS))

  rows = q.shape[0]
  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, o_ref.shape[-1]), jnp.float32))
  top, total, acc = lax.fori_loop(first_ref[b * nb + n], n, earlier, init)
  ok = (q_seg == k_seg_ref[n]) & (k_pos_ref[n] <= q_pos_ref[...])
  top, p, alpha, total = pc.softmax_step(top, total, jnp.where(ok, _scores(q, k_ref[n], st.scale),
                                                               -jnp.inf))
  v = v_ref[n]
  acc = alpha * acc + pc.dot(p.astype(v.dtype), v, pc.NN_DIMS)
  out, lse = pc.finish_rows(top, total, acc, None)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(first_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
               k_pos_ref, k_seg_ref, *refs, st: _Static, nb: int, has_retrieval: bool):
  ret_ref, (dq_ref,) = _unpack(refs, has_retrieval)
  b, n = pl.program_id(0), pl.program_id(2)
  q, q_seg, do = q_ref[...], q_seg_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]  # [P, 1]; lse is +inf on rows that see nothing
  ret = None if ret_ref is None else ret_ref[...]

  def earlier(m, dq):
    k, v = k_ref[m], v_ref[m]
    same = q_seg == k_seg_ref[m]
    if ret is not None:
      same = same & (_pick(ret, m, 1) > 0)
    landmark, p, logit = _earlier_block(_scores(q, k, st.scale), same, 1, st.block_size)
    w = jnp.exp(logit - lse)
    dp = pc.dot(do, v, pc.NT_DIMS)
    d_o = jnp.sum(p * dp, axis=1, keepdims=True)  # dO . o_m
    ds = w * p * (dp - d_o) + jnp.where(landmark, w * (d_o - delta), 0.0)
    return dq + pc.dot(ds.astype(k.dtype), k, pc.NN_DIMS)

  dq = lax.fori_loop(first_ref[b * nb + n], n, earlier, jnp.zeros(q.shape, jnp.float32))
  k = k_ref[n]
  ok = (q_seg == k_seg_ref[n]) & (k_pos_ref[n] <= q_pos_ref[...])
  p = jnp.where(ok, jnp.exp(_scores(q, k, st.scale) - lse), 0.0)
  ds = p * (pc.dot(do, v_ref[n], pc.NT_DIMS) - delta)
  dq = dq + pc.dot(ds.astype(k.dtype), k, pc.NN_DIMS)
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(last_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, k_pos_ref, k_seg_ref,
                q_pos_ref, q_seg_ref, *refs, st: _Static, nb: int, has_retrieval: bool):
  ret_ref, (dk_ref, dv_ref) = _unpack(refs, has_retrieval)
  b, m = pl.program_id(0), pl.program_id(2)
  k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]  # keys along rows: k_seg is [P, 1]
  rets = None if ret_ref is None else [ret_ref[g] for g in range(st.groups)]

  def add(dk, dv, g, n, ds_of):
    """dk, dv plus query head g of query tile n; ``ds_of(s, dp, lse, delta) -> (ds, p dv)``."""
    q, do = q_ref[g, n], do_ref[g, n]
    dp = pc.dot(v, do, pc.NT_DIMS)  # [P keys, P queries]
    ds, pv = ds_of(_scores(k, q, st.scale), dp, lse_ref[g, n], delta_ref[g, n])
    return (dk + pc.dot(ds.astype(q.dtype), q, pc.NN_DIMS),
            dv + pc.dot(pv.astype(do.dtype), do, pc.NN_DIMS))

  ok = (k_seg == q_seg_ref[m]) & (k_pos_ref[...] <= q_pos_ref[m])

  def own(s, dp, lse, delta):
    p = jnp.where(ok, jnp.exp(s - lse), 0.0)
    return p * (dp - delta), p

  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for g in range(st.groups):
    dk, dv = add(dk, dv, g, m, own)

  def later(n, carry):
    dk, dv = carry
    same_segment = k_seg == q_seg_ref[n]
    for g in range(st.groups):
      same = same_segment
      if rets is not None:
        same = same & (_pick(rets[g], n, 0) > 0)

      def earlier(s, dp, lse, delta, same=same):
        landmark, p, logit = _earlier_block(s, same, 0, st.block_size)
        w = jnp.exp(logit - lse)
        d_o = jnp.sum(p * dp, axis=0, keepdims=True)
        wp = w * p
        return wp * (dp - d_o) + jnp.where(landmark, w * (d_o - delta), 0.0), wp

      dk, dv = add(dk, dv, g, n, earlier)
    return dk, dv

  dk, dv = lax.fori_loop(m + 1, last_ref[b * nb + m] + 1, later, (dk, dv))
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------ calls


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, st: _Static, grid, bounds, in_specs, args, out_specs, out_shape, name: str):
  """pallas_call with the per-tile loop bounds [B * NB] as scalar prefetch (TPU) or an input."""
  if st.target == "tpu":
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid)),
        interpret=st.interpret, name=name)(bounds, *args)
  params = None
  if st.target == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # only needed when compiling
    params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        in_specs=[_whole(bounds)] + in_specs, out_specs=out_specs,
                        compiler_params=params, interpret=st.interpret, name=name)(bounds, *args)


def _query_tile_specs(st: _Static, q5, k5, v5, tokens, tables):
  """Inputs of the programs of grid (batch, query head, query tile): own query tile, the KV
  head's whole K/V and key tokens, the own tile's query tokens, its retrieval flags."""
  _, _, pos, q_seg, k_seg = tokens
  nb, rows = q5.shape[2], q5.shape[3]
  here = lambda b_, h, n, *_: (b_, h, n, 0, 0)  # noqa: E731
  kv_head = lambda b_, h, n, *_: (b_, lax.div(h, np.int32(st.groups)), 0, 0, 0)  # noqa: E731
  col = pl.BlockSpec((None, None, rows, 1), lambda b_, h, n, *_: (b_, n, 0, 0))
  row_all = pl.BlockSpec((None, nb, 1, rows), lambda b_, h, n, *_: (b_, 0, 0, 0))
  specs = [pl.BlockSpec((None, None, None, rows, q5.shape[4]), here),
           pl.BlockSpec((None, None, nb, rows, k5.shape[4]), kv_head),
           pl.BlockSpec((None, None, nb, rows, v5.shape[4]), kv_head)]
  args = [q5, k5, v5]
  token_specs = [col, col, row_all, row_all]
  token_args = [pos[..., None], q_seg[..., None], pos[:, :, None, :], k_seg[:, :, None, :]]
  table_specs, table_args = [], []
  if tables is not None:
    table_specs = [pl.BlockSpec((None, None, None, rows, tables[0].shape[4]), here)]
    table_args = [tables[0]]
  return here, (specs, args), (token_specs, token_args), (table_specs, table_args)


def _forward(st: _Static, q5, k5, v5, tokens, tables):
  b, hq, nb, rows, _ = q5.shape
  dv = v5.shape[4]
  here, (specs, args), (tok_specs, tok_args), (tab_specs, tab_args) = _query_tile_specs(
      st, q5, k5, v5, tokens, tables)
  kernel = functools.partial(_forward_kernel, st=st, nb=nb, has_retrieval=tables is not None)
  return _call(
      kernel, st, (b, hq, nb), tokens[0], specs + tok_specs + tab_specs, args + tok_args + tab_args,
      [pl.BlockSpec((None, None, None, rows, dv), here),
       pl.BlockSpec((None, None, None, rows, 1), here)],
      [pc.out_struct((b, hq, nb, rows, dv), q5.dtype, q5),
       pc.out_struct((b, hq, nb, rows, 1), jnp.float32, q5)], "lsm_landmark_fwd")


def _backward(st: _Static, res, d_out):
  q5, k5, v5, tokens, tables, out, lse = res
  b, hq, nb, rows, d = q5.shape
  hkv, dv, g = k5.shape[1], v5.shape[4], st.groups
  _, last, pos, q_seg, k_seg = tokens
  do5 = d_out.astype(q5.dtype)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # exp(s - lse) is exactly 0 on unseen rows
  has_retrieval = tables is not None

  here, (specs, args), (tok_specs, tok_args), (tab_specs, tab_args) = _query_tile_specs(
      st, q5, k5, v5, tokens, tables)
  stat = pl.BlockSpec((None, None, None, rows, 1), here)
  dq = _call(functools.partial(_dq_kernel, st=st, nb=nb, has_retrieval=has_retrieval), st,
             (b, hq, nb), tokens[0],
             specs + [pl.BlockSpec((None, None, None, rows, dv), here), stat, stat] + tok_specs
             + tab_specs, args + [do5, lse, delta] + tok_args + tab_args,
             pl.BlockSpec((None, None, None, rows, d), here),
             pc.out_struct(q5.shape, q5.dtype, q5), "lsm_landmark_dq")

  # dk/dv: grid (batch, KV head, key tile); the G query heads' whole Q, dO and row statistics.
  own = lambda b_, h, m, *_: (b_, h, m, 0, 0)  # noqa: E731
  group = lambda b_, h, m, *_: (b_, h, 0, 0, 0)  # noqa: E731
  col = pl.BlockSpec((None, None, rows, 1), lambda b_, h, m, *_: (b_, m, 0, 0))
  row_all = pl.BlockSpec((None, nb, 1, rows), lambda b_, h, m, *_: (b_, 0, 0, 0))
  stats = pl.BlockSpec((None, g, nb, 1, rows), group)
  specs = [pl.BlockSpec((None, None, None, rows, d), own),
           pl.BlockSpec((None, None, None, rows, dv), own),
           pl.BlockSpec((None, g, nb, rows, d), group),
           pl.BlockSpec((None, g, nb, rows, dv), group),
           stats, stats, col, col, row_all, row_all]
  args = [k5, v5, q5, do5, jnp.swapaxes(lse, 3, 4), jnp.swapaxes(delta, 3, 4), pos[..., None],
          k_seg[..., None], pos[:, :, None, :], q_seg[:, :, None, :]]
  if has_retrieval:
    specs.append(pl.BlockSpec((None, g, None, tables[1].shape[3], rows), own))
    args.append(tables[1])
  dk, dv_ = _call(functools.partial(_dkv_kernel, st=st, nb=nb, has_retrieval=has_retrieval), st,
                  (b, hkv, nb), last, specs, args,
                  [pl.BlockSpec((None, None, None, rows, d), own),
                   pl.BlockSpec((None, None, None, rows, dv), own)],
                  [pc.out_struct(k5.shape, k5.dtype, q5), pc.out_struct(v5.shape, v5.dtype, q5)],
                  "lsm_landmark_dkv")
  return dq, dk, dv_, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q5, k5, v5, tokens, tables):
  return _forward(st, q5, k5, v5, tokens, tables)[0]


def _attend_forward(st: _Static, q5, k5, v5, tokens, tables):
  out, lse = _forward(st, q5, k5, v5, tokens, tables)
  return out, (q5, k5, v5, tokens, tables, out, lse)


_attend.defvjp(_attend_forward, _backward)


# ------------------------------------------------------------------------------------ the op


def landmark_pallas(q, k, v, positions, segment_ids, retrieved, block_size: int, scale: float,
                    interpret=None):
  """Landmark attention by the Pallas kernels (see the module docstring).

  The layout must be block-aligned with the tiles of each segment in block order
  (`landmark.is_block_aligned` and `tiles_in_order`); this is not checked here.
  `landmark_attention(implementation="pallas")` checks it and runs other layouts on the XLA path.

  Args:
    q: [B, T, Hq, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv] in float32, bfloat16 or float16.
    positions, segment_ids: [B, T] integers.
    retrieved: None or bool [B, Hq, T, NB'] (see `landmark_attention`).
    block_size: regular tokens per block; scale: score scale.
    interpret: None (interpret mode on CPU only), True, False or a `pltpu.InterpretParams` (the
      TPU interpreter, which runs the TPU call with scalar prefetch).

  Returns out [B, T, Hq, Dv] in q's dtype.
  """
  if jnp.dtype(q.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise TypeError(f"landmark_pallas: q, k and v must be float32, bfloat16 or float16 (the "
                    f"kernels compute in float32), got {q.dtype}; use implementation='xla' or "
                    f"'reference' for float64")
  interpret = pc.interpret_mode("pallas", interpret)
  target = _target(interpret)
  b, t, hq, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  span = block_size + 1
  nb = -(-t // span)
  rows = _tile_rows(span, target, q.dtype)
  st = _Static(block_size=int(block_size), scale=float(scale), groups=hq // hkv, target=target,
               interpret=interpret)

  def heads_major(x, width):
    x = _tiled(pc.padded(x, 3, _feature_pad(width, target)), span, nb, rows)
    return x.transpose(0, 3, 1, 2, 4)  # [B, H, NB, P, D_p]

  pos = _tiled(positions.astype(jnp.int32), span, nb, rows)
  k_seg = _tiled(segment_ids.astype(jnp.int32), span, nb, rows, _KEY_PAD)
  q_seg = jnp.where(_tiled(jnp.ones((b, t), bool), span, nb, rows, False), k_seg, _QUERY_PAD)
  first, last = _segment_tile_range(k_seg[:, :, 0])  # every tile starts with a real token
  tokens = (first.reshape(-1), last.reshape(-1), pos, q_seg, k_seg)
  tables = None
  if retrieved is not None:
    nb_p = pl.next_power_of_2(nb) if target == "gpu" else nb
    tables = _retrieval_tables(retrieved, pos[:, :, 0] // span, span, rows, nb_p)
  out5 = _attend(st, heads_major(q, d), heads_major(k, d), heads_major(v, dv), tokens, tables)
  out = out5[:, :, :, :span, :dv].transpose(0, 2, 3, 1, 4).reshape(b, nb * span, hq, dv)
  return out[:, :t]
