"""Static sparse-attention mixer: the `Attention` mixer with a pattern of
`lsm.kernels.attention.patterns` as its mask.

Training and prefill call the attention op with the pattern's `Mask`, so the blockwise path
visits only the key blocks the pattern allows and packed documents work through segment ids.
Decoding evaluates the same mask on the cached positions: ``sink_window`` and ``lambda`` keep a
ring cache of ``sink_tokens + window`` slots (all they can ever see), ``bigbird`` and ``strided``
a dense cache.

``lambda`` (LM-Infinite) adds a distance cap: a query at position ``p`` sees the global tokens
(positions ``< global_tokens``) rotated as if it sat at ``min(p, distance_cap)``, so its distance
to them never exceeds ``distance_cap``. That takes two op calls merged by their lse: the window
part, with the global tokens moved out of every window, and the global part, with every other
key moved after every query.

``select`` is content-based: query-aware block selection (`lsm.kernels.attention.select`,
Quest-style bounds from per-block key min/max). Training and prefill select, per query block of
``block_size`` and KV head, the ``top_k`` best earlier blocks plus ``sink_blocks`` and
``local_blocks``; decoding keeps a dense cache and each new query selects for itself over it
(the cache's slot blocks must be position blocks: one document per row written from position 0,
as `lsm.decode.generate` does). With ``top_k`` covering every block it is causal attention, and
then decoding equals the forward pass; with fewer, prefill (per query block) and decoding (per
query) may choose differently, as in Quest.

``routing`` is the Routing Transformer (`lsm.kernels.attention.routing`): queries and keys
(after RoPE) go to the nearest of ``num_clusters`` centroids per KV head and attend within their
cluster, causally. The centroids are a `RoutingCentroids` parameter trained by an online k-means
*pull* rather than by the loss: whatever the loss, its gradient with respect to the centroids
is ``centroid - normalise(mean of the normalised q and k routed to it)`` (zero for a centroid
nothing was routed to), so the training loop's optimizer step moves each centroid towards its
cluster's mean — k-means by gradient steps (the paper's EMA is `update_centroids`). Decoding
keeps a dense cache and routes the cached keys again each step, so it equals the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.kernels.attention import Mask, attention, merge
from lsm.kernels.attention.blocks import FAR_PAST
from lsm.kernels.attention.patterns import PATTERNS, pattern_mask
from lsm.kernels.attention.routing import route, routing_attention
from lsm.kernels.attention.select import block_select_attention, block_select_decode
from lsm.layers import checks
from lsm.layers.attention import Attention, KVCache
from lsm.layers.kv_cache import EMPTY_POSITION
from lsm.layers.rope import RopeScaling

SELECT_PARAMS = ("block_size", "top_k", "sink_blocks", "local_blocks")
SPARSE_PATTERNS = (*PATTERNS, "select", "routing")


class RoutingCentroids(nnx.Param):
  """Routing centroids [Hkv, C, D] of the ``routing`` pattern; their gradient is the k-means
  pull (module docstring), not the loss's."""


@jax.custom_vjp
def _kmeans_pull(centroids, q, k, q_clusters, k_clusters):
  """0.0, whose gradient with respect to the centroids is the k-means pull (others: zero)."""
  del q, k, q_clusters, k_clusters
  return jnp.zeros((), centroids.dtype)


def _pull_fwd(centroids, q, k, q_clusters, k_clusters):
  return _kmeans_pull(centroids, q, k, q_clusters, k_clusters), (centroids, q, k, q_clusters,
                                                                 k_clusters)


def _pull_bwd(res, _):
  centroids, q, k, q_clusters, k_clusters = res
  hkv, c, d = centroids.shape
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  sums = jnp.zeros((hkv, c, d), jnp.float32)
  counts = jnp.zeros((hkv, c), jnp.float32)
  for x, ids in ((q, q_clusters), (k, k_clusters)):
    b, t, h, _ = x.shape
    group = h // hkv
    onehot = jax.nn.one_hot(ids.reshape(b, t, hkv, group), c, dtype=jnp.float32)
    sums += jnp.einsum("btkgc,btkgd->kcd", onehot,
                       unit(x.astype(jnp.float32)).reshape(b, t, hkv, group, d))
    counts += jnp.sum(onehot, axis=(0, 1, 3))
  target = unit(sums / jnp.maximum(counts, 1.0)[..., None])
  pull = jnp.where(counts[..., None] > 0, centroids.astype(jnp.float32) - target, 0.0)
  return (pull.astype(centroids.dtype), jnp.zeros_like(q), jnp.zeros_like(k), None, None)


_kmeans_pull.defvjp(_pull_fwd, _pull_bwd)

# Before every real position: outside every window, so the window part never sees the key.
_FAR_PAST = FAR_PAST


