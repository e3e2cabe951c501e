"""`merge`: partials over disjoint key sets combine into the attention over all keys, forward
and backward (ring attention is differentiated through it)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import Mask, attention, merge
from tests.kernels.attention.helpers import (BLOCKS, Shape, assert_close, draw, normalised_error,
                                             packed_segments, run, seed_of, weighted_loss)

MASK = Mask(causal=True, window=(12, 0), sink_tokens=2)
SHAPE = Shape(b=2, tq=37, tk=37, hq=4, hkv=2, d=8, dv=6)
# Key ranges of the partials; with the window, many rows see nothing in some of them.
SPLITS = {"two": ((0, 20), (20, 37)), "three": ((0, 11), (11, 26), (26, 37))}


@functools.partial(jax.jit, static_argnames=("implementation", "pieces", "sinks_to"))
def _merged(q, k, v, sinks, w_out, w_lse, pos, seg, *, implementation, pieces, sinks_to):
  """Merged (out, lse) of per-piece partials, and the gradients of `weighted_loss` through the
  merge. ``sinks_to``: "merge", the index of the one partial that gets them, or None."""

  def loss(q, k, v, sinks):
    partials = [
        attention(q, k[:, a:b], v[:, a:b], mask=MASK, q_positions=pos,
                  kv_positions=pos[:, a:b], q_segment_ids=seg, kv_segment_ids=seg[:, a:b],
                  sinks=sinks if sinks_to == n else None, implementation=implementation,
                  return_lse=True, block_sizes=BLOCKS)
        for n, (a, b) in enumerate(pieces)]
    out, lse = merge(partials, sinks=sinks if sinks_to == "merge" else None)
    return weighted_loss(out, lse, w_out, w_lse), (out, lse)

  names = ("q", "k", "v") if sinks is None else ("q", "k", "v", "sinks")
  (_, (out, lse)), grads = jax.value_and_grad(
      loss, argnums=tuple(range(len(names))), has_aux=True)(q, k, v, sinks)
  return out, lse, dict(zip(names, grads))


def _inputs(name, with_sinks):
  seed = seed_of("merge", name, with_sinks)
  seg, pos = packed_segments(np.random.default_rng(seed), SHAPE.b, SHAPE.tq, max_docs=3)
  return draw(seed, SHAPE, sinks=with_sinks), jnp.asarray(pos), jnp.asarray(seg)


def _check(got, want, dtype):
  assert_close(got[0], want[0], dtype, "out")
  assert_close(got[1], want[1], dtype, "lse")
  assert got[2].keys() == want[2].keys()
  for name in want[2]:
    assert_close(got[2][name], want[2][name], dtype, f"d{name}")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("sinks_to", [None, "merge", 1], ids=["no_sinks", "sinks_to_merge",
                                                              "sinks_to_one_partial"])
def test_merged_xla_partials_equal_full_attention(split, sinks_to):
  inputs, pos, seg = _inputs(split, sinks_to is not None)
  q, k, v, sinks, w_out, w_lse = inputs.arrays(jnp.float32)
  got = _merged(q, k, v, sinks, w_out, w_lse, pos, seg, implementation="xla",
                pieces=SPLITS[split], sinks_to=sinks_to)
  assert got[1].dtype == jnp.float32
  want = run("reference", jnp.float64, inputs, mask=MASK, q_positions=pos, kv_positions=pos,
             q_segment_ids=seg, kv_segment_ids=seg)
  _check(got, want, jnp.float32)


@pytest.mark.parametrize("sinks_to", [None, "merge", 0], ids=["no_sinks", "sinks_to_merge",
                                                              "sinks_to_one_partial"])
def test_merge_is_exact_on_float64_references(sinks_to):
  """On float64 reference partials the merge itself must be exact to float64 rounding."""
  inputs, pos, seg = _inputs("f64", sinks_to is not None)
  q, k, v, sinks, w_out, w_lse = inputs.arrays(jnp.float64)
  got = _merged(q, k, v, sinks, w_out, w_lse, pos, seg, implementation="reference",
                pieces=SPLITS["three"], sinks_to=sinks_to)
  want = run("reference", jnp.float64, inputs, mask=MASK, q_positions=pos, kv_positions=pos,
             q_segment_ids=seg, kv_segment_ids=seg)
  assert got[1].dtype == jnp.float64
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert normalised_error(a, b) < 1e-12


def test_single_partial_is_unchanged():
  inputs, pos, seg = _inputs("single", False)
  out, lse, _ = run("xla", jnp.float32, inputs, grads=False, mask=MASK, q_positions=pos,
                    kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  merged_out, merged_lse = merge([(out, lse)])
  np.testing.assert_array_equal(merged_out, out)
  np.testing.assert_array_equal(merged_lse, lse)


def test_rows_no_partial_saw():
  """All-unseen partials merge to out 0 and lse -inf (finite gradients); with sinks to the
  merge, lse becomes the sink logit and out stays 0."""
  b, t, h, dv = 1, 3, 2, 4
  out = jnp.zeros((b, t, h, dv), jnp.float32)
  lse = jnp.full((b, h, t), -jnp.inf, jnp.float32)
  merged_out, merged_lse = merge([(out, lse), (out, lse)])
  np.testing.assert_array_equal(merged_out, 0.0)
  np.testing.assert_array_equal(merged_lse, -np.inf)
  sinks = jnp.array([0.5, -1.25], jnp.float32)
  merged_out, merged_lse = merge([(out, lse), (out, lse)], sinks=sinks)
  np.testing.assert_array_equal(merged_out, 0.0)
  np.testing.assert_array_equal(merged_lse, np.broadcast_to(sinks[None, :, None], (b, h, t)))

  def loss(o1, l1, o2):
    o, l = merge([(o1, l1), (o2, l1)], sinks=sinks)
    return jnp.sum(o) + jnp.sum(l)

  grads = jax.grad(loss, argnums=(0, 1, 2))(out, lse, out)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
