"""Sparse-attention patterns: each `Mask` equals its definition written out pair by pair, the op
under each pattern equals a float64 dense softmax (forward and gradients), and the blockwise path
visits only the blocks holding an allowed pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import BlockSizes, Mask, attention, density, pattern_mask, patterns
from lsm.kernels.attention import merge, visited_blocks
from tests.kernels.attention.helpers import (Shape, assert_close, draw, packed_segments, seed_of,
                                             weighted_loss)

# One compiled program per mask and block sizes (eager, each call compiles many small ops).
_visited = jax.jit(visited_blocks, static_argnums=0, static_argnames="block_sizes")

# ------------------------------------------------------------------ definitions, pair by pair


def bigbird_blocks(block, num_local_blocks, num_global_blocks, num_random_blocks, max_length,
                   seed=0):
  """The set of visible (query block, key block) pairs, k block <= q block, as documented."""
  n = -(-max_length // block)
  rng = np.random.default_rng(seed)
  pairs = set()
  for i in range(n):
    fixed = [j for j in range(i + 1)
             if i - j < num_local_blocks or j < num_global_blocks or i < num_global_blocks]
    pairs.update((i, j) for j in fixed)
    others = [j for j in range(i + 1) if j not in fixed]
    if num_random_blocks and others:
      picked = rng.choice(others, size=min(num_random_blocks, len(others)), replace=False)
      pairs.update((i, int(j)) for j in picked)
  return pairs


def definition(pattern: str, params: dict):
  """``allowed(q, k)`` of a pattern for integer positions, in plain Python."""
  p = params
  if pattern in ("sink_window", "lambda"):
    sinks = p["sink_tokens"] if pattern == "sink_window" else p["global_tokens"]
    return lambda q, k: k <= q and (q - p["window"] <= k or k < sinks)
  n = -(-p["max_length"] // p["block"])

  def inside(q, k):
    return 0 <= q < n * p["block"] and 0 <= k < n * p["block"] and k <= q

  if pattern == "bigbird":
    pairs = bigbird_blocks(**p)
    return lambda q, k: inside(q, k) and (q // p["block"], k // p["block"]) in pairs

  def strided(q, k):
    d = q // p["block"] - k // p["block"]
    return inside(q, k) and (d < p["local_blocks"] or d % p["stride"] == 0)

  return strided


def dense_definition(pattern, params, q_pos, kv_pos):
  """[len(q_pos), len(kv_pos)] booleans from `definition`."""
  allowed = definition(pattern, params)
  return np.array([[allowed(int(q), int(k)) for k in kv_pos] for q in q_pos], bool)


CASES = {
    "sink_window": ("sink_window", dict(window=6, sink_tokens=3)),
    "sink_window_no_sinks": ("sink_window", dict(window=4, sink_tokens=0)),
    "lambda": ("lambda", dict(window=9, global_tokens=2)),
    "bigbird": ("bigbird", dict(block=4, num_local_blocks=2, num_global_blocks=1,
                                num_random_blocks=2, max_length=41, seed=7)),
    "bigbird_no_global": ("bigbird", dict(block=3, num_local_blocks=1, num_global_blocks=0,
                                          num_random_blocks=1, max_length=40, seed=1)),
    "strided": ("strided", dict(block=4, local_blocks=2, stride=3, max_length=41)),
    "strided_dense_band": ("strided", dict(block=5, local_blocks=1, stride=2, max_length=40)),
}


@pytest.mark.parametrize("case", CASES)
def test_mask_equals_the_definition(case):
  pattern, params = CASES[case]
  mask = pattern_mask(pattern, **params)
  assert mask.causal
  # Past the layout (block patterns cover max_length rounded up to whole blocks) nothing is seen.
  positions = np.arange(50)
  got = np.asarray(mask.allowed(positions[:, None], positions[None]))
  np.testing.assert_array_equal(got, dense_definition(pattern, params, positions, positions))


def test_bigbird_random_blocks():
  params = dict(block=2, num_local_blocks=2, num_global_blocks=1, num_random_blocks=3,
                max_length=64)
  layout = patterns.bigbird(**params, seed=5).layout
  n = layout.shape[0]
  for i in range(n):
    fixed = {j for j in range(i + 1) if i - j < 2 or j < 1}
    random = {j for j in range(i + 1) if layout[i, j]} - fixed
    assert len(random) == min(3, i + 1 - len(fixed)), i  # drawn only from the earlier blocks
  # The seed decides the draw; a longer layout keeps the rows of a shorter one.
  assert np.array_equal(layout, patterns.bigbird(**params, seed=5).layout)
  assert not np.array_equal(np.tril(layout), np.tril(patterns.bigbird(**params, seed=6).layout))
  longer = patterns.bigbird(**{**params, "max_length": 100}, seed=5).layout
  np.testing.assert_array_equal(longer[:n, :n], layout)


def _dense_attention(q, k, v, allowed_BTS):
  """float64 softmax attention with an explicit boolean mask, GQA by repeating K/V."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  ok = allowed_BTS[:, None]
  s = jnp.where(ok, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  out = jnp.einsum("bhts,bshd->bthd", jnp.exp(s - lse[..., None]), v)
  return out, lse


@pytest.mark.parametrize("case", ["sink_window", "lambda", "bigbird", "strided"])
def test_op_matches_float64_dense_softmax(case):
  """Odd lengths, GQA 2:1, two packed documents per row: out, lse and gradients in float32."""
  pattern, params = CASES[case]
  mask = pattern_mask(pattern, **params)
  shape = Shape(b=2, tq=37, tk=37, hq=4, hkv=2, d=8, dv=8)
  inputs = draw(seed_of("patterns", case), shape)
  seg, pos = packed_segments(np.random.default_rng(seed_of("segments", case)), 2, 37, 2)
  allowed = np.stack([dense_definition(pattern, params, pos[r], pos[r])
                      & (seg[r][:, None] == seg[r][None]) for r in range(2)])
  blocks = BlockSizes(q=8, kv=16)

  def loss_of(fn, dtype):
    q, k, v, _, w_out, w_lse = inputs.arrays(dtype)

    def loss(q, k, v):
      out, lse = fn(q, k, v)
      return weighted_loss(out, lse, w_out, w_lse), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads

  got = jax.jit(lambda: loss_of(lambda q, k, v: attention(
      q, k, v, mask=mask, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
      kv_segment_ids=seg, implementation="xla", return_lse=True, block_sizes=blocks),
                               jnp.float32))()
  want = loss_of(lambda q, k, v: _dense_attention(q, k, v, jnp.asarray(allowed)), jnp.float64)
  assert_close(got[0], want[0], jnp.float32, "out")
  assert_close(got[1], want[1], jnp.float32, "lse")
  for name, g, w in zip("qkv", got[2], want[2]):
    assert_close(g, w, jnp.float32, f"d{name}")


def _needed_blocks(allowed, bq, bk):
  """[nq, nk]: the blocks of a [Tq, Tk] boolean table that hold at least one True."""
  nq, nk = -(-allowed.shape[0] // bq), -(-allowed.shape[1] // bk)
  needed = np.zeros((nq, nk), bool)
  for i, j in zip(*np.nonzero(allowed)):
    needed[i // bq, j // bk] = True
  return needed


@pytest.mark.parametrize("case", ["bigbird", "bigbird_no_global", "strided",
                                  "strided_dense_band"])
def test_visited_blocks_are_the_needed_ones(case):
  pattern, params = CASES[case]
  mask = pattern_mask(pattern, **params)
  t = 39  # not a multiple of the blocks
  positions = np.arange(t)
  allowed = dense_definition(pattern, params, positions, positions)
  b = params["block"]
  visits = {}
  for bq, bk in ((b, b), (b, 2 * b), (2 * b, b)):
    visits[bq, bk] = np.asarray(_visited(mask, positions, positions,
                                         block_sizes=BlockSizes(q=bq, kv=bk)))
    np.testing.assert_array_equal(visits[bq, bk], _needed_blocks(allowed, bq, bk),
                                  err_msg=str((bq, bk)))
  causal = np.asarray(_visited(Mask(causal=True), positions, positions,
                               block_sizes=BlockSizes(q=b, kv=b)))
  assert visits[b, b].sum() < causal.sum()  # with the pattern's blocks, causal ones are skipped


def test_sink_window_skips_the_blocks_between_sinks_and_window():
  mask = patterns.sink_window(window=8, sink_tokens=2)
  positions = np.arange(64)
  visited = np.asarray(_visited(mask, positions, positions, block_sizes=BlockSizes(8, 8)))
  allowed = dense_definition("sink_window", dict(window=8, sink_tokens=2), positions, positions)
  np.testing.assert_array_equal(visited, _needed_blocks(allowed, 8, 8))
  assert visited.sum(axis=1).max() == 3  # the sink block and two window blocks, any length


def test_density():
  params = dict(block=4, local_blocks=2, stride=3, max_length=48)
  mask = patterns.strided(**params)
  got = density(mask, 48, block_sizes=BlockSizes(4, 4))
  positions = np.arange(48)
  allowed = dense_definition("strided", params, positions, positions)
  assert got.pairs == pytest.approx(allowed.sum() / (48 * 49 / 2))
  blocks = _needed_blocks(allowed, 4, 4)
  assert got.blocks == pytest.approx(blocks.sum() / (12 * 13 / 2))
  assert density(Mask(causal=True), 48) == (1.0, 1.0)
  window = density(patterns.sink_window(window=3, sink_tokens=0), 10)
  assert window.pairs == pytest.approx((1 + 2 + 3 + 4 * 7) / 55)


@pytest.mark.parametrize("call, match", [
    (lambda: patterns.sink_window(window=0, sink_tokens=1),
     r"sink_window: window must be a positive int, got 0"),
    (lambda: patterns.sink_window(window=4, sink_tokens=-1),
     r"sink_window: sink_tokens must be a non-negative int, got -1"),
    (lambda: patterns.lambda_shape(window=2.5, global_tokens=1),
     r"lambda_shape: window must be a positive int, got 2\.5"),
    (lambda: patterns.lambda_shape(window=4, global_tokens=True),
     r"lambda_shape: global_tokens must be a non-negative int, got True"),
    (lambda: patterns.bigbird(0, 1, 1, 1, 16), r"bigbird: block must be a positive int, got 0"),
    (lambda: patterns.bigbird(4, 0, 1, 1, 16),
     r"bigbird: num_local_blocks must be a positive int, got 0"),
    (lambda: patterns.bigbird(4, 1, -1, 1, 16),
     r"bigbird: num_global_blocks must be a non-negative int, got -1"),
    (lambda: patterns.bigbird(4, 1, 1, -2, 16),
     r"bigbird: num_random_blocks must be a non-negative int, got -2"),
    (lambda: patterns.bigbird(4, 1, 1, 1, 0), r"bigbird: max_length must be a positive int, got 0"),
    (lambda: patterns.bigbird(4, 1, 1, 1, 16, seed=-1),
     r"bigbird: seed must be a non-negative int, got -1"),
    (lambda: patterns.strided(4, 0, 2, 16), r"strided: local_blocks must be a positive int, got 0"),
    (lambda: patterns.strided(4, 1, 0, 16), r"strided: stride must be a positive int, got 0"),
    (lambda: pattern_mask("dilated", window=3),
     r"pattern must be one of \('sink_window', 'lambda', 'bigbird', 'strided'\), got 'dilated'"),
    (lambda: pattern_mask("strided", block=4, local_blocks=1, stride=2, max_length=8, window=3),
     r"window=3 is not a parameter of pattern 'strided'; it takes block, local_blocks, stride"),
    (lambda: pattern_mask("bigbird", block=4),
     r"pattern 'bigbird' needs num_local_blocks, num_global_blocks, num_random_blocks, "
     r"max_length, got block"),
    (lambda: density(Mask(causal=True), 0), r"density: length must be a positive int, got 0"),
])
def test_bad_arguments_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_density_rejects_a_non_mask():
  with pytest.raises(TypeError, match=r"density: mask must be an lsm Mask, got str"):
    density("causal", 8)


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu", "pallas_gpu"])
def test_sinks_beside_a_window_split_off_match_float64(implementation, monkeypatch):
  """With key positions known at trace time, the sinks of a window mask are attended to in a
  short call of their own and merged by lse (the main call then skips the sink block). Packed
  rows (sinks start every document), GQA, learned sinks and a soft cap: out, lse and gradients
  equal a float64 reference, and equal the single call the op makes for traced positions."""
  from lsm.kernels.attention import api  # noqa: PLC0415
  mask = Mask(causal=True, window=(8, 0), sink_tokens=3)
  shape = Shape(b=2, tq=64, tk=64, hq=4, hkv=2, d=8, dv=8)
  inputs = draw(seed_of("sink split", implementation), shape, sinks=True)
  seg, pos = packed_segments(np.random.default_rng(seed_of("sink split seg")), 2, 64, 2)
  merged = []
  monkeypatch.setattr(api, "merge", lambda parts: merged.append(len(parts)) or merge(parts))
  blocks = BlockSizes(8, 16)  # two documents' sinks (6 keys) fit in half a key block

  def results(implementation, dtype, static):
    q, k, v, sinks, w_out, w_lse = inputs.arrays(dtype)

    def loss(q, k, v, sinks, pos, seg):
      out, lse = attention(q, k, v, mask=mask, q_positions=pos, kv_positions=pos,
                           q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks,
                           logits_soft_cap=4.0, implementation=implementation,
                           return_lse=True, block_sizes=blocks)
      return weighted_loss(out, lse, w_out, w_lse), (out, lse)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    if static:  # numpy positions closed over: concrete when the op is traced
      (_, (out, lse)), grads = jax.jit(lambda *a: grad(*a, pos, seg))(q, k, v, sinks)
    else:
      (_, (out, lse)), grads = jax.jit(grad)(q, k, v, sinks, pos, seg)
    return out, lse, grads

  split = results(implementation, jnp.float32, static=True)
  assert merged == [2], "the sinks were not split off"
  single = results(implementation, jnp.float32, static=False)
  assert merged == [2], "traced positions must not split"
  want = results("reference", jnp.float64, static=False)
  for got in (split, single):
    assert_close(got[0], want[0], jnp.float32, "out")
    assert_close(got[1], want[1], jnp.float32, "lse")
    for name, g, w in zip(("q", "k", "v", "sinks"), got[2], want[2]):
      assert_close(g, w, jnp.float32, f"d{name}")
  # What it saves: the main call's plan has no sink block for the query blocks past the window.
  main = np.where(pos < 3, -(2**30 - 1), pos)
  assert (np.asarray(_visited(Mask(causal=True, window=(8, 0)), pos, main, seg, seg,
                              block_sizes=blocks)).sum()
          < np.asarray(_visited(mask, pos, pos, seg, seg, block_sizes=blocks)).sum())


def test_sink_split_is_planned_only_where_it_is_exact_and_saves_blocks():
  from lsm.kernels.attention.blocks import sink_split  # noqa: PLC0415
  pos = np.broadcast_to(np.arange(64, dtype=np.int32), (2, 64))
  plan = sink_split(Mask(causal=True, window=(8, 0), sink_tokens=3), pos, pos, None, None, 8, 16)
  assert plan is not None and plan.main_visits < plan.visits
  np.testing.assert_array_equal(plan.index, [[0, 1, 2], [0, 1, 2]])
  assert plan.main_mask == Mask(causal=True, window=(8, 0))
  assert (plan.main_kv_positions[:, :3] < -2**29).all()
  for mask in (Mask(causal=False, window=(8, 8), sink_tokens=3),  # padding would be visible
               Mask(causal=True, window=(8, 0), sink_tokens=3, prefix=4),  # prefix sees moved
               Mask(causal=True, sink_tokens=3),  # no window: nothing to save
               Mask(causal=True, window=(60, 0), sink_tokens=3)):  # the window covers the sinks
    assert sink_split(mask, pos, pos, None, None, 8, 16) is None, mask
  assert sink_split(Mask(causal=True, window=(8, 0), sink_tokens=9), pos, pos, None, None, 8,
                    16) is None  # 9 sinks do not fit in half a key block
  traced = jnp.asarray(pos)
  assert sink_split(Mask(causal=True, window=(8, 0), sink_tokens=3), traced, traced, None, None,
                    8, 16) is None