class SparseAttention(Attention):
  """Causal self-attention restricted to a static sparse pattern (GQA, RoPE, qk-norm as in
  `Attention`).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as `Attention`.
    pattern: ``"sink_window"``, ``"lambda"``, ``"bigbird"``, ``"strided"``, ``"select"`` or
      ``"routing"``.
    distance_cap: ``"lambda"`` only: the farthest a query sees the global tokens (default: the
      window).
    **pattern_params: the parameters of the pattern's function in
      `lsm.kernels.attention.patterns` — ``window, sink_tokens`` (sink_window); ``window,
      global_tokens`` (lambda); ``block, num_local_blocks, num_global_blocks, num_random_blocks,
      max_length[, seed]`` (bigbird); ``block, local_blocks, stride, max_length`` (strided).
      The block patterns cover positions ``< max_length``. ``select``: ``block_size, top_k[,
      sink_blocks=1, local_blocks=1]``. ``routing``: ``num_clusters``.
    rope_base, rope_scaling, logits_soft_cap, implementation, qk_norm, rngs, dtype, param_dtype:
      as `Attention`.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, pattern: str, distance_cap: int | None = None, rope_base: float = 10000.0,
               rope_scaling: RopeScaling = RopeScaling(), logits_soft_cap: float | None = None,
               implementation: str | None = None, qk_norm: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, **pattern_params):
    if pattern not in SPARSE_PATTERNS:
      raise ValueError(f"SparseAttention: pattern must be one of {SPARSE_PATTERNS}, got "
                       f"{pattern!r}")
    self.select = None
    num_clusters = None
    if pattern == "routing":
      if set(pattern_params) != {"num_clusters"}:
        extra = sorted(set(pattern_params) - {"num_clusters"})
        raise ValueError(f"SparseAttention: pattern 'routing' takes num_clusters only, got "
                         f"{extra[0] if extra else 'no num_clusters'}")
      num_clusters = checks.positive_int("SparseAttention", "num_clusters",
                                         pattern_params["num_clusters"])
      mask = Mask(causal=True)
    elif pattern == "select":
      unknown = sorted(set(pattern_params) - set(SELECT_PARAMS))
      if unknown:
        raise ValueError(f"SparseAttention: {unknown[0]}={pattern_params[unknown[0]]!r} is not a "
                         f"parameter of pattern 'select'; it takes {', '.join(SELECT_PARAMS)}")
      for name in ("block_size", "top_k"):
        if name not in pattern_params:
          raise ValueError(f"SparseAttention: pattern 'select' needs {name}")
      select = {"sink_blocks": 1, "local_blocks": 1, **pattern_params}
      for name, low in (("block_size", 1), ("top_k", 0), ("sink_blocks", 0), ("local_blocks", 1)):
        value = select[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
          raise ValueError(f"SparseAttention: {name} must be an int >= {low}, got {value!r}")
      self.select = {k: int(v) for k, v in select.items()}
      mask = Mask(causal=True)
    else:
      try:
        mask = pattern_mask(pattern, **pattern_params)
      except ValueError as error:
        raise ValueError(f"SparseAttention: {error}") from None
    if pattern == "lambda":
      distance_cap = checks.positive_int("SparseAttention", "distance_cap", distance_cap,
                                         allow_none=True) or mask.window[0]
    elif distance_cap is not None:
      raise ValueError(f"SparseAttention: distance_cap={distance_cap!r} applies to pattern "
                       f"'lambda' only, got pattern={pattern!r}")
    window = None if mask.window is None else mask.window[0]
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, window=window,
                     sink_tokens=None if window is None else mask.sink_tokens,
                     rope_base=rope_base, rope_scaling=rope_scaling,
                     logits_soft_cap=logits_soft_cap, implementation=implementation,
                     qk_norm=qk_norm, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.pattern = pattern
    self.mask = mask
    self.distance_cap = distance_cap
    if num_clusters is not None:
      init = jax.random.normal(rngs.params(), (num_kv_heads, num_clusters, self.head_dim))
      init = init / jnp.linalg.norm(init, axis=-1, keepdims=True)
      self.centroids = RoutingCentroids(init.astype(param_dtype),
                                        out_sharding=("kv_heads", None, "head_dim"),
                                        eager_sharding=False)
    else:
      self.centroids = None
    # Positions the block layout covers (None: any).
    self.max_length = None if mask.layout is None else mask.layout.shape[0] * mask.layout_block[0]

  def init_cache(self, batch_size: int, max_length: int, dtype=None, *, policy=None) -> KVCache:
    """An empty cache: a ring buffer of ``sink_tokens + window`` slots for ``sink_window`` and
    ``lambda``, else a dense cache of ``max_length`` slots (at most the pattern's
    ``max_length``). ``policy`` must be None: a cache policy would replace the pattern."""
    if policy is not None:
      raise ValueError(f"SparseAttention.init_cache: policy must be None (a cache policy would "
                       f"replace the {self.pattern!r} pattern), got {policy!r}")
    max_length = checks.positive_int("SparseAttention.init_cache", "max_length", max_length)
    if self.max_length is not None and max_length > self.max_length:
      raise ValueError(f"SparseAttention.init_cache: max_length={max_length} exceeds the "
                       f"{self.max_length} positions the {self.pattern!r} layout covers; build "
                       f"the layer with a larger max_length")
    return super().init_cache(batch_size, max_length, dtype)

  def __call__(self, x_BTD, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    """As `Attention.__call__`: ``y`` for x [B, T, D], or ``(y, cache)`` with a cache."""
    if self.pattern == "select":
      return self._selected(x_BTD, positions, segment_ids, cache)
    if self.pattern == "routing":
      return self._routed(x_BTD, positions, segment_ids, cache)
    if self.pattern != "lambda":
      return super().__call__(x_BTD, positions=positions, segment_ids=segment_ids, cache=cache)
    positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    b, t, _ = x_BTD.shape
    if positions is None:  # numpy, so the op plans its block visits at trace time
      positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    xp = np if isinstance(positions, np.ndarray) else jnp
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD)
    q_far_BTHK = self._rope(q_BTHK, xp.minimum(positions, self.distance_cap))
    q_BTHK, k_BTGK = (self._rope(z, positions) for z in (q_BTHK, k_BTGK))
    kv_positions, kv_segment_ids = positions, segment_ids
    if cache is not None:
      (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), cache = cache.append(
          k_BTGK, v_BTGK, positions, segment_ids)
      k_BTGK, v_BTGK = k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype)
      xp = jnp
    is_global = kv_positions < self.sink_tokens
    common = dict(q_positions=positions, q_segment_ids=segment_ids,
                  kv_segment_ids=kv_segment_ids, logits_soft_cap=self.logits_soft_cap,
                  implementation=self.implementation, return_lse=True)
    near = attention(q_BTHK, k_BTGK, v_BTGK, mask=Mask(causal=True, window=(self.window, 0)),
                     kv_positions=xp.where(is_global, _FAR_PAST, kv_positions), **common)
    far = attention(q_far_BTHK, k_BTGK, v_BTGK, mask=Mask(causal=True),
                    kv_positions=xp.where(is_global, kv_positions, EMPTY_POSITION), **common)
    out_BTHK, _ = merge([near, far])
    y_BTD = self._output(out_BTHK)
    return y_BTD if cache is None else (y_BTD, cache)

  def _rotated(self, x_BTD, positions, segment_ids, cache):
    """Checked positions and segment ids (default ``arange``) and the rotated q, k and v."""
    positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    b, t, _ = x_BTD.shape
    if positions is None:
      positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD)
    q_BTHK, k_BTGK = (self._rope(z, positions) for z in (q_BTHK, k_BTGK))
    return positions, segment_ids, q_BTHK, k_BTGK, v_BTGK

  def _selected(self, x_BTD, positions, segment_ids, cache):
    """The ``select`` pattern: block selection over the sequence, or per query over the cache."""
    positions, segment_ids, q_BTHK, k_BTGK, v_BTGK = self._rotated(x_BTD, positions,
                                                                   segment_ids, cache)
    common = dict(logits_soft_cap=self.logits_soft_cap, implementation=self.implementation,
                  **self.select)
    if cache is None:
      out = block_select_attention(q_BTHK, k_BTGK, v_BTGK, positions=positions,
                                   segment_ids=segment_ids, **common)
      return self._output(out)
    (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), cache = cache.append(
        k_BTGK, v_BTGK, positions, segment_ids)
    out = block_select_decode(q_BTHK, k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype),
                              q_positions=positions, cache_positions=kv_positions,
                              q_segment_ids=segment_ids, cache_segment_ids=kv_segment_ids,
                              **common)
    return self._output(out), cache

  def _routed(self, x_BTD, positions, segment_ids, cache):
    """The ``routing`` pattern: attention within clusters; the centroids get the k-means pull."""
    positions, segment_ids, q_BTHK, k_BTGK, v_BTGK = self._rotated(x_BTD, positions,
                                                                   segment_ids, cache)
    centroids = self.centroids[...]
    common = dict(logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    if cache is None:
      out = routing_attention(q_BTHK, k_BTGK, v_BTGK, centroids, positions=positions,
                              segment_ids=segment_ids, **common)
      y = self._output(out)
      pull = _kmeans_pull(centroids, q_BTHK, k_BTGK, route(q_BTHK, centroids),
                          route(k_BTGK, centroids))
      return y + pull.astype(y.dtype)  # adds 0.0; carries the centroids' gradient
    (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), cache = cache.append(
        k_BTGK, v_BTGK, positions, segment_ids)
    out = routing_attention(q_BTHK, k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype),
                            centroids, positions=positions, segment_ids=segment_ids,
                            kv_positions=kv_positions, kv_segment_ids=kv_segment_ids, **common)
    return self._output(out), cache
