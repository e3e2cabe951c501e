"""What the TPU and GPU Pallas kernels share: visit plans and the math inside a kernel.

A *visit plan* lists, per query block, the key blocks that may hold a visible pair (from
`blocks.block_tables`) and a code per visit: whether the block is wholly visible (no element
mask) and whether the block-sparse layout is on for it. When positions and segment ids are known
at trace time the plan is computed then and the kernel grid is exactly as long as the longest
list; with traced positions it is computed on device and the grid allows every block.

The in-kernel functions take and return values (not refs) and use only elementwise ops, row
reductions and matmuls, so one body serves Mosaic TPU, the GPU lowering and interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsm.kernels.attention.blocks import BlockSizes, TokenBlocks, block_tables, visit_lists
from lsm.kernels.attention.mask import Mask, array_module
from lsm.log import log_once

# Visit codes (bit flags) passed to the kernels.
ACTIVE = 1  # the visit computes something
FULL = 2  # every pair of the block is allowed: no element mask
LAYOUT_ON = 4  # the block-sparse layout allows the whole block (else it allows none of it)

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def is_concrete(*xs) -> bool:
  return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


def platform() -> str:
  """The default backend as 'cpu', 'gpu' or 'tpu' (tests replace it to check dispatch)."""
  backend = jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def interpret_mode(implementation: str, interpret=None):
  """``interpret`` for pallas_call: forced by the caller, else on whenever the backend is CPU."""
  if interpret is not None:
    return interpret
  if platform() == "cpu":
    log_once(f"attention: implementation={implementation!r} runs in Pallas interpret mode on "
             f"CPU (correct but slow; for stepping through the kernel, not for speed)")
    return True
  return False


@functools.partial(jax.tree_util.register_dataclass, data_fields=["index", "code", "count"],
                   meta_fields=["visits", "counts"])
@dataclasses.dataclass(frozen=True)
class VisitPlan:
  """Per query block (rows) or key block (``transposed``): which blocks to visit, and how."""

  index: jax.Array  # [n_rows * visits] int32 block index; repeats the last one past the list
  code: jax.Array  # [n_rows * visits] int32 ACTIVE | FULL | LAYOUT_ON; 0 past the list
  count: jax.Array  # [n_rows] int32 length of each list
  visits: int  # static: grid steps per row block
  counts: tuple[int, ...] | None  # visits per row block when known at trace time


def _layout_tables(mask: Mask, qt: TokenBlocks, kt: TokenBlocks):
  """(layout wholly on [nq, nk], layout partly on [nq, nk]) per kernel block pair."""
  q_lo, q_hi = qt.ranges(qt.pos)
  k_lo, k_hi = kt.ranges(kt.pos)
  count, area = mask.layout_cells(q_lo[:, None], q_hi[:, None], k_lo[None], k_hi[None])
  xp = array_module(count, area)
  return xp.all(count == area, axis=-1), xp.any((count > 0) & (count < area), axis=-1)


def _plan_rows(visible, code, transposed: bool) -> VisitPlan:
  xp = array_module(visible, code)
  if transposed:
    visible, code = visible.T, code.T
  order, counts = visit_lists(visible)
  concrete = xp is np
  visits = max(1, int(np.max(counts))) if concrete else visible.shape[1]
  n = xp.arange(visits)[None, :]
  last = xp.maximum(counts[:, None] - 1, 0)
  index = xp.take_along_axis(order, xp.minimum(n, last), axis=1)
  code = xp.take_along_axis(code, index, axis=1)
  code = xp.where(n < counts[:, None], code, 0)
  return VisitPlan(index.reshape(-1).astype(np.int32), code.reshape(-1).astype(np.int32),
                   counts.astype(np.int32), visits,
                   tuple(int(c) for c in counts) if concrete else None)


def plan_visits(mask: Mask, q_pos, kv_pos, q_seg, kv_seg, bq: int, bk: int):
  """(rows plan, transposed plan, layout mixed?) for kernel blocks of bq queries and bk keys.

  Computed with numpy when positions and ids are known at trace time (the plan is then static
  and the grid as short as the longest list), else on device. ``layout mixed`` is a bool in the
  first case: True means some visited kernel block straddles layout cells of different value,
  which the kernels cannot mask. It is None with traced positions or without a layout.
  """
  tokens = (q_pos, kv_pos, q_seg, kv_seg)
  if is_concrete(*tokens):
    tokens = tuple(None if x is None else np.asarray(x) for x in tokens)
  q_pos, kv_pos, q_seg, kv_seg = tokens
  qt = TokenBlocks.build(q_pos, q_seg, bq)
  kt = TokenBlocks.build(kv_pos, kv_seg, bk)
  visible, full = block_tables(mask, qt, kt)
  xp = array_module(visible, full)
  code = xp.where(full, ACTIVE | FULL, ACTIVE)
  mixed = None
  if mask.layout is None:
    code = code | LAYOUT_ON
  else:
    layout_on, partly = _layout_tables(mask, qt, kt)
    code = code | xp.where(layout_on, LAYOUT_ON, 0)
    if xp is np:
      mixed = bool(np.any(partly & visible))
  rows = _plan_rows(visible, code, transposed=False)
  cols = _plan_rows(visible, code, transposed=True)
  return rows, cols, mixed


# ------------------------------------------------------------------------ in-kernel math


def element_mask(mask: Mask, q_pos, kv_pos, q_seg, kv_seg, code):
  """Allowed pairs of one block; positions/ids broadcast against each other (column vs row)."""
  structural, extra = mask.allowed_parts(q_pos, kv_pos, with_layout=False)
  if mask.layout is not None:
    structural = structural & ((code & LAYOUT_ON) != 0)
  ok = structural if extra is None else structural | extra
  if q_seg is not None:
    ok = ok & (q_seg == kv_seg)
  return ok


def capped_scores(s, cap):
  """(cap * tanh(s / cap), tanh(s / cap)) or (s, None)."""
  if cap is None:
    return s, None
  t = jnp.tanh(s / cap)
  return cap * t, t


def softmax_step(m_prev, l_prev, s):
  """One online-softmax step on scores ``s`` [R, bk] (masked entries -inf); stats [R, 1].

  Returns (m_new, p, alpha, l_new): accumulators are rescaled by ``alpha`` and get ``p @ v``.
  """
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  return m_new, p, alpha, alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)


def finish_rows(m, l, acc, sink):
  """(out, lse) from the running stats; ``sink`` [R, 1] logits or None. Unseen rows: 0, -inf."""
  if sink is not None:
    m_all = jnp.maximum(m, sink)
    alpha = jnp.exp(m - m_all)
    l = alpha * l + jnp.exp(sink - m_all)
    acc = acc * alpha
    m = m_all
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  return acc / safe_l, jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def score_grad(p, dp, row_term, tanh):
  """d(loss)/d(q_scaled . k) from probabilities, d(loss)/dp and the row term delta - dlse."""
  ds = p * (dp - row_term)
  return ds if tanh is None else ds * (1.0 - tanh * tanh)


# ------------------------------------------------------------------------ the op around a kernel


@dataclasses.dataclass(frozen=True)
class KernelStatic:
  """What a kernel is specialised on (hashable; the custom_vjp's non-differentiable argument)."""

  mask: Mask
  scale: float
  cap: float | None
  bq: int
  bk: int
  groups: int  # query heads per KV head
  visits: int  # grid steps / loop bound per query block
  visits_t: int  # per key block (dk/dv)
  interpret: object  # False, True or pltpu.InterpretParams


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One Pallas backend of the op: its block rules, and forward/backward made a custom_vjp.

  ``forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, rows, cols) -> (out, lse)``;
  ``backward(st, residuals, (d_out, d_lse))`` with residuals the inputs then out, lse.
  """

  name: str
  default_block_sizes: Callable[[int], BlockSizes]
  block_sizes: Callable[[BlockSizes, Mask, int, int], tuple[int, int]]
  hardware_error: Callable[[int, int], str | None]
  forward: Callable
  backward: Callable

  def __post_init__(self):
    op = jax.custom_vjp(self.forward, nondiff_argnums=(0,))

    def forward_with_residuals(st, *args):
      out, lse = self.forward(st, *args)
      return (out, lse), (*args, out, lse)

    op.defvjp(forward_with_residuals, self.backward)
    object.__setattr__(self, "op", op)

  def _blocks(self, block_sizes, mask, tq, tk, groups):
    return self.block_sizes(block_sizes or self.default_block_sizes(groups), mask, tq, tk)

  def unsupported_reason(self, mask: Mask, q_pos, kv_pos, q_seg, kv_seg,
                         block_sizes: BlockSizes | None, tq: int, tk: int, groups: int,
                         interpret) -> str | None:
    """Why this kernel cannot run these arguments (compiled unless ``interpret``), or None."""
    bq, bk = self._blocks(block_sizes, mask, tq, tk, groups)
    if not interpret:
      error = self.hardware_error(bq, bk)
      if error:
        return error
    return unsupported_layout_reason(mask, q_pos, kv_pos, q_seg, kv_seg, bq, bk)

  def _static(self, q, k, mask, tokens, scale, logits_soft_cap, block_sizes, interpret):
    groups = q.shape[2] // k.shape[2]
    reason = self.unsupported_reason(mask, *tokens, block_sizes, q.shape[1], k.shape[1],
                                     groups, interpret)
    if reason:
      raise ValueError(f"attention: implementation={self.name!r} cannot run this call: {reason}")
    bq, bk = self._blocks(block_sizes, mask, q.shape[1], k.shape[1], groups)
    rows, cols, _ = plan_visits(mask, *tokens, bq, bk)
    st = KernelStatic(mask=mask, scale=float(scale),
                      cap=None if logits_soft_cap is None else float(logits_soft_cap), bq=bq,
                      bk=bk, groups=groups, visits=rows.visits, visits_t=cols.visits,
                      interpret=interpret)
    return st, rows, cols

  def __call__(self, q, k, v, *, mask: Mask, q_positions, kv_positions, q_segment_ids,
               kv_segment_ids, sinks, scale: float, logits_soft_cap,
               block_sizes: BlockSizes | None, interpret=None):
    """Arguments validated by `api.attention`; ``interpret`` None means "on CPU"."""
    interpret = interpret_mode(self.name, interpret)
    tokens = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    st, rows, cols = self._static(q, k, mask, tokens, scale, logits_soft_cap, block_sizes,
                                  interpret)
    return self.op(st, q, k, v, *tokens, sinks, rows, cols)

  def parts(self, *, mask: Mask, scale: float, logits_soft_cap, block_sizes: BlockSizes | None,
            interpret=None):
    """(forward, backward) of `api.attention_parts`: no custom_vjp, no sinks; the visit plan is
    made per call from that call's positions."""
    interpret = interpret_mode(self.name, interpret)

    def forward(q, k, v, *tokens):
      st, rows, cols = self._static(q, k, mask, tokens, scale, logits_soft_cap, block_sizes,
                                    interpret)
      return self.forward(st, q, k, v, *tokens, None, rows, cols)

    def backward(q, k, v, *args):
      tokens, (out, lse, d_out, d_lse) = args[:4], args[4:]
      st, rows, cols = self._static(q, k, mask, tokens, scale, logits_soft_cap, block_sizes,
                                    interpret)
      res = (q, k, v, *tokens, None, rows, cols, out.astype(q.dtype), lse)
      grads = self.backward(st, res, (d_out.astype(q.dtype), d_lse))[:3]
      return tuple(g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in grads)

    return forward, backward


