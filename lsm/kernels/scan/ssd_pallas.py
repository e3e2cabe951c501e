"""Pallas kernels of `ssd` (TPU via Mosaic, GPU via Triton) for its matmul-heavy steps.

Two kernels, each with grid (batch, head, chunk), all parallel:

  chunk states    S_c = x^T (w ⊙ B)                       [P, N] per chunk
  chunk outputs   y   = ((C B^T) ⊙ L ⊙ Δ_u) x + e ⊙ (C H_c^T) + D x

The short scan over chunk states that gives H_c (the state entering chunk c) and the per-chunk
decay terms (`ssd_xla.chunk_decays`) stay in XLA. Arrays are laid out heads-major in chunks,
[B, H, C, Q, P], so every block's last two dims are whole array dims (legal Mosaic blocks for any
chunk size). The per-step scalars (cumulative decay s, Δ, reset count r, state weight w, carry-in
weight e, D) travel as rows of one [8, Q] block, which avoids lane-padded [Q, 1] arrays in HBM;
the TPU kernels turn it into columns with an identity matmul rather than a transpose.

The backward is XLA: the vjp of the chunked XLA algorithm, recomputed from the inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lsm.kernels.attention import pallas_common as pc
from lsm.kernels.scan.ssd_xla import chunk_decays, chunked, pass_states, ssd_chunked

TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b
ROW_S, ROW_DELTA, ROW_R, ROW_W, ROW_E, ROW_D = range(6)
SCALAR_ROWS = 8  # rows of the per-step scalar block: one sublane tile, a power of two
_GPU_MIN = 16  # Triton's smallest matmul dim; GPU blocks are powers of two at least this
TPU_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class SsdStatic:
  backend: str  # "tpu" or "gpu"
  chunk: int
  interpret: bool


def kernel_chunk(backend: str, chunk_size: int, length: int, interpret) -> int:
  """The chunk the kernels run with: ``chunk_size`` clipped to the (rounded-up) sequence."""
  if interpret:
    return min(chunk_size, length)
  if backend == "gpu":
    return min(chunk_size, max(_GPU_MIN, pl.next_power_of_2(length)))
  return min(chunk_size, pc.round_up(length, TPU_SUBLANES))


def hardware_error(backend: str, chunk_size: int) -> str | None:
  """Why the compiled kernel cannot run with this chunk size, or None."""
  if backend == "gpu" and (chunk_size < _GPU_MIN or chunk_size & (chunk_size - 1)):
    return f"pallas_gpu needs a chunk_size that is a power of two >= {_GPU_MIN}, got {chunk_size}"
  if backend == "tpu" and chunk_size % TPU_SUBLANES:
    return f"pallas_tpu needs a chunk_size that is a multiple of {TPU_SUBLANES}, got {chunk_size}"
  return None


# ------------------------------------------------------------------------------------ kernels


class _Scalars:
  """The per-step scalars of one chunk as rows [1, Q] or columns [Q, 1].

  Mosaic gets the columns from one identity matmul (exact at HIGHEST precision) and value slices;
  Triton has no value slices but loads each row from the ref and adds a unit dimension."""

  def __init__(self, rows_ref, backend: str):
    self.rows_ref, self.backend = rows_ref, backend
    if backend == "tpu":
      self.rows = rows_ref[...]
      q = self.rows.shape[1]
      eye = (lax.broadcasted_iota(jnp.int32, (q, q), 0)
             == lax.broadcasted_iota(jnp.int32, (q, q), 1)).astype(jnp.float32)
      self.cols = pc.dot(eye, self.rows, pc.NT_DIMS)

  def row(self, k: int):
    if self.backend == "tpu":
      return self.rows[k:k + 1, :]
    return self.rows_ref[k, :][None, :]

  def col(self, k: int):
    if self.backend == "tpu":
      return self.cols[:, k:k + 1]
    return self.rows_ref[k, :][:, None]


def _states_kernel(x_ref, b_ref, rows_ref, s_ref, *, backend: str):
  w = _Scalars(rows_ref, backend).col(ROW_W)
  b = b_ref[...]
  bw = (b.astype(jnp.float32) * w).astype(b.dtype)
  s_ref[...] = pc.dot(x_ref[...], bw, TN_DIMS)


def _outputs_kernel(x_ref, b_ref, c_ref, rows_ref, h_ref, y_ref, *, backend: str):
  sc = _Scalars(rows_ref, backend)
  x, c = x_ref[...], c_ref[...]
  q = x.shape[0]
  causal = (lax.broadcasted_iota(jnp.int32, (q, q), 0)
            >= lax.broadcasted_iota(jnp.int32, (q, q), 1))
  same_doc = sc.col(ROW_R) == sc.row(ROW_R)
  decay = jnp.exp(jnp.where(causal & same_doc, sc.col(ROW_S) - sc.row(ROW_S), -jnp.inf))
  scores = pc.dot(c, b_ref[...], pc.NT_DIMS) * decay * sc.row(ROW_DELTA)
  y = pc.dot(scores.astype(x.dtype), x, pc.NN_DIMS)
  y = y + sc.col(ROW_E) * pc.dot(c, h_ref[...].astype(c.dtype), pc.NT_DIMS)
  y = y + sc.col(ROW_D) * x.astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)


# ------------------------------------------------------------------------------------ calls


def _compiler_params(st: SsdStatic):
  if st.interpret:
    return None
  if st.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  from jax.experimental.pallas import triton as pl_triton
  return pl_triton.CompilerParams(num_warps=4, num_stages=2)


def _call(st: SsdStatic, kernel, grid, in_specs, out_spec, out_shape, args, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec,
                        out_shape=out_shape, compiler_params=_compiler_params(st),
                        interpret=st.interpret, name=name)(*args)


def _padded_dim(st: SsdStatic, d: int) -> int:
  """Triton blocks are powers of two >= 16 (zero padding; interpret mode pads too, so tests run
  the padded path)."""
  return max(_GPU_MIN, pl.next_power_of_2(d)) if st.backend == "gpu" else d


def _forward(st: SsdStatic, x, delta, A, B, C, D, h0, reset):
  b, t, h, p = x.shape
  g, n = B.shape[2:]
  rep, q = h // g, st.chunk
  operand = jnp.result_type(x, B, C)
  p_p, n_p = _padded_dim(st, p), _padded_dim(st, n)
  delta_c, s, r, w, e, decay = chunk_decays(delta, A, reset, q, jnp.float32)
  nc = s.shape[2]
  rows = [s, delta_c, jnp.broadcast_to(r.astype(jnp.float32), s.shape), w, e,
          jnp.broadcast_to(D.astype(jnp.float32)[None, :, None, None], s.shape)]
  rows += [jnp.zeros_like(s)] * (SCALAR_ROWS - len(rows))
  rows_BHCRQ = jnp.stack(rows, axis=3)

  def heads_major(v, last):  # [B, T, K, D] -> [B, K, C, Q, last]
    v = pc.padded(v.astype(operand), 3, last)
    return jnp.moveaxis(chunked(v, 1, q), 3, 1)

  x5, b5, c5 = heads_major(x, p_p), heads_major(B, n_p), heads_major(C, n_p)
  own = lambda b_, h_, c_: (b_, h_, c_, 0, 0)  # noqa: E731
  group = lambda b_, h_, c_: (b_, lax.div(h_, jnp.int32(rep)), c_, 0, 0)  # noqa: E731
  x_spec = pl.BlockSpec((None, None, None, q, p_p), own)
  bc_spec = pl.BlockSpec((None, None, None, q, n_p), group)
  rows_spec = pl.BlockSpec((None, None, None, rows_BHCRQ.shape[3], q), own)
  state_spec = pl.BlockSpec((None, None, None, p_p, n_p), own)
  grid = (b, h, nc)

  states = _call(st, functools.partial(_states_kernel, backend=st.backend), grid,
                 [x_spec, bc_spec, rows_spec], state_spec,
                 pc.out_struct((b, h, nc, p_p, n_p), jnp.float32, x),
                 [x5, b5, rows_BHCRQ], "lsm_ssd_chunk_states")
  h0_p = pc.padded(pc.padded(h0.astype(jnp.float32), 2, p_p), 3, n_p)
  h_in, h_last = pass_states(states, decay, h0_p)
  y5 = _call(st, functools.partial(_outputs_kernel, backend=st.backend), grid,
             [x_spec, bc_spec, bc_spec, rows_spec, state_spec],
             x_spec, pc.out_struct((b, h, nc, q, p_p), x.dtype, x),
             [x5, b5, c5, rows_BHCRQ, h_in], "lsm_ssd_chunk_outputs")
  y = jnp.moveaxis(y5.reshape(b, h, nc * q, p_p), 1, 2)[:, :t, :, :p]
  return y, h_last[:, :, :p, :n]


def _forward_with_residuals(st, *args):
  return _forward(st, *args), args


def _backward(st: SsdStatic, residuals, cotangents):
  *inputs, reset = residuals
  dy, dh = cotangents

  def chunked_xla(*inputs):
    return ssd_chunked(*inputs, reset, chunk=st.chunk, dtype=jnp.float32)

  _, vjp = jax.vjp(chunked_xla, *inputs)
  return (*vjp((dy.astype(jnp.float32), dh)), None)


_ssd = jax.custom_vjp(_forward, nondiff_argnums=(0,))
_ssd.defvjp(_forward_with_residuals, _backward)


def ssd_pallas(x, delta, A, B, C, D, h0, reset, *, backend: str, chunk: int, interpret):
  """(y [B, T, H, P] in x's dtype, h_last [B, H, P, N] float32); Δ is final (bias, softplus),
  D and h0 are arrays (zeros when the caller gave none), ``chunk`` from `kernel_chunk`."""
  st = SsdStatic(backend=backend, chunk=chunk, interpret=interpret)
  return _ssd(st, x, delta.astype(jnp.float32), A, B, C, D, h0, reset)

