"""Routing Transformer attention (Roy et al., 2021) on the attention op.

Queries and keys are routed to ``C`` clusters by online k-means, per KV head: a vector goes to
the centroid with the largest dot product after both are L2-normalised (`route`). Queries and
keys share the centroids (the paper's shared routing); query head ``h`` uses the centroids of its
KV head ``h // (Hq / Hkv)``. A query attends to a key iff::

    cluster(q_i) == cluster(k_j)  and  kv_pos[j] <= q_pos[i]  and  q_seg[i] == kv_seg[j]

Cluster ids are discrete: no gradient flows through the routing, only through the attention.

How it runs (`routing_attention`): the ``(segment, cluster)`` pair of every token is folded into
one int (``dense_rank(segment) * C + cluster``), so "same segment and same cluster" is the op's
own segment-id test. The ids differ per head, while the op's ids are per token, so the G query
heads of each KV head become G x Tq query rows of their own batch row ``(b, kv_head)``: one op
call with batch ``B * Hkv``, one head, ``Mask(causal=True)`` on the true positions. Each row's
queries and keys are sorted (stably) by their folded id first, so a query block spans few
clusters and the op skips every key block whose id range misses it: with clusters of about
``T / C`` tokens the work is about ``T^2 / C`` instead of ``T^2 / 2``, as long as clusters are
several blocks long (the op's visit plan is the union over batch rows). The output is unsorted
back. Rows that see nothing (no causal key of their cluster) return 0 and ``lse = -inf``.

How a layer uses it::

    q, k, v = ...                                    # [B, T, H, D] projections (normalised and
                                                     # rotated as the layer chooses)
    out, (cq, ck) = routing_attention(q, k, v, centroids.value, positions=positions,
                                      segment_ids=segment_ids, return_assignments=True)
    if training:                                     # centroids: a non-trainable nnx.Variable
      centroids.value = update_centroids(centroids.value, (q, k), (cq, ck), decay=0.999,
                                         valid=segment_ids != PAD)

Decoding from a dense KV cache passes the cache as ``k, v`` with ``kv_positions`` (empty slots at
a position past every query) and ``kv_segment_ids``: the keys are routed again with the same
centroids, so prefill followed by decoding equals one forward pass. Mixing routing heads with
local-attention heads (as the paper does) is the layer's choice: merge partials with
``return_lse`` and `lsm.kernels.attention.merge`, or split the heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lsm.kernels.attention.api import attention
from lsm.kernels.attention.blocks import BlockSizes
from lsm.kernels.attention.mask import Mask
from lsm.kernels.attention.select import token_ids

_EPS = 1e-6  # L2 normalisation floor: a zero vector routes to cluster 0


def _array(owner, name, x, rank):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{owner}: {name} must be an array, got {type(x).__name__}")
  if x.ndim != rank:
    raise ValueError(f"{owner}: {name} must have rank {rank}, got shape {tuple(x.shape)}")
  return tuple(x.shape)


def _floating(owner, name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{owner}: {name} must have a floating dtype, got {x.dtype}")


def _check_centroids(owner, centroids, heads, d, what):
  """centroids [Hc, C, D] against vectors with ``heads`` heads of size ``d``."""
  hc, c, dc = _array(owner, "centroids", centroids, 3)
  _floating(owner, "centroids", centroids)
  if c == 0 or dc != d or hc == 0 or heads % hc:
    raise ValueError(f"{owner}: centroids must be [Hc, C, D] with C >= 1, D = {d} and {what} "
                     f"heads {heads} a multiple of Hc, got shape {(hc, c, dc)}")
  return hc, c


def _normalised(x):
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _grouped(x_BTHD, hc):
  """[B, T, H, D] -> [B, T, Hc, H / Hc, D]: head h belongs to centroid head h // (H / Hc)."""
  b, t, h, d = x_BTHD.shape
  return x_BTHD.reshape(b, t, hc, h // hc, d)


def route(x, centroids):
  """Cluster id of every token and head: int32 [B, T, H].

  x [B, T, H, D]; centroids [Hc, C, D] with ``H % Hc == 0`` (head h uses the centroids of head
  ``h // (H / Hc)``). The id is the argmax over the C centroids of the dot product of the
  L2-normalised vector and centroid (ties: the lower id; a zero vector goes to 0). Not
  differentiable (ids are discrete)."""
  _array("route", "x", x, 4)
  _floating("route", "x", x)
  hc, _ = _check_centroids("route", centroids, x.shape[2], x.shape[3], "x's")
  x = jax.lax.stop_gradient(x)
  centroids = jax.lax.stop_gradient(centroids)
  sim = jnp.einsum("btkgd,kcd->btkgc", _normalised(_grouped(x, hc)), _normalised(centroids))
  return jnp.argmax(sim, axis=-1).astype(jnp.int32).reshape(x.shape[:3])


def update_centroids(centroids, x, assignments, decay, *, valid=None):
  """One online k-means (EMA) step: the new centroids [Hc, C, D] in centroids' dtype.

  ``m = decay * centroids[h, c] + (1 - decay) * mean{normalise(x[b, t, g]) :
  assignments[b, t, g] == c, g a head of centroid head h, valid[b, t]}`` and
  ``new[h, c] = normalise(m)`` (unit centroids keep the EMA's step size independent of their
  history; `route` only reads directions); a centroid nothing was assigned to stays as it was.
  ``decay`` in ``[0, 1)``. ``x`` [B, T, H, D] and ``assignments`` int [B, T, H] (from
  `route`) may be tuples of such arrays, e.g. ``(q, k)`` and their ids: the mean is over all of
  them (the paper updates with both). ``valid`` [B, T] bool drops tokens (padding) and then
  applies to every entry. Ids outside ``[0, C)`` are ignored. No gradient flows through it.
  """
  owner = "update_centroids"
  _array(owner, "centroids", centroids, 3)
  xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  ids = tuple(assignments) if isinstance(assignments, (tuple, list)) else (assignments,)
  if not xs or len(xs) != len(ids):
    raise ValueError(f"{owner}: x and assignments must be two arrays or two sequences of equal "
                     f"non-zero length, got {len(xs)} and {len(ids)} entries")
  if isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer, np.floating)) or (
      not 0.0 <= decay < 1.0):
    raise ValueError(f"{owner}: decay must be a number in [0, 1), got {decay!r}")
  hc, c, d = centroids.shape
  shapes = []
  for n, (xn, an) in enumerate(zip(xs, ids)):
    name = "x" if len(xs) == 1 else f"x[{n}]"
    b, t, h, dn = _array(owner, name, xn, 4)
    _floating(owner, name, xn)
    _check_centroids(owner, centroids, h, dn, f"{name}'s")
    a_name = "assignments" if len(xs) == 1 else f"assignments[{n}]"
    if _array(owner, a_name, an, 3) != (b, t, h) or not jnp.issubdtype(an.dtype, jnp.integer):
      raise ValueError(f"{owner}: {a_name} must be integer ids of shape {(b, t, h)} (that of "
                       f"{name} without D), got {an.dtype} {tuple(an.shape)}")
    shapes.append((b, t))
  if valid is not None:
    valid = jnp.asarray(valid)
    if valid.dtype != jnp.bool_ or any(tuple(valid.shape) != s for s in shapes):
      raise ValueError(f"{owner}: valid must be a bool [B, T] array matching every x's "
                       f"{sorted(set(shapes))}, got {valid.dtype} {tuple(valid.shape)}")

  sums = jnp.zeros((hc * c, d), jnp.float32)
  counts = jnp.zeros((hc * c,), jnp.float32)
  for xn, an in zip(xs, ids):
    b, t, h, _ = xn.shape
    an = jax.lax.stop_gradient(an).astype(jnp.int32)
    keep = (an >= 0) & (an < c)
    if valid is not None:
      keep &= valid[:, :, None]
    group = jnp.arange(h, dtype=jnp.int32) // (h // hc)
    flat_ids = jnp.where(keep, group * c + an, hc * c).reshape(-1)  # hc * c: dropped
    vectors = _normalised(jax.lax.stop_gradient(xn)).astype(jnp.float32).reshape(-1, d)
    sums += jax.ops.segment_sum(vectors, flat_ids, num_segments=hc * c)
    counts += jax.ops.segment_sum(jnp.ones_like(flat_ids, jnp.float32), flat_ids,
                                  num_segments=hc * c)
  mean = (sums / jnp.maximum(counts, 1.0)[:, None]).reshape(hc, c, d)
  old = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  moved = _normalised(decay * old + (1.0 - decay) * mean)
  new = jnp.where((counts > 0).reshape(hc, c, 1), moved, old)
  return new.astype(centroids.dtype)