# ------------------------------------------------------------------------ wrapper helpers


def padded(x, axis: int, length: int, value=0):
  """``x`` padded with ``value`` along ``axis`` to ``length``."""
  if x.shape[axis] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def padded_tokens(q_pos, kv_pos, q_seg, kv_seg, tq_p: int, tk_p: int):
  """Positions and segment ids padded to the kernel lengths; padded keys are never visible.

  Padding keys get segment id -1 (and queries keep theirs), so when keys are padded and the
  caller gave no segment ids, ids are made up: 0 for every real token.
  """
  tk = kv_pos.shape[1]
  if q_seg is None and tk_p != tk:
    q_seg = jnp.zeros(q_pos.shape, jnp.int32)
    kv_seg = jnp.zeros(kv_pos.shape, jnp.int32)
  if q_seg is not None:
    q_seg = padded(q_seg, 1, tq_p, -2)
    kv_seg = padded(kv_seg, 1, tk_p, -1)
  return padded(q_pos, 1, tq_p), padded(kv_pos, 1, tk_p), q_seg, kv_seg


def unsupported_layout_reason(mask: Mask, q_pos, kv_pos, q_seg, kv_seg, bq: int, bk: int):
  """Why the kernels cannot apply ``mask.layout`` with these blocks, or None if they can."""
  if mask.layout is None:
    return None
  if not is_concrete(q_pos, kv_pos):
    return ("a block-sparse mask.layout needs positions known at trace time (the kernels apply "
            "the layout per block and must check that no block straddles layout cells)")
  _, _, mixed = plan_visits(mask, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  if mixed:
    return (f"kernel blocks of ({bq}, {bk}) tokens straddle layout cells of "
            f"mask.layout_block={mask.layout_block} with these positions; give block_sizes that "
            f"divide the layout block")
  return None


def layout_block_sizes(mask: Mask, bq: int, bk: int) -> tuple[int, int]:
  """Shrink kernel blocks so they tile the layout's blocks (never straddle a layout cell)."""
  if mask.layout is None:
    return bq, bk
  lbq, lbk = mask.layout_block
  return int(np.gcd(bq, lbq)), int(np.gcd(bk, lbk))


def where_rows(ok, x, fill, groups: int):
  """``x`` [groups * bq, bk] with ``ok`` [bq, bk] applied to every group of rows."""
  rows, cols = x.shape
  x3 = x.reshape(groups, rows // groups, cols)
  return jnp.where(ok[None], x3, fill).reshape(rows, cols)


def out_struct(shape, dtype, like):
  """ShapeDtypeStruct that varies over the mesh axes ``like`` varies over (inside shard_map)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def dot(a, b, dims):
  """float32-accumulated matmul; float32 operands at full precision (no bf16/tf32 passes)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
