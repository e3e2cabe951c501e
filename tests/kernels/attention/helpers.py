"""Shared inputs, runners and the error measure of the attention tests.

Every comparison runs a fast implementation (``xla``, or a Pallas kernel, interpreted on CPU) in
the dtype under test against ``implementation="reference"`` in float64 on the same draws (drawn in
float64, then cast), and measures the error with `normalised_error`.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from lsm.kernels.attention import BlockSizes, Mask, attention

# Small blocks so short sequences span several blocks, and lengths below are not multiples.
BLOCKS = BlockSizes(q=8, kv=16)
# Every fast path; the Pallas kernels run in interpret mode on CPU.
FAST = ("xla", "pallas_tpu", "pallas_gpu")
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
# An all-zero reference (e.g. the gradient of a row that sees nothing) must be matched exactly.
_TINY = 1e-30


def seed_of(*parts) -> int:
  """A stable seed per test case, so every case draws fresh inputs."""
  return zlib.crc32(repr(parts).encode())


def normalised_error(x, ref) -> float:
  """``max|x - ref| / max(max|ref|, tiny)`` over the finite entries of ``ref``.

  Non-finite entries of ``ref`` (``lse = -inf`` of rows that see nothing) must be equal in ``x``
  and are left out of the measure; every other entry of ``x`` must be finite.
  """
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  finite = np.isfinite(ref)
  np.testing.assert_array_equal(x[~finite], ref[~finite], err_msg="non-finite entries differ")
  assert np.all(np.isfinite(x[finite])), "non-finite values where the reference is finite"
  peak = max(float(np.max(np.abs(ref[finite]), initial=0.0)), _TINY)
  return float(np.max(np.abs(x[finite] - ref[finite]), initial=0.0)) / peak


def assert_close(x, ref, dtype, what: str):
  err = normalised_error(x, ref)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert err <= tol, f"{what}: normalised error {err:.3g} > {tol:g} ({jnp.dtype(dtype).name})"


@dataclasses.dataclass(frozen=True)
class Shape:
  b: int = 2
  tq: int = 37
  tk: int = 37
  hq: int = 4
  hkv: int = 2
  d: int = 8
  dv: int = 8


@dataclasses.dataclass
class Inputs:
  """float64 draws: q, k, v, sinks (or None) and the cotangent weights of out and lse."""

  q: np.ndarray
  k: np.ndarray
  v: np.ndarray
  sinks: np.ndarray | None
  w_out: np.ndarray
  w_lse: np.ndarray

  def arrays(self, dtype):
    """q, k, v, sinks cast to ``dtype`` and the weights in its accumulation dtype."""
    acc = jnp.promote_types(dtype, jnp.float32)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return (cast(self.q), cast(self.k), cast(self.v), cast(self.sinks),
            jnp.asarray(self.w_out, acc), jnp.asarray(self.w_lse, acc))


def draw(seed: int, shape: Shape, *, sinks: bool = False) -> Inputs:
  rng = np.random.default_rng(seed)
  s = shape
  return Inputs(
      q=rng.standard_normal((s.b, s.tq, s.hq, s.d)),
      k=rng.standard_normal((s.b, s.tk, s.hkv, s.d)),
      v=rng.standard_normal((s.b, s.tk, s.hkv, s.dv)),
      sinks=rng.standard_normal(s.hq) if sinks else None,
      w_out=rng.standard_normal((s.b, s.tq, s.hq, s.dv)),
      w_lse=rng.standard_normal((s.b, s.hq, s.tq)))


def packed_segments(rng, batch: int, length: int, max_docs: int):
  """Random packed layouts: segment ids [B, T] (contiguous documents) and positions that
  restart at 0 in every document."""
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(max_docs, length) - 1,
                              replace=False))
    starts = np.concatenate([[0], cuts])
    seg[row] = np.cumsum(np.isin(np.arange(length), cuts))
    pos[row] = np.arange(length) - starts[seg[row]]
  return seg, pos


_STATIC = ("implementation", "mask", "block_sizes", "scale", "logits_soft_cap")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, sinks, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *,
            implementation, mask, block_sizes, scale, logits_soft_cap):
  """(out, lse); positions and segment ids are traced arguments."""
  return attention(q, k, v, mask=mask, q_positions=q_positions, kv_positions=kv_positions,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks,
                   scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation,
                   return_lse=True, block_sizes=block_sizes)


def weighted_loss(out, lse, w_out, w_lse):
  """A random linear functional of out and of the finite lse, so both cotangents are exercised
  (lse is -inf on rows that see nothing; those are left out)."""
  finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.sum(out.astype(w_out.dtype) * w_out) + jnp.sum(finite_lse.astype(w_lse.dtype) * w_lse)


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward_and_grads(q, k, v, sinks, w_out, w_lse, q_positions, kv_positions, q_segment_ids,
                      kv_segment_ids, *, implementation, mask, block_sizes, scale,
                      logits_soft_cap):
  """(out, lse, {"q", "k", "v"[, "sinks"]: gradient of `weighted_loss`})."""

  def loss(q, k, v, sinks):
    out, lse = attention(q, k, v, mask=mask, q_positions=q_positions, kv_positions=kv_positions,
                         q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         sinks=sinks, scale=scale, logits_soft_cap=logits_soft_cap,
                         implementation=implementation, return_lse=True,
                         block_sizes=block_sizes)
    return weighted_loss(out, lse, w_out, w_lse), (out, lse)

  names = ("q", "k", "v") if sinks is None else ("q", "k", "v", "sinks")
  (_, (out, lse)), grads = jax.value_and_grad(
      loss, argnums=tuple(range(len(names))), has_aux=True)(q, k, v, sinks)
  return out, lse, dict(zip(names, grads))


def run(implementation: str, dtype, inputs: Inputs, *, grads: bool = True, mask: Mask = Mask(),
        block_sizes: BlockSizes = BLOCKS, scale=None, logits_soft_cap=None, q_positions=None,
        kv_positions=None, q_segment_ids=None, kv_segment_ids=None):
  """(out, lse, grads or None) of one implementation with the inputs cast to ``dtype``."""
  q, k, v, sinks, w_out, w_lse = inputs.arrays(dtype)
  static = dict(implementation=implementation, mask=mask, block_sizes=block_sizes, scale=scale,
                logits_soft_cap=logits_soft_cap)
  tokens = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if grads:
    return forward_and_grads(q, k, v, sinks, w_out, w_lse, *tokens, **static)
  return (*forward(q, k, v, sinks, *tokens, **static), None)


def assert_matches_reference(implementation: str, inputs: Inputs, dtype, *, grads: bool = True,
                             **kwargs):
  """Runs ``implementation`` in ``dtype`` and the reference in float64; asserts out, lse (and
  gradients) agree within the tolerance of ``dtype``. Returns both results."""
  got = run(implementation, dtype, inputs, grads=grads, **kwargs)
  want = run("reference", jnp.float64, inputs, grads=grads, **kwargs)
  assert got[0].dtype == jnp.dtype(dtype), got[0].dtype
  assert got[1].dtype == jnp.float32, got[1].dtype
  assert_close(got[0], want[0], dtype, "out")
  assert_close(got[1], want[1], dtype, "lse")
  if grads:
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
      assert got[2][name].dtype == jnp.dtype(dtype), (name, got[2][name].dtype)
      assert_close(got[2][name], want[2][name], dtype, f"d{name}")
  return got, want


# ------------------------------------------------------------------------------------ masks


def allowed_by_definition(mask: Mask, qp: int, kp: int) -> bool:
  """The semantics in `lsm.kernels.attention.mask`'s docstring, one pair at a time in Python."""
  structural = True
  if mask.causal:
    structural &= kp <= qp
  if mask.window is not None:
    left, right = mask.window
    structural &= qp - left <= kp <= qp + right
  if mask.chunk is not None:
    structural &= qp // mask.chunk == kp // mask.chunk
  if mask.layout is not None:
    bq, bk = mask.layout_block
    rows, cols = mask.layout.shape
    r, c = qp // bq, kp // bk
    structural &= 0 <= r < rows and 0 <= c < cols and bool(mask.layout[r, c])
  sink = mask.sink_tokens is not None and kp < mask.sink_tokens and (not mask.causal or kp <= qp)
  prefix = mask.prefix is not None and qp < mask.prefix and kp < mask.prefix
  return bool(structural or sink or prefix)


def mask_strategy(max_layout_blocks: int = 8):
  """Hypothesis strategy over every `Mask` field and their combinations."""

  @st.composite
  def masks(draw):
    layout = layout_block = None
    if draw(st.booleans()):
      rows = draw(st.integers(1, max_layout_blocks))
      cols = draw(st.integers(1, max_layout_blocks))
      bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
      layout = np.array(bits, bool).reshape(rows, cols)
      layout_block = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    return Mask(
        causal=draw(st.booleans()),
        window=draw(st.none() | st.tuples(st.integers(0, 12), st.integers(0, 12))),
        chunk=draw(st.none() | st.integers(1, 16)),
        prefix=draw(st.none() | st.integers(0, 12)),
        sink_tokens=draw(st.none() | st.integers(0, 5)),
        layout=layout, layout_block=layout_block)

  return masks()
