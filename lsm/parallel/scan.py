"""Sequence-parallel recurrences: the scan ops over a sequence sharded along a mesh axis.

Layers call these instead of the kernels directly. With no mesh set (``jax.set_mesh``), or a
``sequence`` axis of one device, each is the plain op. Otherwise every shard

1. scans its own tokens from a zero state (any implementation of the op),
2. sends its (final state, decay product) pair to the others (one all-gather of a [B, state]
   pair per shard — never the sequence),
3. folds the pairs of the shards before it into the state entering its first token, and
4. corrects its outputs: the state entering a shard reaches token t decayed by the product of the
   decays up to t (zero after a document starts), so ``h_t += decay_t * h_in`` and, for the
   selective scan and SSD, ``y_t += C_t . (decay_t * h_in)``.

All of it is differentiable: the backward pass is the same fold run by autodiff through the
all-gather. `causal_conv1d` takes its W-1 token halo from the previous shard by ``ppermute``.
Tokens must be in order (the ``contiguous`` layout): a scan has a direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lsm.parallel.specs import divisible_axes, resharded

BATCH_AXES = ("data", "fsdp")


def sequence_shards(axis: str = "sequence") -> int:
  """Devices on ``axis`` of the current mesh (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or axis not in (mesh.axis_names or ()):
    return 1
  return int(mesh.shape[axis])


def _check_length(op: str, length: int, shards: int, minimum: int = 1):
  if length % shards or length // shards < minimum:
    raise ValueError(f"{op}: under a mesh with {shards} devices on 'sequence' the length T must "
                     f"be a multiple of {shards} with at least {minimum} tokens per device, got "
                     f"T={length}")


def _sharded(mesh, body, args, in_specs, out_specs):
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return fn(*resharded(mesh, args, in_specs))


def _incoming(decay, h_last, h0, axis: str, shards: int):
  """(state entering this shard, the sequence's final state) from every shard's (decay product,
  final state from zero) pair: h_in[0] = h0, h_in[i+1] = decay[i] * h_in[i] + h_last[i]."""
  decays = lax.all_gather(decay, axis)
  lasts = lax.all_gather(h_last, axis)
  index = lax.axis_index(axis)
  h = h0
  h_in = jnp.zeros_like(h0)
  for i in range(shards):
    h_in = jnp.where(index == i, h, h_in)
    h = decays[i] * h + lasts[i]
  return h_in, h


def _alive(reset):
  """[B, T] 1.0 up to the first reset of this shard, 0.0 from it on (the incoming state dies)."""
  if reset is None:
    return None
  return (jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0)


# ------------------------------------------------------------------------------- linear_scan


def linear_scan(a, b, h0=None, *, reset=None, reverse=False, implementation=None,
                axis: str = "sequence"):
  """`lsm.kernels.scan.linear.linear_scan`, sequence-parallel under a mesh (see the module)."""
  from lsm.kernels.scan.linear import linear_scan as op

  shards = sequence_shards(axis)
  kw = dict(implementation=implementation)
  if shards == 1:
    return op(a, b, h0, reset=reset, reverse=reverse, **kw)
  mesh = jax.sharding.get_abstract_mesh()
  batch, length = b.shape[:2]
  _check_length("linear_scan", length, shards)
  if h0 is None:
    h0 = jnp.zeros((batch, *b.shape[2:]), jnp.result_type(a.dtype, b.dtype, jnp.float32))
  if reverse:
    # The reverse scan is the forward scan of the flipped sequence: flip it globally (XLA moves the
    # shards), scan, flip back.
    flip = lambda x: None if x is None else jnp.flip(x, axis=1)  # noqa: E731
    h, h_last = linear_scan(flip(a), flip(b), h0, reset=flip(reset), implementation=implementation,
                            axis=axis)
    return flip(h), h_last

  def body(a, b, h0, reset):
    h_loc, last_loc = op(a, b, None, reset=reset, **kw)
    ones = jnp.ones_like(h0, dtype=last_loc.dtype)
    decay_t, decay = op(a, jnp.zeros_like(b), ones, reset=reset, **kw)
    h_in, h_last = _incoming(decay, last_loc, h0.astype(last_loc.dtype), axis, shards)
    h = h_loc.astype(last_loc.dtype) + decay_t.astype(last_loc.dtype) * h_in[:, None]
    return h.astype(h_loc.dtype), h_last

  bspec = divisible_axes(mesh, BATCH_AXES, batch, "batch", "sequence-parallel scan")
  rest = (None,) * (b.ndim - 2)
  seq_spec, state_spec = P(bspec, axis, *rest), P(bspec, *rest)
  specs = (seq_spec, seq_spec, state_spec, None if reset is None else P(bspec, axis))
  return _sharded(mesh, body, (a, b, h0, reset), specs, (seq_spec, state_spec))


# ------------------------------------------------------------------------ selective_scan, ssd


def _deltas(dt, dt_bias, delta_softplus, dtype):
  delta = dt.astype(dtype)
  if dt_bias is not None:
    delta = delta + dt_bias.astype(dtype)
  return jax.nn.softplus(delta) if delta_softplus else delta


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, h0=None, *, reset=None,
                   delta_softplus=True, chunk_size=64, implementation=None,
                   axis: str = "sequence"):
  """`lsm.kernels.scan.selective.selective_scan`, sequence-parallel under a mesh."""
  from lsm.kernels.scan.selective import selective_scan as op

  kw = dict(delta_softplus=delta_softplus, chunk_size=chunk_size, implementation=implementation)
  shards = sequence_shards(axis)
  if shards == 1:
    return op(x, dt, A, B, C, D, z, dt_bias, h0, reset=reset, **kw)
  mesh = jax.sharding.get_abstract_mesh()
  batch, length, channels = x.shape
  _check_length("selective_scan", length, shards)
  # The op validates everything; run it abstractly once so errors come before the shard_map.
  jax.eval_shape(lambda *args: op(*args, reset=reset, **kw), x, dt, A, B, C, D, z, dt_bias, h0)
  if h0 is None:
    h0 = jnp.zeros((batch, channels, A.shape[-1]), jnp.float32)

  def body(x, dt, A, B, C, D, z, dt_bias, h0, reset):
    y_loc, last_loc = op(x, dt, A, B, C, D, z, dt_bias, None, reset=reset, **kw)
    f = last_loc.dtype  # float32, or float64 for float64 inputs
    # Decay from the shard's start to token t: exp(A * cumsum(delta)), cut at the first reset.
    cum_BTE = jnp.cumsum(_deltas(dt, dt_bias, delta_softplus, f), axis=1)
    alive_BT = _alive(reset)
    decay = jnp.exp(A.astype(f) * cum_BTE[:, -1, :, None])
    if alive_BT is not None:
      decay = decay * alive_BT[:, -1, None, None]
    h_in, h_last = _incoming(decay, last_loc, h0.astype(last_loc.dtype), axis, shards)
    # y_t += C_t . (exp(A cum_t) h_in), reduced over the state without storing [B,T,E,N].
    corr_BTE = jnp.einsum("btn,bten,ben->bte", C.astype(f),
                          jnp.exp(A.astype(f) * cum_BTE[..., None]),
                          h_in)
    if alive_BT is not None:
      corr_BTE = corr_BTE * alive_BT[..., None]
    if z is not None:
      corr_BTE = corr_BTE * jax.nn.silu(z.astype(f))
    return (y_loc.astype(f) + corr_BTE).astype(y_loc.dtype), h_last

  bspec = divisible_axes(mesh, BATCH_AXES, batch, "batch", "sequence-parallel scan")
  seq3, seq2 = P(bspec, axis, None), P(bspec, axis)
  opt = lambda v, spec: None if v is None else spec  # noqa: E731
  specs = (seq3, seq3, P(None, None), seq3, seq3, opt(D, P(None)), opt(z, seq3),
           opt(dt_bias, P(None)), P(bspec, None, None), opt(reset, seq2))
  return _sharded(mesh, body, (x, dt, A, B, C, D, z, dt_bias, h0, reset), specs,
                  (seq3, P(bspec, None, None)))


