"""Routing attention: clusters against numpy, the output against a float64 dense softmax with the
mask ``same cluster & causal & same segment`` (values and gradients), empty rows return 0, the
online k-means step against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.attention import routing
from tests.kernels.attention.helpers import assert_close, seed_of

B, T, HQ, HKV, D, C = 2, 29, 4, 2, 8, 3
G = HQ // HKV


def _draw(seed):
  rng = np.random.default_rng(seed)
  q, k, v, w = (rng.standard_normal((B, T, h, D)) for h in (HQ, HKV, HKV, HQ))
  return q, k, v, w, rng.standard_normal((HKV, C, D))


def _numpy_route(x, centroids):
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  cn = centroids / np.linalg.norm(centroids, axis=-1, keepdims=True)
  h = x.shape[2]
  out = np.zeros(x.shape[:3], int)
  for head in range(h):
    out[:, :, head] = np.argmax(xn[:, :, head] @ cn[head // (h // cn.shape[0])].T, axis=-1)
  return out


def _layout():
  positions = np.concatenate([np.arange(17), np.arange(12)])[None].repeat(B, 0)
  segments = np.repeat([[1] * 17 + [2] * 12], B, axis=0)
  return positions.astype(np.int32), segments.astype(np.int32)


def _reference_mask(q, k, centroids, positions, segments):
  qc, kc = _numpy_route(q, centroids), _numpy_route(k, centroids)
  ok = np.zeros((B, HQ, T, T), bool)
  for b in range(B):
    for h in range(HQ):
      for i in range(T):
        for j in range(T):
          ok[b, h, i, j] = (qc[b, i, h] == kc[b, j, h // G] and positions[b, j] <= positions[b, i]
                            and segments[b, i] == segments[b, j])
  return ok


def _masked_softmax(q, k, v, ok):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, G, axis=2)) * D ** -0.5
  any_ = ok.any(-1, keepdims=True)
  p = jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1) * any_
  return jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, G, axis=2))


def test_route_is_the_nearest_centroid_by_cosine():
  q, k, _, _, centroids = _draw(seed_of("route"))
  np.testing.assert_array_equal(routing.route(jnp.asarray(q), jnp.asarray(centroids)),
                                _numpy_route(q, centroids))
  np.testing.assert_array_equal(routing.route(jnp.asarray(k), jnp.asarray(centroids)),
                                _numpy_route(k, centroids))


def test_equals_the_dense_definition_with_gradients_and_empty_rows_are_zero():
  q, k, v, w, centroids = _draw(seed_of("routing"))
  positions, segments = _layout()
  ok = _reference_mask(q, k, centroids, positions, segments)
  assert (~ok.any(-1)).any() and ok.any()  # some rows see nothing, some see something
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  got = routing.routing_attention(*args, jnp.asarray(centroids), positions=positions,
                                  segment_ids=segments)
  want = _masked_softmax(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(ok))
  assert_close(got, want, jnp.float32, "out")
  empty = np.moveaxis(~ok.any(-1), 1, 2)  # [B, T, Hq]
  assert np.all(np.asarray(got)[empty] == 0)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  ours = lambda q, k, v: routing.routing_attention(q, k, v, jnp.asarray(centroids),
                                                   positions=positions, segment_ids=segments)
  grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*args)
  ref = lambda q, k, v: _masked_softmax(q, k, v, jnp.asarray(ok))
  want_grads = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(
      *(jnp.asarray(x) for x in (q, k, v)))
  for name, g, r in zip("qkv", grads, want_grads):
    assert_close(g, r, jnp.float32, f"d{name}")


def test_one_cluster_is_causal_attention():
  q, k, v, _, _ = _draw(seed_of("one"))
  positions, segments = _layout()
  one = jnp.ones((HKV, 1, D))
  got = routing.routing_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), one,
                                  positions=positions, segment_ids=segments)
  ok = (positions[:, None, None, :] <= positions[:, None, :, None]) & (
      segments[:, None, None, :] == segments[:, None, :, None])
  want = _masked_softmax(*(jnp.asarray(x) for x in (q, k, v)),
                         jnp.asarray(np.broadcast_to(ok, (B, HQ, T, T))))
  assert_close(got, want, jnp.float32, "one cluster")


def test_update_centroids_is_the_ema_of_the_assigned_means():
  _, k, _, _, centroids = _draw(seed_of("kmeans"))
  clusters = _numpy_route(k, centroids)
  got = routing.update_centroids(jnp.asarray(centroids), jnp.asarray(k), jnp.asarray(clusters),
                                 decay=0.9)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  for h in range(HKV):
    for c in range(C):
      members = kn[:, :, h][clusters[:, :, h] == c]
      if len(members) == 0:
        np.testing.assert_allclose(got[h, c], centroids[h, c], rtol=1e-6)
        continue
      moved = 0.9 * centroids[h, c] + 0.1 * members.mean(0)
      np.testing.assert_allclose(got[h, c], moved / np.linalg.norm(moved), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda a, c: routing.routing_attention(*a, c[:1]), r"centroids must be \[Hkv, C, D\]"),
    (lambda a, c: routing.routing_attention(*a, c, positions=np.zeros(3, np.int32)),
     "positions must be integers of shape"),
    (lambda a, c: routing.update_centroids(c, a[1], jnp.zeros((B, T, HKV), jnp.int32),
                                           decay=1.0), r"decay must be a number in \[0, 1\)"),
])
def test_errors_name_the_argument(call, message):
  args = [jnp.zeros((B, T, h, D)) for h in (HQ, HKV, HKV)]
  with pytest.raises(ValueError, match=message):
    call(args, jnp.ones((HKV, C, D)))