def _dense_rank(x_BN):
  """Per row, each id's rank among the row's distinct ids (order kept): [B, N] int32."""
  order = jnp.argsort(x_BN, axis=-1, stable=True)
  ordered = jnp.take_along_axis(x_BN, order, axis=-1)
  step = jnp.concatenate([jnp.zeros_like(ordered[:, :1]),
                          (ordered[:, 1:] != ordered[:, :-1]).astype(jnp.int32)], axis=-1)
  return jnp.take_along_axis(jnp.cumsum(step, axis=-1), jnp.argsort(order, axis=-1), axis=-1)


def _routed_layout(q_clusters, k_clusters, q_positions, kv_positions, q_segment_ids,
                   kv_segment_ids, num_clusters):
  """The op's view: per row ``(b, kv_head)`` the folded ids and positions of the query rows
  (token-major, then group head) and keys, each sorted by folded id, and the sorting orders.

  Returns ``(q_order, k_order, q_ids, k_ids, q_pos, k_pos)``: orders [B * Hkv, Tq * G] and
  [B * Hkv, Tk]; ids and positions sorted the same way."""
  b, tq, hq = q_clusters.shape
  tk, hkv = k_clusters.shape[1:]
  g = hq // hkv
  if q_segment_ids is None:
    q_rank, k_rank = jnp.zeros((b, tq), jnp.int32), jnp.zeros((b, tk), jnp.int32)
  else:
    rank = _dense_rank(jnp.concatenate([q_segment_ids, kv_segment_ids], axis=1))
    q_rank, k_rank = rank[:, :tq], rank[:, tq:]
  q_ids = q_rank[:, :, None] * num_clusters + q_clusters  # [B, Tq, Hq]
  q_ids = q_ids.reshape(b, tq, hkv, g).transpose(0, 2, 1, 3).reshape(b * hkv, tq * g)
  k_ids = (k_rank[:, :, None] * num_clusters + k_clusters).transpose(0, 2, 1)
  k_ids = k_ids.reshape(b * hkv, tk)
  q_pos = jnp.broadcast_to(q_positions[:, None, :, None], (b, hkv, tq, g)).reshape(b * hkv, -1)
  k_pos = jnp.broadcast_to(kv_positions[:, None], (b, hkv, tk)).reshape(b * hkv, tk)
  q_order = jnp.argsort(q_ids, axis=-1, stable=True)
  k_order = jnp.argsort(k_ids, axis=-1, stable=True)
  take = lambda x, order: jnp.take_along_axis(x, order, axis=-1)  # noqa: E731
  return (q_order, k_order, take(q_ids, q_order), take(k_ids, k_order), take(q_pos, q_order),
          take(k_pos, k_order))


