"""Context parallelism: the attention op over a sequence sharded along a mesh axis.

Every strategy is written once on top of the attention op — positions, lse and `merge` — so any
implementation (``xla``, ``pallas_tpu``, ``pallas_gpu``) is the per-shard kernel, and every mask,
GQA, sinks, soft cap and segment ids work unchanged:

- ``ring``: K/V (with their positions and segment ids) travel around the axis by ``ppermute``; the
  transfer for the next hop is issued before the current hop's compute, and the partials merge in
  float32. A hop whose every pair is masked is not computed (decided per device from position and
  segment ranges); when positions are known at trace time the ring also stops after the last hop
  any device needs (a sliding window rotates only as far as it reaches). The backward pass is a
  ``custom_vjp`` ring: dK/dV travel with their block and come home, dQ accumulates locally.
- ``all_gather``: queries stay sharded, K/V are gathered (cheap under GQA; memory O(T) for K/V).
- ``ulysses``: all-to-all from sequence-sharded to head-sharded, the op over the whole sequence
  for H/P heads, and back. Needs the query and KV heads divisible by the axis.
- ``hybrid``: Ulysses inside groups (the second axis), a ring across them (the first axis).
- ``auto``: a cost model over FLOPs, bytes moved and work balance picks one (logged, with why).

Load balancing is a token layout (`lsm.parallel.layout`), applied to the batch, not here: pass the
positions the permuted tokens really have (or ``layout=`` for default positions).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lsm.kernels.attention import BlockSizes, Mask, attention, merge
from lsm.kernels.attention.api import _normalised, attention_parts
from lsm.kernels.attention.blocks import TokenBlocks, block_tables
from lsm.kernels.attention.mask import array_module
from lsm.log import log_once
from lsm.parallel.layout import check_layout, layout_multiple, permutation
from lsm.parallel.specs import divisible_axes, resharded

STRATEGIES = ("auto", "ring", "all_gather", "ulysses", "hybrid")


# --------------------------------------------------------------------------------- mesh helpers


def current_mesh(mesh=None, owner="context_attention"):
  """``mesh``, or the mesh set by ``jax.set_mesh`` when None."""
  if mesh is not None:
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
      raise TypeError(f"{owner}: mesh must be a jax Mesh or None, got {type(mesh).__name__}")
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.axis_names:
    raise ValueError(f"{owner}: mesh=None needs a mesh set with jax.set_mesh(mesh); none is set")
  return mesh


def _axes_tuple(axis, strategy, owner):
  names = (axis,) if isinstance(axis, str) else tuple(axis) if isinstance(axis, (tuple, list)) \
      else None
  if names is None or not all(isinstance(a, str) for a in names):
    raise TypeError(f"{owner}: axis must be a mesh axis name (or two for strategy='hybrid'), "
                    f"got {axis!r}")
  if strategy == "hybrid" and len(names) != 2:
    raise ValueError(f"{owner}: strategy='hybrid' needs axis=(ring_axis, ulysses_axis), two mesh "
                     f"axes, got axis={axis!r}")
  if strategy != "hybrid" and strategy != "auto" and len(names) != 1:
    raise ValueError(f"{owner}: strategy={strategy!r} takes one mesh axis, got axis={axis!r}")
  return names


# --------------------------------------------------------------------------------- cost model


@dataclasses.dataclass(frozen=True)
class StrategyCost:
  """Per-device estimates of one strategy for one call (see `choose_strategy`)."""

  strategy: str
  flops: float  # attention FLOPs of the busiest device
  bytes_moved: float  # bytes each device sends
  memory: float  # K/V bytes resident per device at once
  seconds: float  # flops / peak + exposed communication / bandwidth
  reason: str = ""


def work_balance(mask: Mask, q_positions, kv_positions, shards: int):
  """(work of each device as a fraction of the total, for queries sharded ``shards`` ways over
  all keys) from visible pairs at block granularity ``T / (8 shards)``."""
  q_positions, kv_positions = np.atleast_2d(q_positions), np.atleast_2d(kv_positions)
  tq, tk = q_positions.shape[1], kv_positions.shape[1]
  bq, bk = max(1, tq // (8 * shards)), max(1, tk // (8 * shards))
  qt = TokenBlocks.build(q_positions[:1], None, bq)
  kt = TokenBlocks.build(kv_positions[:1], None, bk)
  visible = np.asarray(block_tables(mask, qt, kt)[0], np.float64)
  per_device = visible.reshape(shards, -1, visible.shape[1]).sum(axis=(1, 2))
  return per_device / max(per_device.sum(), 1.0)


def strategy_costs(*, batch: int, length: int, heads: int, kv_heads: int, head_dim: int,
                   value_dim: int, shards: int, itemsize: int, balance=None,
                   flops_per_byte: float = 300.0, peak_flops: float = 1e15) -> list[StrategyCost]:
  """Estimated per-device cost of each single-axis strategy.

  ``balance``: the busiest device's share of the attention work (1/P when balanced). Communication
  of the ring overlaps its compute (only what exceeds a hop's compute is exposed); all-gather and
  all-to-all are exposed. ``flops_per_byte`` is the machine's compute over its link bandwidth.
  """
  p = shards
  balance = 1.0 / p if balance is None else balance
  total = 2.0 * batch * heads * length * length * (head_dim + value_dim)
  kv_bytes = batch * length * kv_heads * (head_dim + value_dim) * itemsize
  bandwidth = peak_flops / flops_per_byte
  costs = []
  # ring: P-1 hops of the local K/V block; each overlaps one hop of compute.
  flops = total * balance
  hop = flops / p / peak_flops
  send = kv_bytes / p / bandwidth
  costs.append(StrategyCost("ring", flops, kv_bytes * (p - 1) / p, 2 * kv_bytes / p,
                            flops / peak_flops + (p - 1) * max(0.0, send - hop)))
  # all_gather: K/V of the whole sequence arrive before any compute.
  costs.append(StrategyCost("all_gather", flops, kv_bytes * (p - 1) / p, kv_bytes,
                            flops / peak_flops + kv_bytes * (p - 1) / p / bandwidth))
  # ulysses: q, k, v and out each go through one all-to-all; work is balanced exactly.
  if heads % p == 0 and kv_heads % p == 0:
    a2a = batch * length * (heads * (head_dim + value_dim) * itemsize) + kv_bytes
    moved = a2a * (p - 1) / p / p
    costs.append(StrategyCost("ulysses", total / p, moved, kv_bytes / p,
                              total / p / peak_flops + moved / bandwidth))
  return costs


def choose_strategy(*, batch, length, heads, kv_heads, head_dim, value_dim, shards, itemsize,
                    balance=None) -> tuple[str, str]:
  """(strategy, why) of the cheapest estimate; all_gather only while the gathered K/V stay under
  a quarter of what the ring keeps of Q, K and V (memory is why one shards the sequence)."""
  if shards == 1:
    return "all_gather", "the axis has one device: nothing moves"
  costs = strategy_costs(batch=batch, length=length, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, value_dim=value_dim, shards=shards,
                         itemsize=itemsize, balance=balance)
  by_name = {c.strategy: c for c in costs}
  ring = by_name["ring"]
  q_bytes = batch * length * heads * (head_dim + value_dim) * itemsize / shards
  if by_name["all_gather"].memory > 0.25 * (q_bytes + ring.memory) * shards:
    costs = [c for c in costs if c.strategy != "all_gather"]
  best = min(costs, key=lambda c: c.seconds)
  table = ", ".join(f"{c.strategy} {c.seconds * 1e3:.3g} ms / {c.bytes_moved / 2**20:.3g} MiB"
                    for c in costs)
  why = f"estimated per-device time and bytes sent: {table}"
  if "ulysses" not in by_name:
    why += f"; ulysses impossible: heads {heads}/{kv_heads} not divisible by {shards}"
  return best.strategy, why


# --------------------------------------------------------------------------------- ring


def _hop_visible(mask: Mask, q_pos, kv_pos, q_seg, kv_seg):
  """Whether any (query, key) pair of this hop may be allowed (ranges of the local tokens)."""
  qt = TokenBlocks.build(q_pos, q_seg, q_pos.shape[1])
  kt = TokenBlocks.build(kv_pos, kv_seg, kv_pos.shape[1])
  return block_tables(mask, qt, kt)[0][0, 0]


def hop_table(mask: Mask, q_pos, kv_pos, q_seg, kv_seg, shards: int):
  """numpy [P, P]: ``needed[s, r]`` — device r needs the K/V block it holds at hop s (that of
  device ``(r - s) mod P``). Positions and ids are the global [B, T] arrays in shard order."""
  qt = TokenBlocks.build(q_pos, q_seg, q_pos.shape[1] // shards)
  kt = TokenBlocks.build(kv_pos, kv_seg, kv_pos.shape[1] // shards)
  visible = np.asarray(block_tables(mask, qt, kt)[0])  # [P (queries), P (keys)]
  r = np.arange(shards)
  return np.stack([visible[r, (r - s) % shards] for s in range(shards)])


def ring_hops(table, shards: int) -> int:
  """How many hops the ring runs: all P without a static `hop_table`, else up to the last hop
  any device needs (K/V move hops - 1 times forward)."""
  if table is None:
    return shards
  return int(np.max(np.nonzero(table.any(axis=1))[0], initial=0)) + 1


def _rotate(tree, axis, shards, shift=1):
  perm = [(i, (i + shift) % shards) for i in range(shards)]
  return jax.tree.map(lambda x: None if x is None else lax.ppermute(x, axis, perm), tree)


def _ring(axis: str, shards: int, table, parts, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """The sinkless ring attention of the local queries: (out float32, lse). ``table``: static
  `hop_table` or None (then hops are tested on device); ``parts``: `attention_parts` forward and
  backward."""
  forward, backward = parts
  mask_of = parts.mask
  hops = ring_hops(table, shards)

  def needed(s, qp, kp, qs, ks):
    if table is None:
      return _hop_visible(mask_of, qp, kp, qs, ks)
    return jnp.asarray(table)[s, lax.axis_index(axis)]  # s may be a loop index

  @jax.custom_vjp
  def ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]

  def ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    b, tq, hq, _ = q.shape
    dv = v.shape[3]
    acc = jnp.promote_types(q.dtype, jnp.float32)

    def hop(s, block, out, lse):
      o_s, l_s = lax.cond(
          needed(s, q_pos, block[2], q_seg, block[3]),
          lambda blk: forward(q, blk[0], blk[1], q_pos, blk[2], q_seg, blk[3]),
          lambda blk: (jnp.zeros((b, tq, hq, dv), q.dtype), jnp.full((b, hq, tq), -jnp.inf, acc)),
          block)
      return merge([(out, lse), (o_s, l_s.astype(acc))])

    def body(s, carry):
      block, out, lse = carry
      # Issue the next hop's transfer before this hop's compute: they do not depend on each other.
      incoming = _rotate(block, axis, shards)
      out, lse = hop(s, block, out, lse)
      return incoming, out, lse

    # A loop (not unrolled hops) so that one hop's temporaries are live at a time.
    init = ((k, v, kv_pos, kv_seg), jnp.zeros((b, tq, hq, dv), acc),
            jnp.full((b, hq, tq), -jnp.inf, acc))
    block, out, lse = lax.fori_loop(0, hops - 1, body, init)
    out, lse = hop(hops - 1, block, out, lse)  # the last hop sends nothing on
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)

  def ring_bwd(res, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cotangents
    acc = out.dtype

    def hop(s, block, dq, dkv):
      zeros = (jnp.zeros(q.shape, acc), jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
      dq_s, dk_s, dv_s = lax.cond(
          needed(s, q_pos, block[2], q_seg, block[3]),
          lambda blk: tuple(g.astype(acc) for g in backward(
              q, blk[0], blk[1], q_pos, blk[2], q_seg, blk[3], out, lse, d_out, d_lse)),
          lambda blk: zeros, block)
      return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

    def body(s, carry):
      block, dq, dkv = carry
      incoming = _rotate(block, axis, shards)
      dq, dkv = hop(s, block, dq, dkv)
      return incoming, dq, _rotate(dkv, axis, shards)  # dK/dV travel with their block

    init = ((k, v, kv_pos, kv_seg), jnp.zeros(q.shape, acc),
            (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)))
    block, dq, dkv = lax.fori_loop(0, hops - 1, body, init)
    dq, dkv = hop(hops - 1, block, dq, dkv)
    # After the last hop, device r holds the gradients of device (r - hops + 1)'s block.
    home = (1 - hops) % shards
    if home:
      dkv = _rotate(dkv, axis, shards, shift=home)
    return (dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None, None, None,
            None)

  ring.defvjp(ring_fwd, ring_bwd)
  return ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg)


@dataclasses.dataclass(frozen=True)
class _Parts:
  forward: object
  backward: object
  mask: Mask

  def __iter__(self):
    return iter((self.forward, self.backward))


# --------------------------------------------------------------------------------- strategies


@dataclasses.dataclass(frozen=True)
class _Call:
  """Static description of one context_attention call (closed over by the shard_map body)."""

  strategy: str
  axes: tuple[str, ...]
  sizes: tuple[int, ...]
  kwargs: dict  # mask, scale, logits_soft_cap, implementation, block_sizes
  table: np.ndarray | None  # ring hop table (static positions) or None
  has_seg: bool
  has_sinks: bool


def _local_attention(call: _Call, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ring_axis=None,
                     ring_size=1, table=None):
  """(out, lse) of local queries against keys that are either all here (ring_axis None) or spread
  over ``ring_axis``; sinkless."""
  if ring_axis is None or ring_size == 1:
    return attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                     kv_segment_ids=kv_seg, return_lse=True, **call.kwargs)
  kw = dict(call.kwargs)
  _, forward, backward = attention_parts(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                         q_segment_ids=q_seg, kv_segment_ids=kv_seg, **kw)
  parts = _Parts(forward, backward, kw["mask"])
  out, lse = _ring(ring_axis, ring_size, table, parts, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  return out, lse


def _gather_seq(x, axis):
  return None if x is None else lax.all_gather(x, axis, axis=1, tiled=True)


def _ulysses(call: _Call, axis, size, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, inner):
  """Sequence-sharded -> head-sharded over ``axis``, ``inner`` on the gathered sequence, back."""
  to_heads = lambda x: lax.all_to_all(x, axis, 2, 1, tiled=True)  # noqa: E731
  q, k, v = to_heads(q), to_heads(k), to_heads(v)
  q_pos, kv_pos, q_seg, kv_seg = (_gather_seq(x, axis) for x in (q_pos, kv_pos, q_seg, kv_seg))
  if sinks is not None:
    per = sinks.shape[0] // size
    sinks = lax.dynamic_slice_in_dim(sinks, lax.axis_index(axis) * per, per)
  out, lse = inner(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks)
  out = lax.all_to_all(out, axis, 1, 2, tiled=True)  # [B, T/P, H, Dv]
  lse = lax.all_to_all(lse, axis, 2, 1, tiled=True)  # [B, H, T/P]
  return out, lse


def _with_sinks(out, lse, sinks):
  if sinks is None:
    return out, lse
  return merge([(out, lse)], sinks=sinks)


def _body(call: _Call, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
  dtype = q.dtype
  if call.strategy == "all_gather":
    (axis,) = call.axes
    k, v = _gather_seq(k, axis), _gather_seq(v, axis)
    kv_pos, kv_seg = _gather_seq(kv_pos, axis), _gather_seq(kv_seg, axis)
    out, lse = _local_attention(call, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  elif call.strategy == "ring":
    out, lse = _local_attention(call, q, k, v, q_pos, kv_pos, q_seg, kv_seg, call.axes[0],
                                call.sizes[0], call.table)
  elif call.strategy == "ulysses":
    def inner(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
      return _with_sinks(*_local_attention(call, q, k, v, q_pos, kv_pos, q_seg, kv_seg), sinks)

    out, lse = _ulysses(call, call.axes[0], call.sizes[0], q, k, v, q_pos, kv_pos, q_seg,
                        kv_seg, sinks, inner)
    return out.astype(dtype), lse
  else:  # hybrid: Ulysses over the second axis inside a ring over the first
    ring_axis, uly_axis = call.axes

    def inner(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
      out, lse = _local_attention(call, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ring_axis,
                                  call.sizes[0], call.table)
      return _with_sinks(out, lse, sinks)

    out, lse = _ulysses(call, uly_axis, call.sizes[1], q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                        sinks, inner)
    return out.astype(dtype), lse
  out, lse = _with_sinks(out, lse, sinks)
  return out.astype(dtype), lse


# --------------------------------------------------------------------------------- layer setting


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """How a layer shards its attention over the sequence when the current mesh (``jax.set_mesh``)
  has ``axis`` with more than one device; otherwise the layer runs the plain op."""

  strategy: str = "auto"
  layout: str = "zigzag"
  axis: str = "sequence"

  def __post_init__(self):
    if self.strategy not in STRATEGIES or self.strategy == "hybrid":
      allowed = tuple(s for s in STRATEGIES if s != "hybrid")
      raise ValueError(f"ContextParallel: strategy must be one of {allowed} (hybrid needs two "
                       f"sequence axes; call context_attention for it), got {self.strategy!r}")
    check_layout(self.layout, "ContextParallel")
    if not isinstance(self.axis, str):
      raise TypeError(f"ContextParallel: axis must be a mesh axis name, got {self.axis!r}")

  def shards(self) -> int:
    """Devices on ``axis`` in the current mesh (1 when there is no mesh or no such axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or self.axis not in (mesh.axis_names or ()):
      return 1
    return int(mesh.shape[self.axis])


# --------------------------------------------------------------------------------- entry point


def context_attention(q, k, v, *, mesh=None, strategy: str = "auto", axis="sequence",
                      layout: str = "contiguous", mask: Mask | None = None, q_positions=None,
                      kv_positions=None, q_segment_ids=None, kv_segment_ids=None, sinks=None,
                      scale=None, logits_soft_cap=None, implementation: str | None = None,
                      return_lse: bool = False, block_sizes: BlockSizes | None = None,
                      batch_axes=("data", "fsdp"), head_axis: str | None = "tensor"):
  """The attention op (same arguments and result) on q, k, v sharded along T over ``axis``.

  Call it under ``jit`` (or eagerly) with global arrays; they are resharded to
  ``P(batch_axes, axis, head_axis, None)`` if they are not already.

  Args:
    mesh: the device mesh (None: the one set with ``jax.set_mesh``).
    strategy: "ring", "all_gather", "ulysses", "hybrid" or "auto" (module docstring).
    axis: the mesh axis the sequence is sharded over; for "hybrid" a pair
      ``(ring_axis, ulysses_axis)``: the sequence is sharded over both, ring-major.
    layout: how the tokens were laid out over the axis ("contiguous", "zigzag", "striped");
      only used for the default positions — explicit positions say it all.
    batch_axes, head_axis: mesh axes that shard the batch and the heads (when they divide them).
    Everything else: as `lsm.kernels.attention.attention`.

  Returns:
    out [B, Tq, Hq, Dv] (and lse [B, Hq, Tq] float32 with ``return_lse``), sharded like q.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"context_attention: strategy must be one of {STRATEGIES}, got "
                     f"{strategy!r}")
  check_layout(layout, "context_attention")
  mesh = current_mesh(mesh)
  axes = _axes_tuple(axis, strategy, "context_attention")
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"context_attention: axis {a!r} is not a mesh axis; the mesh has "
                       f"{tuple(mesh.axis_names)}")
  sizes = tuple(mesh.shape[a] for a in axes)
  shards = math.prod(sizes)
  # Check everything the attention op checks, on the global shapes, before tracing.
  implementation, kw, block_sizes = _normalised(
      q, k, v, mask=mask, q_positions=q_positions, kv_positions=kv_positions,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks, scale=scale,
      logits_soft_cap=logits_soft_cap, implementation=implementation, block_sizes=block_sizes)
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  multiple = layout_multiple(layout, shards)
  for name, t in (("Tq", tq), ("Tk", tk)):
    if t % multiple:
      raise ValueError(f"context_attention: the sequence length {name}={t} must be divisible by "
                       f"{multiple} (axis {axis!r} has {shards} devices"
                       f"{', layout zigzag cuts 2 chunks per device' if layout == 'zigzag' else ''}"
                       f"); pad the sequence")
  heads_spec = head_axis if (head_axis and head_axis in mesh.axis_names and
                             mesh.shape[head_axis] > 1 and hq % mesh.shape[head_axis] == 0 and
                             hkv % mesh.shape[head_axis] == 0) else None
  local_hq = hq // (mesh.shape[heads_spec] if heads_spec else 1)
  local_hkv = hkv // (mesh.shape[heads_spec] if heads_spec else 1)

  if q_positions is None:
    perm = permutation(tq, shards, layout)
    kw["q_positions"] = np.broadcast_to(perm, (b, tq))
  if kv_positions is None:
    kw["kv_positions"] = np.broadcast_to(permutation(tk, shards, layout), (b, tk))
  q_pos, kv_pos = kw["q_positions"], kw["kv_positions"]
  q_seg, kv_seg = kw["q_segment_ids"], kw["kv_segment_ids"]

  if strategy == "auto":
    balance = None
    if array_module(q_pos, kv_pos) is np:
      balance = float(np.max(work_balance(kw["mask"], q_pos, kv_pos, shards)))
    strategy, why = choose_strategy(batch=b, length=tq, heads=local_hq, kv_heads=local_hkv,
                                    head_dim=d, value_dim=dv, shards=shards,
                                    itemsize=jnp.dtype(q.dtype).itemsize, balance=balance)
    if len(axes) > 1:
      strategy, why = "hybrid", "two axes given"
    log_once(f"context_attention: strategy='auto' -> {strategy!r} ({why})")
  if strategy in ("ulysses", "hybrid"):
    uly = sizes[-1]
    for name, h in (("query heads", local_hq), ("KV heads", local_hkv)):
      if h % uly:
        raise ValueError(
            f"context_attention: strategy={strategy!r} splits the {name} over axis "
            f"{axes[-1]!r} of size {uly}, but there are {h}"
            f"{' per ' + repr(heads_spec) + ' shard' if heads_spec else ''}; "
            f"use strategy='ring' or 'all_gather', or a head count divisible by {uly}")
  if strategy in ("ring", "hybrid") and implementation == "reference":
    raise ValueError("context_attention: strategy=%r needs a blockwise implementation ('xla', "
                     "'pallas_tpu' or 'pallas_gpu'), got implementation='reference'" % strategy)

  table = None
  tokens = (q_pos, kv_pos, q_seg, kv_seg)
  if strategy in ("ring", "hybrid") and array_module(*(x for x in tokens if x is not None)) is np:
    ring_shards = sizes[0]
    table = hop_table(kw["mask"], *(None if x is None else np.asarray(x) for x in tokens),
                      ring_shards)
  kwargs = dict(mask=kw["mask"], scale=kw["scale"], logits_soft_cap=kw["logits_soft_cap"],
                implementation=implementation, block_sizes=block_sizes)
  call = _Call(strategy, axes, sizes, kwargs, table, q_seg is not None, sinks is not None)

  batch_spec = divisible_axes(mesh, batch_axes, b, "the batch", "context_attention")
  seq = axes[0] if len(axes) == 1 else axes
  qkv_spec = P(batch_spec, seq, heads_spec, None)
  tok_spec = P(batch_spec, seq)
  lse_spec = P(batch_spec, heads_spec, seq)
  in_specs = (qkv_spec, qkv_spec, qkv_spec, tok_spec, tok_spec,
              None if q_seg is None else tok_spec, None if kv_seg is None else tok_spec,
              None if sinks is None else P(heads_spec))
  body = jax.shard_map(lambda *args: _body(call, *args), mesh=mesh, in_specs=in_specs,
                       out_specs=(qkv_spec, lse_spec), check_vma=False)
  args = (q, k, v, jnp.asarray(q_pos), jnp.asarray(kv_pos),
          None if q_seg is None else jnp.asarray(q_seg),
          None if kv_seg is None else jnp.asarray(kv_seg), sinks)
  out, lse = body(*resharded(mesh, args, in_specs))
  return (out, lse) if return_lse else out
