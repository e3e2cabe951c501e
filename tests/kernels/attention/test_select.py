"""Query-aware block selection: summaries, Quest bounds and the chosen blocks against numpy
loops; attention over the chosen blocks against a float64 dense softmax with the mask those
blocks define (values and gradients); every block chosen is full causal attention; decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import Mask, attention
from lsm.kernels.attention import select
from tests.kernels.attention.helpers import assert_close, seed_of

B, T, HQ, HKV, D, BLOCK = 2, 37, 4, 2, 8, 8  # 5 blocks, the last one partial
G = HQ // HKV


def _draw(seed, t=T):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((B, t, h, D)) for h in (HQ, HKV, HKV, HQ))


def test_summaries_are_the_blockwise_min_and_max():
  _, k, _, _ = _draw(seed_of("summaries"))
  lo, hi = select.block_summaries(jnp.asarray(k, jnp.float32), BLOCK)
  for n in range(5):
    part = k[:, n * BLOCK:(n + 1) * BLOCK]
    np.testing.assert_allclose(lo[:, n], part.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(hi[:, n], part.max(axis=1), rtol=1e-6)


def _numpy_scores(q, k):
  nb = -(-T // BLOCK)
  out = np.zeros((B, nb, HKV, nb))
  for b in range(B):
    for qb in range(nb):
      for h in range(HKV):
        for kb in range(nb):
          keys = k[b, kb * BLOCK:(kb + 1) * BLOCK, h]
          lo, hi = keys.min(0), keys.max(0)
          total = 0.0
          for j in range(G):
            bounds = [np.sum(np.maximum(qi * lo, qi * hi))
                      for qi in q[b, qb * BLOCK:(qb + 1) * BLOCK, h * G + j]]
            total += max(bounds)
          out[b, qb, h, kb] = total
  return out


def test_scores_are_the_quest_bound_and_bound_every_dot_product():
  q, k, _, _ = _draw(seed_of("scores"))
  got = select.block_scores(jnp.asarray(q, jnp.float32),
                            select.block_summaries(jnp.asarray(k, jnp.float32), BLOCK),
                            block_size=BLOCK)
  want = _numpy_scores(q, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # An upper bound: no query of the block has a larger dot product with any key of the block.
  dots = np.einsum("bqhd,bkhd->bhqk", q[:, :, ::G], k)
  assert np.all(dots.max() <= np.asarray(got).max() + 1e-5)


def _numpy_select(scores, top_k, sinks, local):
  b, nq, h, nb = scores.shape
  out = np.full((b, nq, h, sinks + local + top_k), -1)
  for i in range(b):
    for qb in range(nq):
      for kh in range(h):
        always = [n if n <= qb else -1 for n in range(sinks)]
        always += [x if x >= sinks else -1 for x in range(qb - local + 1, qb + 1)]
        rest = [n for n in range(qb + 1) if n not in always]
        rest.sort(key=lambda n: (-scores[i, qb, kh, n], n))
        picked = rest[:top_k] + [-1] * (top_k - len(rest[:top_k]))
        out[i, qb, kh] = always + picked
  return out


@pytest.mark.parametrize("top_k, sinks, local", [(2, 1, 1), (1, 0, 2), (3, 2, 1), (0, 1, 1)])
def test_selected_blocks_are_the_true_top_k(top_k, sinks, local):
  rng = np.random.default_rng(seed_of("select", top_k, sinks, local))
  scores = rng.standard_normal((B, 6, HKV, 6)).round(1)  # rounding makes ties
  got = select.select_blocks(jnp.asarray(scores), top_k, sink_blocks=sinks, local_blocks=local)
  np.testing.assert_array_equal(got, _numpy_select(scores, top_k, sinks, local))


def _dense_reference(q, k, v, indices, segments=None):
  """float64 softmax of each query over the keys of its query block's chosen blocks (causal,
  same segment)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape[:3] + v.shape[-1:])
  for b in range(B):
    for i in range(T):
      for hq in range(HQ):
        h = hq // G
        blocks = [n for n in np.asarray(indices)[b, i // BLOCK, h] if n >= 0]
        keys = [j for n in blocks for j in range(n * BLOCK, min((n + 1) * BLOCK, T))
                if j <= i and (segments is None or segments[b, j] == segments[b, i])]
        s = np.array([q[b, i, hq] @ k[b, j, h] for j in keys]) * D ** -0.5
        p = np.exp(s - s.max())
        out[b, i, hq] = (p / p.sum()) @ v[b, keys, h]
  return out


def test_attention_over_the_chosen_blocks_equals_the_float64_masked_softmax():
  q, k, v, w = _draw(seed_of("attend"))
  segments = np.repeat([[1] * 20 + [2] * 17], B, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(20), np.arange(17)])[None].repeat(B, 0)
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  out, indices = select.block_select_attention(*args, block_size=BLOCK, top_k=1,
                                               positions=positions, segment_ids=segments,
                                               return_indices=True)
  assert np.any(np.asarray(indices)[:, -1, :, -1] >= 0)  # something beyond sink + local chosen
  want = _dense_reference(q, k, v, indices, segments)
  assert_close(out, want, jnp.float32, "out")

  def loss(q, k, v):
    return jnp.sum(select.block_select_attention(
        q, k, v, block_size=BLOCK, top_k=1, positions=positions, segment_ids=segments) * w)

  grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
  # Reference gradients: the op's float64 reference with the dense mask of the chosen blocks.
  allowed = np.zeros((B, HKV, T, T), bool)
  for b in range(B):
    for h in range(HKV):
      for i in range(T):
        for n in np.asarray(indices)[b, i // BLOCK, h]:
          if n >= 0:
            allowed[b, h, i, n * BLOCK:(n + 1) * BLOCK] = True

  def reference_loss(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q.reshape(B, T, HKV, G, D).reshape(B, T, HQ, D),
                   jnp.repeat(k, G, axis=2)) * D ** -0.5
    ok = (jnp.repeat(jnp.asarray(allowed), G, axis=1) & (np.arange(T)[None, :] <= np.arange(
        T)[:, None]) & (segments[:, None, :, None] == segments[:, None, None, :]))
    p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, G, axis=2)) * w)

  want_grads = jax.grad(reference_loss, argnums=(0, 1, 2))(
      *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for name, got, ref in zip("qkv", grads, want_grads):
    assert_close(got, ref, jnp.float32, f"d{name}")


def test_choosing_every_block_is_full_causal_attention():
  q, k, v, _ = _draw(seed_of("every"))
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  got = select.block_select_attention(*args, block_size=BLOCK, top_k=5)
  want = attention(*(jnp.asarray(x) for x in (q, k, v)), mask=Mask(causal=True),
                   implementation="reference")
  assert_close(got, want, jnp.float32, "all blocks vs causal")


def test_decoding_equals_the_prefill_row_with_every_block():
  """The last query, decoded over the full cache (slots past it empty), equals the last row of
  the prefill; with top_k=1 it attends sink + own + one chosen block, as the indices say."""
  q, k, v, _ = _draw(seed_of("decode"))
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  full = select.block_select_attention(*args, block_size=BLOCK, top_k=5)
  cache_len = 48
  pad = lambda x: jnp.pad(x, [(0, 0), (0, cache_len - T), (0, 0), (0, 0)])
  cache_pos = np.broadcast_to(np.where(np.arange(cache_len) < T, np.arange(cache_len), 2**30 - 1),
                              (B, cache_len))
  step = select.block_select_decode(args[0][:, -1:], pad(args[1]), pad(args[2]),
                                    q_positions=np.full((B, 1), T - 1), cache_positions=cache_pos,
                                    block_size=BLOCK, top_k=5)
  assert_close(step, full[:, -1:], jnp.float32, "decode vs prefill")
  out, indices = select.block_select_decode(
      args[0][:, -1:], pad(args[1]), pad(args[2]), q_positions=np.full((B, 1), T - 1),
      cache_positions=cache_pos, block_size=BLOCK, top_k=1, return_indices=True)
  want = np.zeros((B, 1, HQ, D))
  for b in range(B):
    for hq in range(HQ):
      keys = [j for n in np.asarray(indices)[b, 0, hq // G] if n >= 0
              for j in range(n * BLOCK, min((n + 1) * BLOCK, T))]
      s = np.array([q[b, -1, hq] @ k[b, j, hq // G] for j in keys]) * D ** -0.5
      p = np.exp(s - s.max())
      want[b, 0, hq] = (p / p.sum()) @ v[b, keys, hq // G]
  assert_close(out, want, jnp.float32, "decode with top_k=1")


@pytest.mark.parametrize("call, message", [
    (lambda a: select.block_select_attention(*a, block_size=0, top_k=1),
     "block_size must be a positive int, got 0"),
    (lambda a: select.block_select_attention(*a, block_size=8, top_k=-1),
     "top_k must be an int >= 0, got -1"),
    (lambda a: select.block_select_attention(a[0][..., :3, :], *a[1:], block_size=8, top_k=1),
     "Hq a multiple of Hkv"),
    (lambda a: select.block_select_attention(*a, block_size=8, top_k=1, positions=np.zeros(5)),
     "positions must be integers of shape"),
    (lambda a: select.select_blocks(jnp.zeros((1, 2, 1, 2)), 1, local_blocks=0),
     "local_blocks must be a positive int, got 0"),
])
def test_errors_name_the_argument(call, message):
  args = [jnp.zeros((B, T, h, D)) for h in (HQ, HKV, HKV)]
  with pytest.raises(ValueError, match=message):
    call(args)