def ssd(x, dt, A, B, C, D=None, dt_bias=None, h0=None, *, reset=None, delta_softplus=True,
        chunk_size=64, implementation=None, axis: str = "sequence"):
  """`lsm.kernels.scan.ssd.ssd`, sequence-parallel under a mesh."""
  from lsm.kernels.scan.ssd import ssd as op

  kw = dict(delta_softplus=delta_softplus, chunk_size=chunk_size, implementation=implementation)
  shards = sequence_shards(axis)
  if shards == 1:
    return op(x, dt, A, B, C, D, dt_bias, h0, reset=reset, **kw)
  mesh = jax.sharding.get_abstract_mesh()
  batch, length, heads, head_dim = x.shape
  groups, state = B.shape[2], B.shape[3]
  _check_length("ssd", length, shards)
  jax.eval_shape(lambda *args: op(*args, reset=reset, **kw), x, dt, A, B, C, D, dt_bias, h0)
  if h0 is None:
    h0 = jnp.zeros((batch, heads, head_dim, state), jnp.float32)

  def body(x, dt, A, B, C, D, dt_bias, h0, reset):
    y_loc, last_loc = op(x, dt, A, B, C, D, dt_bias, None, reset=reset, **kw)
    f = last_loc.dtype
    cum_BTH = jnp.cumsum(_deltas(dt, dt_bias, delta_softplus, f), axis=1)
    decay_BTH = jnp.exp(A.astype(f) * cum_BTH)
    alive_BT = _alive(reset)
    if alive_BT is not None:
      decay_BTH = decay_BTH * alive_BT[..., None]
    decay = decay_BTH[:, -1, :, None, None]
    h_in, h_last = _incoming(decay, last_loc, h0.astype(last_loc.dtype), axis, shards)
    h_in_BGRPN = h_in.reshape(h_in.shape[0], groups, heads // groups, head_dim, state)
    corr = jnp.einsum("btgn,bgrpn->btgrp", C.astype(f), h_in_BGRPN)
    corr_BTHP = corr.reshape(*corr.shape[:2], heads, head_dim) * decay_BTH[..., None]
    return (y_loc.astype(f) + corr_BTHP).astype(y_loc.dtype), h_last

  bspec = divisible_axes(mesh, BATCH_AXES, batch, "batch", "sequence-parallel scan")
  seq4, seq3, seq2 = P(bspec, axis, None, None), P(bspec, axis, None), P(bspec, axis)
  opt = lambda v, spec: None if v is None else spec  # noqa: E731
  d_spec = None if D is None else P(*(None,) * D.ndim)
  specs = (seq4, seq3, P(None), seq4, seq4, d_spec, opt(dt_bias, P(None)),
           P(bspec, None, None, None), opt(reset, seq2))
  return _sharded(mesh, body, (x, dt, A, B, C, D, dt_bias, h0, reset), specs,
                  (seq4, P(bspec, None, None, None)))


# ----------------------------------------------------------------------------- causal conv1d


def causal_conv1d(x, weight, bias=None, *, reset=None, state=None, axis: str = "sequence"):
  """`lsm.kernels.scan.conv1d.causal_conv1d`, sequence-parallel under a mesh: each shard's
  window reaches into the previous shard through a W-1 token halo (``ppermute``)."""
  from lsm.kernels.scan.conv1d import ConvState, causal_conv1d as op, init_conv_state

  shards = sequence_shards(axis)
  if shards == 1:
    return op(x, weight, bias, reset=reset, state=state)
  mesh = jax.sharding.get_abstract_mesh()
  batch, length, channels = x.shape
  width = weight.shape[0]
  _check_length("causal_conv1d", length, shards, minimum=max(width - 1, 1))
  jax.eval_shape(lambda *args: op(*args[:3], reset=args[3], state=args[4]), x, weight, bias,
                 reset, state)
  if state is None:
    state = init_conv_state(batch, width, channels, x.dtype)
  if reset is None:
    reset = jnp.zeros((batch, length), jnp.bool_)

  def body(x, weight, bias, reset, inputs, resets):
    index = lax.axis_index(axis)
    perm = [(i, i + 1) for i in range(shards - 1)]
    halo_x = lax.ppermute(x[:, length // shards - (width - 1):], axis, perm)
    halo_r = lax.ppermute(reset[:, length // shards - (width - 1):], axis, perm)
    first = index == 0
    halo = ConvState(jnp.where(first, inputs, halo_x), jnp.where(first, resets, halo_r))
    y, new = op(x, weight, bias, reset=reset, state=halo)
    last = index == shards - 1
    new_inputs = lax.psum(jnp.where(last, new.inputs, jnp.zeros_like(new.inputs)), axis)
    new_resets = lax.psum(jnp.where(last, new.resets, False).astype(jnp.int32), axis) > 0
    return y, new_inputs, new_resets

  bspec = divisible_axes(mesh, BATCH_AXES, batch, "batch", "sequence-parallel scan")
  seq3, seq2 = P(bspec, axis, None), P(bspec, axis)
  specs = (seq3, P(None, None), None if bias is None else P(None), seq2, P(bspec, None, None),
           P(bspec, None))
  y, inputs, resets = _sharded(mesh, body, (x, weight, bias, reset, state.inputs, state.resets),
                               specs, (seq3, P(bspec, None, None), P(bspec, None)))
  return y, ConvState(inputs, resets)
