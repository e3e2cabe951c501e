"""Sequence-sharded decoding: a KV cache sharded over the ``sequence`` axis.

Each device keeps ``1/P`` of the cache's slots. A decoding step (or a prefill chunk) writes its new
keys and values into the shard that owns their slots, every device attends the (replicated) new
queries over its own slots, and the partials merge by their log-sum-exp across the axis: a step
moves ``O(batch x heads x head_dim)`` between devices (one max and two sums), never the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lsm.kernels.attention import attention
from lsm.parallel.context import current_mesh
from lsm.parallel.specs import divisible_axes, resharded


def merge_across(out, lse, axis, sinks=None):
  """Merge per-device partials ``out [B, T, H, Dv]``, ``lse [B, H, T]`` over mesh ``axis``
  (inside ``shard_map``); sinks ([H] logits) join the softmax once. Returns (out, lse) float32,
  equal on every device of the axis."""
  acc = jnp.promote_types(lse.dtype, jnp.float32)
  lse = lse.astype(acc)
  top = lax.pmax(jnp.where(jnp.isfinite(lse), lse, -jnp.inf), axis)
  if sinks is not None:
    top = jnp.maximum(top, sinks.astype(acc)[:, None])
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  weight = jnp.exp(lse - top)  # [B, H, T]; 0 where this device saw nothing
  num = lax.psum(out.astype(acc) * weight.transpose(0, 2, 1)[..., None], axis)
  den = lax.psum(weight, axis)
  if sinks is not None:
    den = den + jnp.exp(sinks.astype(acc)[:, None] - top)
  seen = den > 0
  safe = jnp.where(seen, den, 1.0)
  return num / safe.transpose(0, 2, 1)[..., None], jnp.where(seen, top + jnp.log(safe), -jnp.inf)


def _write_local(buffer, new, start, axis):
  """Write ``new [B, t, ...]`` at global slots ``start .. start + t`` into this device's shard
  ``buffer [B, S/P, ...]`` (slots other shards own are dropped)."""
  local = buffer.shape[1]
  slots = start - lax.axis_index(axis) * local + jnp.arange(new.shape[1])
  slots = jnp.where((slots >= 0) & (slots < local), slots, local)  # out of range: dropped
  return buffer.at[:, slots].set(new.astype(buffer.dtype), mode="drop")


def sharded_cache_attention(q, new_k, new_v, new_positions, new_segment_ids, cache, *, mask,
                            mesh=None, axis: str = "sequence", scale=None, logits_soft_cap=None,
                            sinks=None, implementation=None, batch_axes=("data", "fsdp"),
                            head_axis: str | None = "tensor"):
  """Append t new tokens to a `DenseKVCache` whose slots are sharded over ``axis`` and attend the
  new queries over the whole cache. Returns ``(out [B, t, Hq, Dv], updated cache)``.

  ``q`` [B, t, Hq, D], ``new_k``/``new_v`` [B, t, Hkv, D], positions and ids [B, t]; the cache's
  ``max_length`` must be divisible by the axis size.
  """
  mesh = current_mesh(mesh, "sharded_cache_attention")
  shards = mesh.shape[axis]
  if cache.max_length % shards:
    raise ValueError(f"sharded_cache_attention: the cache's max_length={cache.max_length} must be "
                     f"divisible by the {shards} devices of axis {axis!r}")
  b, t, hq, _ = q.shape
  hkv = new_k.shape[2]
  if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + t > cache.max_length:
    raise ValueError(f"sharded_cache_attention: cannot write {t} tokens into a cache of "
                     f"max_length={cache.max_length} with {int(cache.length)} slots filled; "
                     f"create the cache with a larger max_length")
  batch_spec = divisible_axes(mesh, batch_axes, b, "the batch", "sharded_cache_attention")
  heads = head_axis if (head_axis and head_axis in mesh.axis_names and mesh.shape[head_axis] > 1
                        and hq % mesh.shape[head_axis] == 0
                        and hkv % mesh.shape[head_axis] == 0) else None
  rows = P(batch_spec, None, heads, None)  # new tokens: replicated over the axis
  slots = P(batch_spec, axis, heads, None)
  token_rows, token_slots = P(batch_spec, None), P(batch_spec, axis)

  def body(q, new_k, new_v, new_pos, new_seg, keys, values, positions, segment_ids, length,
           sinks):
    keys = _write_local(keys, new_k, length, axis)
    values = _write_local(values, new_v, length, axis)
    positions = _write_local(positions, new_pos, length, axis)
    segment_ids = _write_local(segment_ids, new_seg, length, axis)
    out, lse = attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask,
                         q_positions=new_pos, kv_positions=positions, q_segment_ids=new_seg,
                         kv_segment_ids=segment_ids, scale=scale,
                         logits_soft_cap=logits_soft_cap, implementation=implementation,
                         return_lse=True)
    out, _ = merge_across(out, lse, axis, sinks)
    return out.astype(q.dtype), keys, values, positions, segment_ids

  in_specs = (rows, rows, rows, token_rows, token_rows, slots, slots, token_slots, token_slots,
              P(), None if sinks is None else P(heads))
  out_specs = (rows, slots, slots, token_slots, token_slots)
  args = (q, new_k, new_v, new_positions, new_segment_ids, cache.keys, cache.values,
          cache.positions, cache.segment_ids, cache.length, sinks)
  out, keys, values, positions, segment_ids = jax.shard_map(
      body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
          *resharded(mesh, args, in_specs))
  # Under jit the fill count is not known while tracing: an overflowing write is dropped, and the
  # outputs of that step are NaN so that it cannot go unnoticed.
  out = jnp.where(cache.length + t > cache.max_length, jnp.nan, out)
  cache = cache.replace(keys=keys, values=values, positions=positions, segment_ids=segment_ids,
                        length=cache.length + t)
  return out, cache


def shard_cache(cache, *, mesh=None, axis: str = "sequence"):
  """A cache whose slot arrays are constrained to be sharded over ``axis`` (under ``jit``)."""
  mesh = current_mesh(mesh, "shard_cache")

  def constrain(x):
    if x.ndim < 2:
      return x
    spec = P(None, axis, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec)
                                            if isinstance(mesh, jax.sharding.Mesh) else spec)

  return jax.tree.map(constrain, cache)
