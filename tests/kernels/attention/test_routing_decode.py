"""Routing attention beyond the definition: decoding over a cache equals the forward rows, lse
is finite exactly where a row sees a key (and equals float64), sorting lets the op skip blocks,
the k-means step over (q, k) with padding, and the XLA path against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
from lsm.kernels.attention import BlockSizes, Mask, visited_blocks, merge
from lsm.kernels.attention import routing

B, T, HQ, HKV, D, C = 2, 45, 6, 2, 8, 4
G = HQ // HKV


def draw(seed):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32) for h in (HQ, HKV, HKV)], \
      jnp.asarray(rng.standard_normal((HKV, C, D)), jnp.float32)


def test_decode_rows_equal_the_forward_rows():
  (q, k, v), c = draw(1)
  seg = np.repeat([[0] * 20 + [1] * 25], B, 0).astype(np.int32)
  pos = np.concatenate([np.arange(20), np.arange(25)])[None].repeat(B, 0).astype(np.int32)
  full, lse = routing.routing_attention(q, k, v, c, positions=pos, segment_ids=seg,
                                        return_lse=True)
  for n in (0, 19, 20, 33, 44):
    # the cache holds every token; the ones after n sit at later positions (causally masked)
    out, lse_n = routing.routing_attention(
        q[:, n:n + 1], k, v, c, positions=pos[:, n:n + 1], segment_ids=seg[:, n:n + 1],
        kv_positions=pos, kv_segment_ids=seg, return_lse=True)
    np.testing.assert_allclose(out[:, 0], full[:, n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse_n[:, :, 0], lse[:, :, n], rtol=1e-5, atol=1e-6)


def test_lse_merges_with_another_partial():
  # routing partial merged with an empty partial is itself; lse finite iff the row sees a key
  (q, k, v), c = draw(2)
  out, lse, (cq, ck) = routing.routing_attention(q, k, v, c, return_lse=True,
                                                 return_assignments=True)
  sees = np.zeros((B, HQ, T), bool)
  cq, ck = np.asarray(cq), np.asarray(ck)
  for b in range(B):
    for h in range(HQ):
      for i in range(T):
        sees[b, h, i] = (ck[b, :i + 1, h // G] == cq[b, i, h]).any()
  assert sees.any() and (~sees).any()
  np.testing.assert_array_equal(np.isfinite(lse), sees)
  # the op over the same pairs with lse from a dense float64 softmax
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  s = np.einsum("bihd,bjhd->bhij", qn, np.repeat(kn, G, 2)) * D ** -0.5
  ok = (cq.transpose(0, 2, 1)[..., None] == np.repeat(ck, G, 2).transpose(0, 2, 1)[:, :, None])
  ok &= np.tril(np.ones((T, T), bool))
  with np.errstate(divide="ignore"):
    want = np.log(np.sum(np.where(ok, np.exp(s), 0), -1))
  np.testing.assert_allclose(lse[sees], want[sees], rtol=1e-5)


def test_sorting_lets_the_op_skip_blocks():
  (q, k, v), c = draw(3)
  cq, ck = routing.route(q, c), routing.route(k, c)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  _, _, q_ids, k_ids, q_pos, k_pos = routing._routed_layout(cq, ck, pos, pos, None, None, C)
  sizes = BlockSizes(q=8, kv=8)
  sorted_visits = np.asarray(visited_blocks(Mask(causal=True), q_pos[:1], k_pos[:1], q_ids[:1],
                                            k_ids[:1], block_sizes=sizes)).mean()
  causal = np.asarray(visited_blocks(Mask(causal=True), q_pos[:1], k_pos[:1],
                                     block_sizes=sizes)).mean()
  assert sorted_visits < 0.6 * causal, (sorted_visits, causal)


def test_update_with_q_and_k_and_valid():
  (q, k, _), c = draw(4)
  cq, ck = routing.route(q, c), routing.route(k, c)
  valid = np.ones((B, T), bool)
  valid[:, -7:] = False
  got = routing.update_centroids(c, (q, k), (cq, ck), 0.5, valid=jnp.asarray(valid))
  cn, qn, kn = (np.asarray(x, np.float64) for x in (c, q, k))
  qn = qn / np.linalg.norm(qn, axis=-1, keepdims=True)
  kn = kn / np.linalg.norm(kn, axis=-1, keepdims=True)
  cq, ck = np.asarray(cq), np.asarray(ck)
  for h in range(HKV):
    for j in range(C):
      members = [qn[b, t, g] for b in range(B) for t in range(T) for g in range(HQ)
                 if valid[b, t] and g // G == h and cq[b, t, g] == j]
      members += [kn[b, t, h] for b in range(B) for t in range(T)
                  if valid[b, t] and ck[b, t, h] == j]
      if not members:
        np.testing.assert_array_equal(got[h, j], c[h, j])
        continue
      m = 0.5 * cn[h, j] + 0.5 * np.mean(members, 0)
      np.testing.assert_allclose(got[h, j], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
  assert not jax.grad(lambda x: routing.update_centroids(c, x, ck, 0.5).sum())(k).any()


def test_float64_reference_implementation_and_jit():
  (q, k, v), c = draw(5)
  f = jax.jit(lambda q, k, v: routing.routing_attention(q, k, v, c, implementation="xla"))
  a = f(q, k, v)
  b = routing.routing_attention(*(x.astype(jnp.float64) for x in (q, k, v)), c,
                                implementation="reference")
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