def routing_attention(q, k, v, centroids, *, positions=None, segment_ids=None,
                      kv_positions=None, kv_segment_ids=None, scale=None, logits_soft_cap=None,
                      implementation: str | None = None, block_sizes: BlockSizes | None = None,
                      return_lse: bool = False, return_assignments: bool = False):
  """Causal attention within k-means clusters (module docstring).

  Args:
    q: [B, Tq, Hq, D] queries; k: [B, Tk, Hkv, D] keys; v: [B, Tk, Hkv, Dv] values
      (``Hq % Hkv == 0``).
    centroids: [Hkv, C, D] cluster centroids of each KV head (any norm: routing normalises).
    positions, segment_ids: [Tq] or [B, Tq] integer positions (default ``arange(Tq)``) and
      packed-document ids (default: one document) of the queries, and of the keys too unless
      ``kv_positions`` / ``kv_segment_ids`` are given.
    kv_positions, kv_segment_ids: the keys' own, for keys other than the queries (a KV cache);
      ``kv_positions`` is needed when ``Tk != Tq``, ``kv_segment_ids`` when ``segment_ids`` is
      given and ``Tk != Tq``.
    scale, logits_soft_cap, implementation, block_sizes: as in `attention` (one call).
    return_lse: also return the float32 lse [B, Hq, Tq] (for `merge`).
    return_assignments: also return the cluster ids ``(q_clusters [B, Tq, Hq],
      k_clusters [B, Tk, Hkv])`` for `update_centroids`.

  Returns:
    out [B, Tq, Hq, Dv] in q's dtype, then lse and the assignments when asked for.
  """
  owner = "routing_attention"
  for name, x in (("q", q), ("k", k), ("v", v)):
    _array(owner, name, x, 4)
    _floating(owner, name, x)
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"{owner}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1:3]
  if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hq % hkv:
    raise ValueError(f"{owner}: q [B, Tq, Hq, D] = {tuple(q.shape)}, k [B, Tk, Hkv, D] = "
                     f"{tuple(k.shape)} and v [B, Tk, Hkv, Dv] = {tuple(v.shape)} must agree on "
                     f"B, Tk, Hkv and D, with Hq a multiple of Hkv")
  hc, c = _check_centroids(owner, centroids, hkv, d, "k's")
  if hc != hkv:
    raise ValueError(f"{owner}: centroids must be [Hkv, C, D] = [{hkv}, C, {d}] (one set per "
                     f"KV head), got shape {tuple(centroids.shape)}")
  if (tq + tk) * c >= 2**31:
    raise ValueError(f"{owner}: (Tq + Tk) * C must stay below 2**31 (folded int32 ids), got "
                     f"Tq={tq}, Tk={tk}, C={c} from centroids")
  if tq != tk and kv_positions is None:
    raise ValueError(f"{owner}: kv_positions is needed when the keys are not the queries "
                     f"(Tq={tq}, Tk={tk}), got None")
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError(f"{owner}: kv_segment_ids needs segment_ids too; got segment_ids=None")
  if segment_ids is not None and kv_segment_ids is None and tq != tk:
    raise ValueError(f"{owner}: kv_segment_ids is needed with segment_ids when Tq={tq} != "
                     f"Tk={tk}, got None")
  for name, flag in (("return_lse", return_lse), ("return_assignments", return_assignments)):
    if not isinstance(flag, bool):
      raise TypeError(f"{owner}: {name} must be a bool, got {flag!r}")
  positions = token_ids(owner, "positions", positions, b, tq)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
  segment_ids = token_ids(owner, "segment_ids", segment_ids, b, tq)
  kv_positions = positions if kv_positions is None else token_ids(
      owner, "kv_positions", kv_positions, b, tk)
  kv_segment_ids = segment_ids if kv_segment_ids is None else token_ids(
      owner, "kv_segment_ids", kv_segment_ids, b, tk)

  q_clusters, k_clusters = route(q, centroids), route(k, centroids)
  q_order, k_order, q_ids, k_ids, q_pos, k_pos = _routed_layout(
      q_clusters, k_clusters, positions, kv_positions, segment_ids, kv_segment_ids, c)
  g = hq // hkv
  n = b * hkv
  q_rows = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(n, tq * g, d)
  q_rows = jnp.take_along_axis(q_rows, q_order[..., None], axis=1)
  by_row = lambda x: x.transpose(0, 2, 1, 3).reshape(n, tk, x.shape[-1])  # noqa: E731
  k_rows = jnp.take_along_axis(by_row(k), k_order[..., None], axis=1)
  v_rows = jnp.take_along_axis(by_row(v), k_order[..., None], axis=1)
  out, lse = attention(q_rows[:, :, None], k_rows[:, :, None], v_rows[:, :, None],
                       mask=Mask(causal=True), q_positions=q_pos, kv_positions=k_pos,
                       q_segment_ids=q_ids, kv_segment_ids=k_ids, scale=scale,
                       logits_soft_cap=logits_soft_cap, implementation=implementation,
                       block_sizes=block_sizes, return_lse=True)
  unsort = jnp.argsort(q_order, axis=-1)
  out = jnp.take_along_axis(out[:, :, 0], unsort[..., None], axis=1)  # [N, Tq * G, Dv]
  out = out.reshape(b, hkv, tq, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, tq, hq, -1)
  results = (out,)
  if return_lse:
    lse = jnp.take_along_axis(lse[:, 0], unsort, axis=1)  # [N, Tq * G]
    results += (lse.reshape(b, hkv, tq, g).transpose(0, 1, 3, 2).reshape(b, hq, tq),)
  if return_assignments:
    results += ((q_clusters, k_clusters),)
  return results[0] if len(results) == 1 else results
