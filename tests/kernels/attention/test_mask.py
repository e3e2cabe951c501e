"""`Mask`: value semantics, element-level `allowed`, and the block-level tests block skipping
relies on (`block_may_be_visible` conservative, `block_is_full` sound)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

from lsm.kernels.attention import Mask
from tests.kernels.attention.helpers import allowed_by_definition, mask_strategy

_LAYOUT = np.array([[True, False, True], [False, True, True]])


def test_equal_and_hashable_by_value():
  a = Mask(causal=True, window=[8, 0], layout=_LAYOUT.copy(), layout_block=[4, 4])
  b = Mask(causal=True, window=(8, 0), layout=_LAYOUT.copy(), layout_block=(4, 4))
  assert a == b and hash(a) == hash(b)
  assert len({a, b}) == 1
  assert a != Mask(causal=True, window=(8, 0), layout=~_LAYOUT, layout_block=(4, 4))
  assert a != Mask(causal=True, window=(8, 0), layout=_LAYOUT, layout_block=(4, 2))
  assert a != Mask(causal=True, window=(8, 1), layout=_LAYOUT, layout_block=(4, 4))
  assert Mask(causal=True) != Mask(causal=False)
  assert Mask(prefix=0) != Mask()
  assert Mask() != "Mask()"


def test_layout_is_copied_and_frozen():
  layout = _LAYOUT.copy()
  mask = Mask(layout=layout, layout_block=(4, 4))
  key = hash(mask)
  layout[0, 1] = True  # the caller's array changing must not change the mask
  assert not mask.layout[0, 1] and hash(mask) == key
  with pytest.raises(ValueError):
    mask.layout[0, 0] = False


def test_static_argument_of_jit():
  traces = []

  def f(x, mask):
    traces.append(mask)
    return jnp.where(mask.allowed(jnp.arange(6)[:, None], jnp.arange(6)[None]), x, 0.0)

  f = jax.jit(f, static_argnums=1)
  x = jnp.ones((6, 6))
  first = f(x, Mask(causal=True, layout=_LAYOUT.copy(), layout_block=(3, 2)))
  again = f(x, Mask(causal=True, layout=_LAYOUT.copy(), layout_block=(3, 2)))
  other = f(x, Mask(causal=False, layout=_LAYOUT.copy(), layout_block=(3, 2)))
  assert len(traces) == 2  # the equal mask hit the cache; the different one did not
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


# One example of each field alone, so no field depends on the draw to be covered.
_SINGLE_FIELDS = [Mask(causal=True), Mask(window=(3, 1)), Mask(chunk=5), Mask(prefix=6),
                  Mask(sink_tokens=0), Mask(causal=True, sink_tokens=3),
                  Mask(layout=_LAYOUT, layout_block=(4, 3))]


def _with_examples(masks):
  def decorate(test):
    for mask in masks:
      test = example(mask=mask)(test)
    return test
  return decorate


_POSITIONS = np.arange(-3, 45)


@_with_examples(_SINGLE_FIELDS)
@settings(max_examples=60, deadline=None)
@given(mask=mask_strategy())
def test_allowed_matches_the_documented_semantics(mask):
  got = np.asarray(mask.allowed(_POSITIONS[:, None], _POSITIONS[None, :]))
  want = np.array([[allowed_by_definition(mask, int(qp), int(kp)) for kp in _POSITIONS]
                   for qp in _POSITIONS])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mask,qp,kp,want", [
    (Mask(causal=True), 5, 5, True),
    (Mask(causal=True), 5, 6, False),
    (Mask(window=(2, 1)), 10, 8, True),
    (Mask(window=(2, 1)), 10, 7, False),
    (Mask(window=(2, 1)), 10, 11, True),
    (Mask(window=(2, 1)), 10, 12, False),
    (Mask(chunk=4), 7, 4, True),
    (Mask(chunk=4), 7, 3, False),
    (Mask(chunk=4), 4, 7, True),
    (Mask(causal=True, chunk=4), 4, 7, False),
    (Mask(causal=True, prefix=4), 1, 3, True),
    (Mask(causal=True, prefix=4), 4, 5, False),
    (Mask(causal=True, window=(1, 0), sink_tokens=2), 20, 1, True),
    (Mask(causal=True, window=(1, 0), sink_tokens=2), 20, 2, False),
    (Mask(causal=True, window=(1, 0), sink_tokens=2), 0, 1, False),
    (Mask(window=(0, 0), sink_tokens=2), 5, 2, False),
    (Mask(window=(0, 0), sink_tokens=2), 0, 1, True),
    (Mask(layout=_LAYOUT, layout_block=(4, 2)), 5, 3, True),
    (Mask(layout=_LAYOUT, layout_block=(4, 2)), 5, 1, False),
    (Mask(layout=_LAYOUT, layout_block=(4, 2)), 8, 0, False),  # below the layout
    (Mask(layout=_LAYOUT, layout_block=(4, 2)), 0, 6, False),  # right of the layout
])
def test_allowed_examples(mask, qp, kp, want):
  assert bool(mask.allowed(qp, kp)) is want
  assert allowed_by_definition(mask, qp, kp) is want


# Every block range [lo, lo + n - 1] with lo in [-3, 24] and n in 1..8, on both sides.
_GRID = np.arange(-3, 32)
_LO, _LEN = np.meshgrid(np.arange(-3, 25), np.arange(1, 9), indexing="ij")
_LO, _HI = _LO.ravel(), (_LO + _LEN - 1).ravel()


@_with_examples(_SINGLE_FIELDS)
@settings(max_examples=100, deadline=None)
@given(mask=mask_strategy())
def test_block_tests_are_conservative_and_sound(mask):
  """Against brute force over ~50k position-range blocks per mask."""
  allowed = np.array([[allowed_by_definition(mask, int(qp), int(kp)) for kp in _GRID]
                      for qp in _GRID], np.int64)
  table = np.zeros((len(_GRID) + 1,) * 2, np.int64)  # summed-area table of allowed pairs
  table[1:, 1:] = allowed.cumsum(0).cumsum(1)
  r0, r1 = (_LO - _GRID[0])[:, None], (_HI - _GRID[0] + 1)[:, None]
  c0, c1 = (_LO - _GRID[0])[None, :], (_HI - _GRID[0] + 1)[None, :]
  count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
  area = (r1 - r0) * (c1 - c0)
  bounds = (jnp.asarray(_LO[:, None]), jnp.asarray(_HI[:, None]), jnp.asarray(_LO[None, :]),
            jnp.asarray(_HI[None, :]))
  may_be_visible = np.asarray(mask.block_may_be_visible(*bounds))
  is_full = np.asarray(mask.block_is_full(*bounds))
  assert may_be_visible.shape == is_full.shape == count.shape
  assert np.all(may_be_visible[count > 0]), "a block holding an allowed pair was ruled out"
  assert np.all(count[is_full] == area[is_full]), "a block holding a masked pair was called full"


def test_block_tests_decide_the_clear_cases():
  """Not everything is 'maybe visible' and not nothing is 'full': the bounds are useful."""
  causal = Mask(causal=True)
  assert not bool(causal.block_may_be_visible(0, 7, 8, 15))
  assert bool(causal.block_is_full(8, 15, 0, 7))
  assert not bool(causal.block_is_full(8, 15, 0, 8 + 1))
  window = Mask(causal=True, window=(4, 0))
  assert not bool(window.block_may_be_visible(16, 23, 0, 7))
  assert bool(window.block_may_be_visible(16, 23, 8, 12))
  assert not bool(Mask(chunk=8).block_may_be_visible(8, 15, 16, 23))
  assert bool(Mask(chunk=8).block_is_full(8, 11, 12, 15))
  layout = Mask(layout=_LAYOUT, layout_block=(4, 2))
  assert not bool(layout.block_may_be_visible(0, 3, 2, 3))
  assert bool(layout.block_is_full(4, 7, 2, 5))
  assert not bool(layout.block_is_full(4, 7, 0, 5))
  sinks = Mask(causal=True, window=(0, 0), sink_tokens=2)
  assert bool(sinks.block_may_be_visible(16, 23, 0, 7))
  assert not bool(sinks.block_may_be_visible(16, 23, 2, 7))
