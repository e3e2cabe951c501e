"""`Mask`: a static, hashable description of which (query, key) pairs may attend.

A mask is evaluated on token *positions*, never on array indices, so ring hops, load-balanced
token layouts, decoding offsets and retrieved memory blocks are all expressed through positions.

Semantics (every field optional, all combinable)::

    structural(i, j) = causal(i, j) and window(i, j) and chunk(i, j) and layout(i, j)
    allowed(i, j)    = (structural(i, j) or sink(i, j) or prefix(i, j)) and q_seg[i] == kv_seg[j]

with ``qp = q_pos[i]``, ``kp = kv_pos[j]`` and

- ``causal``:            ``kp <= qp``
- ``window=(l, r)``:     ``qp - l <= kp <= qp + r``
- ``chunk=n``:           ``qp // n == kp // n``
- ``layout``:            ``layout[qp // bq, kp // bk]`` (``False`` outside the layout)
- ``sink_tokens=n``:     ``kp < n`` (and ``kp <= qp`` when causal) — visible whatever the window,
                         chunk or layout say (StreamingLLM attention sinks)
- ``prefix=n``:          ``qp < n and kp < n`` — the prefix attends bidirectionally (prefix-LM)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
import numpy as np


def array_module(*xs):
  """numpy when every input is a numpy array or scalar (concrete, computed now), else jax.numpy.

  Block-level mask tests run with numpy when positions are known at trace time, so visit plans
  are static even inside ``shard_map`` or ``jit``.
  """
  return np if all(isinstance(x, (np.ndarray, np.generic, int)) for x in xs) else jnp


def _floor_div(x, n: int):
  """``x // n`` for positions in (-2**30, 2**30), without the ``sign`` op of ``jnp.floor_divide``
  (Mosaic lowers ``sign`` only when it knows the TPU generation)."""
  if array_module(x) is np:
    return x // n
  x = jnp.asarray(x)
  k = (1 << 30) // n
  shifted = x + x.dtype.type(k * n)
  return lax.div(shifted, x.dtype.type(n)) - x.dtype.type(k)  # truncation of x >= 0 is the floor


def _check_nonneg_int(name: str, value: Any, *, positive: bool = False) -> None:
  low = 1 if positive else 0
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    allowed = "a positive int" if positive else "a non-negative int"
    raise ValueError(f"Mask.{name} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
  """Which (query, key) position pairs may attend; see the module docstring for the semantics.

  Examples: ``Mask(causal=True)``, ``Mask(causal=True, window=(1024, 0))``,
  ``Mask(causal=True, chunk=8192)``, ``Mask(causal=True, prefix=64)``,
  ``Mask(causal=True, window=(512, 0), sink_tokens=4)``,
  ``Mask(layout=np_bool_array, layout_block=(128, 128))``.
  """

  causal: bool = False
  window: tuple[int, int] | None = None
  chunk: int | None = None
  prefix: int | None = None
  sink_tokens: int | None = None
  layout: np.ndarray | None = None
  layout_block: tuple[int, int] | None = None

  def __post_init__(self):
    if not isinstance(self.causal, (bool, np.bool_)):
      raise TypeError(f"Mask.causal must be a bool, got {self.causal!r}")
    if self.window is not None:
      if not isinstance(self.window, (tuple, list)) or len(self.window) != 2:
        raise ValueError(f"Mask.window must be a (left, right) pair of non-negative ints, "
                         f"got {self.window!r}")
      for side, value in zip(("left", "right"), self.window):
        _check_nonneg_int(f"window[{side}]", value)
      object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))
    for name in ("chunk",):
      if getattr(self, name) is not None:
        _check_nonneg_int(name, getattr(self, name), positive=True)
    for name in ("prefix", "sink_tokens"):
      if getattr(self, name) is not None:
        _check_nonneg_int(name, getattr(self, name))
    if (self.layout is None) != (self.layout_block is None):
      raise ValueError("Mask.layout and Mask.layout_block must be given together, got "
                       f"layout={'set' if self.layout is not None else None} and "
                       f"layout_block={self.layout_block!r}")
    if self.layout is not None:
      layout = np.asarray(self.layout)
      if layout.ndim != 2 or layout.dtype != np.bool_:
        raise ValueError("Mask.layout must be a 2-D boolean array [Tq/bq, Tk/bk], got "
                         f"shape {layout.shape} dtype {layout.dtype}")
      if not isinstance(self.layout_block, (tuple, list)) or len(self.layout_block) != 2:
        raise ValueError("Mask.layout_block must be a (bq, bk) pair of positive ints, got "
                         f"{self.layout_block!r}")
      for side, value in zip(("bq", "bk"), self.layout_block):
        _check_nonneg_int(f"layout_block[{side}]", value, positive=True)
      layout = layout.copy()
      layout.setflags(write=False)
      object.__setattr__(self, "layout", layout)
      object.__setattr__(self, "layout_block",
                         (int(self.layout_block[0]), int(self.layout_block[1])))

  # Hash and equality by value so a Mask can be a static argument of jit.
  def _key(self):
    layout = None if self.layout is None else (self.layout.shape, self.layout.tobytes())
    return (bool(self.causal), self.window, self.chunk, self.prefix, self.sink_tokens, layout,
            self.layout_block)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, Mask) and self._key() == other._key()

  @property
  def has_structure(self) -> bool:
    return bool(self.causal) or any(
        x is not None for x in (self.window, self.chunk, self.layout))

  # ---------------------------------------------------------------- element level

  def allowed(self, q_pos, kv_pos):
    """Boolean ``allowed`` for broadcastable integer position arrays (segments not included)."""
    structural, extra = self.allowed_parts(q_pos, kv_pos, with_layout=True)
    return structural if extra is None else structural | extra

  def allowed_parts(self, q_pos, kv_pos, *, with_layout: bool):
    """``(structural, extra)`` with ``allowed = structural | extra`` (``extra`` may be None).

    ``structural`` is causal, window and chunk, and the layout only if ``with_layout``: the Pallas
    kernels, which cannot gather from the layout per element, apply it per block instead.
    Only elementwise integer ops, so it runs inside kernels.
    """
    q_pos = jnp.asarray(q_pos)
    kv_pos = jnp.asarray(kv_pos)
    ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), dtype=bool)
    if self.causal:
      ok &= kv_pos <= q_pos
    if self.window is not None:
      left, right = self.window
      ok &= (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
    if self.chunk is not None:
      ok &= _floor_div(q_pos, self.chunk) == _floor_div(kv_pos, self.chunk)
    if self.layout is not None and with_layout:
      bq, bk = self.layout_block
      rows, cols = self.layout.shape
      qb = jnp.floor_divide(q_pos, bq)
      kb = jnp.floor_divide(kv_pos, bk)
      inside = (qb >= 0) & (qb < rows) & (kb >= 0) & (kb < cols)
      table = jnp.asarray(self.layout)
      ok &= inside & table[jnp.clip(qb, 0, rows - 1), jnp.clip(kb, 0, cols - 1)]
    extra = None
    if self.sink_tokens is not None:
      extra = kv_pos < self.sink_tokens
      if self.causal:
        extra &= kv_pos <= q_pos
    if self.prefix is not None:
      prefix = (q_pos < self.prefix) & (kv_pos < self.prefix)
      extra = prefix if extra is None else extra | prefix
    return ok, extra

  # ---------------------------------------------------------------- block level

  def block_may_be_visible(self, q_lo, q_hi, kv_lo, kv_hi):
    """Conservative test from position ranges: False only if no pair in the block is allowed.

    All arguments are broadcastable integer arrays of inclusive position bounds.
    """
    xp = array_module(q_lo, q_hi, kv_lo, kv_hi)
    ok = xp.ones(np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo)), dtype=bool)
    if self.causal:
      ok = ok & (kv_lo <= q_hi)
    if self.window is not None:
      left, right = self.window
      ok = ok & ((kv_lo <= q_hi + right) & (kv_hi >= q_lo - left))
    if self.chunk is not None:
      n = self.chunk
      ok = ok & ((kv_lo // n <= q_hi // n) & (q_lo // n <= kv_hi // n))
    if self.layout is not None:
      ok = ok & (self._layout_count(q_lo, q_hi, kv_lo, kv_hi) > 0)
    if self.sink_tokens is not None:
      sink = kv_lo < self.sink_tokens
      if self.causal:
        sink = sink & (kv_lo <= q_hi)
      ok = ok | sink
    if self.prefix is not None:
      ok = ok | ((q_lo < self.prefix) & (kv_lo < self.prefix))
    return ok

  def block_is_full(self, q_lo, q_hi, kv_lo, kv_hi):
    """True only if every (query, key) pair with positions in the ranges is allowed."""
    xp = array_module(q_lo, q_hi, kv_lo, kv_hi)
    ok = xp.ones(np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo)), dtype=bool)
    if self.causal:
      ok = ok & (kv_hi <= q_lo)
    if self.window is not None:
      left, right = self.window
      ok = ok & ((kv_lo >= q_hi - left) & (kv_hi <= q_lo + right))
    if self.chunk is not None:
      n = self.chunk
      chunk = q_lo // n
      ok = ok & ((q_hi // n == chunk) & (kv_lo // n == chunk) & (kv_hi // n == chunk))
    if self.layout is not None:
      count, area = self.layout_cells(q_lo, q_hi, kv_lo, kv_hi)
      ok = ok & (count == area)
    # Sinks and prefix only add visibility; a block they make wholly visible is still computed
    # with the element mask, which is correct, merely not the fastest.
    return ok

  def layout_cells(self, q_lo, q_hi, kv_lo, kv_hi):
    """(True layout cells, all cells) in the block rectangle covering the position ranges."""
    bq, bk = self.layout_block
    area = (q_hi // bq - q_lo // bq + 1) * (kv_hi // bk - kv_lo // bk + 1)
    return self._layout_count(q_lo, q_hi, kv_lo, kv_hi), area

  def _layout_count(self, q_lo, q_hi, kv_lo, kv_hi):
    """Number of True layout entries in the block rectangle covering the position ranges."""
    bq, bk = self.layout_block
    rows, cols = self.layout.shape
    # Summed-area table with a zero border: count(r0..r1, c0..c1) from four corners.
    table = np.zeros((rows + 1, cols + 1), np.int32)
    table[1:, 1:] = np.cumsum(np.cumsum(self.layout.astype(np.int32), 0), 1)
    xp = array_module(q_lo, q_hi, kv_lo, kv_hi)
    table = xp.asarray(table)
    r0 = xp.clip(q_lo // bq, 0, rows)
    r1 = xp.clip(q_hi // bq + 1, 0, rows)
    c0 = xp.clip(kv_lo // bk, 0, cols)
    c1 = xp.clip(kv_hi // bk + 1, 0, cols)
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


def allowed_pairs(mask: Mask, q_pos_BT, kv_pos_BS, q_seg_BT=None, kv_seg_BS=None):
  """The op's ``allowed`` [B, Tq, Tk]: the mask on positions and, if given, equal segment ids."""
  ok = mask.allowed(q_pos_BT[:, :, None], kv_pos_BS[:, None, :])
  if q_seg_BT is not None:
    ok &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
  return ok
