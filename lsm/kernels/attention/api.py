"""`attention`: argument checks, normalisation and the choice of implementation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lsm.kernels.attention.mask import Mask
from lsm.kernels.attention.reference import attention_reference
from lsm.kernels.attention import pallas_common, pallas_gpu, pallas_tpu
from lsm.kernels.attention.blocks import BlockSizes, sink_split
from lsm.kernels.attention.merge import merge
from lsm.kernels.attention.xla import attention_xla, xla_parts
from lsm.log import log_once

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu")
_KERNELS = {"pallas_tpu": (pallas_tpu, "tpu"), "pallas_gpu": (pallas_gpu, "gpu")}
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _shape(x, name):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"attention: {name} must be an array, got {type(x).__name__}")
  return tuple(x.shape)


def _check_float(x, name):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"attention: {name} must have a floating dtype, got {x.dtype}")


def _token_array(x, name, batch, length):
  """Positions / segment ids: [T] or [B, T] integers -> [B, T] int32."""
  if x is None:
    return None
  # Host arrays stay numpy (concrete at trace time: the kernels then plan their visits now).
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"attention: {name} must have an integer dtype, got {x.dtype}")
  if x.shape not in ((length,), (batch, length)):
    raise ValueError(f"attention: {name} must have shape [{length}] or [{batch}, {length}], "
                     f"got {tuple(x.shape)}")
  return xp.broadcast_to(x.astype(np.int32), (batch, length))


def _positive_number(x, name, allow_none):
  if x is None and allow_none:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not (
      math.isfinite(x) and x > 0):
    allowed = "a positive finite number" + (" or None" if allow_none else "")
    raise ValueError(f"attention: {name} must be {allowed}, got {x!r}")
  return float(x)


def _check_layout_covers(mask: Mask, tq: int, tk: int):
  rows, cols = mask.layout.shape
  bq, bk = mask.layout_block
  if rows * bq < tq or cols * bk < tk:
    raise ValueError(
        f"attention: mask.layout of shape {mask.layout.shape} with layout_block {(bq, bk)} "
        f"covers {rows * bq} query and {cols * bk} key positions, but the default positions "
        f"run to {tq} and {tk}; give a layout of at least "
        f"({-(-tq // bq)}, {-(-tk // bk)}) blocks or pass explicit positions")


def _kernel_unsupported(implementation: str, q, k, mask: Mask, tokens, block_sizes,
                        interpret: bool) -> str | None:
  """Why a Pallas implementation cannot run these arguments compiled (or interpreted), or None."""
  module, _ = _KERNELS[implementation]
  if q.dtype not in _KERNEL_DTYPES:
    return f"q, k, v have dtype {q.dtype}; the compiled kernels take bfloat16, float16, float32"
  return module.unsupported_reason(mask, *tokens, block_sizes, q.shape[1], k.shape[1],
                                   q.shape[2] // k.shape[2], interpret)


def default_implementation(q=None, k=None, mask: Mask | None = None, tokens=None,
                           block_sizes=None) -> tuple[str, str]:
  """The implementation `implementation=None` picks for these arguments, and why."""
  platform = pallas_common.platform()
  for name, (_, kernel_platform) in _KERNELS.items():
    if platform == kernel_platform:
      if q is None:
        return name, f"backend '{platform}'"
      reason = _kernel_unsupported(name, q, k, mask, tokens, block_sizes, interpret=False)
      if reason is None:
        return name, f"backend '{platform}'"
      return "xla", f"'{name}' cannot run this call: {reason}"
  return "xla", (f"backend '{platform}': no Pallas kernel compiles for it, and the blockwise XLA "
                 f"path is the fastest implementation lsm has there")


def attention(q, k, v, *, mask: Mask | None = None, q_positions=None, kv_positions=None,
              q_segment_ids=None, kv_segment_ids=None, sinks=None, scale=None,
              logits_soft_cap=None, implementation: str | None = None, return_lse: bool = False,
              block_sizes: BlockSizes | None = None):
  """Multi-head attention with GQA, position-based masks, packing, sinks and soft-capping.

  Args:
    q: [B, Tq, Hq, D] queries.
    k: [B, Tk, Hkv, D] keys; ``Hq % Hkv == 0`` (GQA/MQA by grouping, K/V are never repeated).
    v: [B, Tk, Hkv, Dv] values (Dv may differ from D).
    mask: a `Mask` (None: every pair may attend).
    q_positions, kv_positions: [T] or [B, T] integer positions the mask is evaluated on
      (default ``arange``).
    q_segment_ids, kv_segment_ids: [T] or [B, T] integer ids; a query only sees keys of its own
      segment (packed documents). Give both or neither.
    sinks: [Hq] learned logits of an extra "attend to nothing" column in every softmax.
    scale: score scale (default ``D ** -0.5``).
    logits_soft_cap: scores become ``cap * tanh(s / cap)``.
    implementation: "reference", "xla", "pallas_tpu", "pallas_gpu", or None: the Pallas kernel
      of the backend when it supports the arguments, else "xla" (the choice and its reason are
      logged once). A Pallas implementation asked for on CPU runs in interpret mode.
    return_lse: also return the float32 log-sum-exp [B, Hq, Tq] for `merge`.
    block_sizes: `BlockSizes` of the blockwise paths (default: tuned per implementation).

  Returns:
    out [B, Tq, Hq, Dv] in q's dtype, and ``lse`` [B, Hq, Tq] if ``return_lse``. Rows that see
    nothing get out 0 and lse -inf (with ``sinks``: lse = the sink logit).
  """
  call = _normalised(q, k, v, mask=mask, q_positions=q_positions, kv_positions=kv_positions,
                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks,
                     scale=scale, logits_soft_cap=logits_soft_cap,
                     implementation=implementation, block_sizes=block_sizes)
  implementation, kwargs, block_sizes = call
  split = _sink_split(implementation, q, k, kwargs, block_sizes)
  if split is not None:
    out, lse = split(q, k, v)
    return (out, lse) if return_lse else out
  if implementation == "reference":
    out, lse = attention_reference(q, k, v, **kwargs)
  elif implementation == "xla":
    out, lse = attention_xla(q, k, v, block_sizes=block_sizes or BlockSizes(), **kwargs)
  elif implementation == "pallas_tpu":
    out, lse = pallas_tpu.KERNEL(q, k, v, block_sizes=block_sizes, **kwargs)
  else:
    out, lse = pallas_gpu.KERNEL(q, k, v, block_sizes=block_sizes, **kwargs)
  return (out, lse) if return_lse else out


def _sink_split(implementation, q, k, kwargs, block_sizes):
  """`blocks.sink_split` for this call, as ``split(q, k, v) -> (out, lse)``, or None.

  The main call (no sinks, the sink keys moved before every window) and the sinks' own short
  call are merged by lse; learned ``sinks`` logits join the main call once.
  """
  mask, kv_pos = kwargs["mask"], kwargs["kv_positions"]
  if implementation == "reference":
    return None
  bq, bk = (block_sizes or BlockSizes()).clipped(q.shape[1], k.shape[1])
  plan = sink_split(mask, kwargs["q_positions"], kv_pos, kwargs["q_segment_ids"],
                    kwargs["kv_segment_ids"], bq, bk)
  if plan is None:
    return None
  kv_seg = kwargs["kv_segment_ids"]
  sink_seg = None if kv_seg is None else (
      np if isinstance(kv_seg, np.ndarray) else jnp).take_along_axis(kv_seg, plan.index, -1)

  def split(q, k, v):
    main = attention(q, k, v, **{**kwargs, "mask": plan.main_mask,
                                 "kv_positions": plan.main_kv_positions},
                     implementation=implementation, return_lse=True, block_sizes=block_sizes)
    gather = lambda x: jnp.take_along_axis(x, jnp.asarray(plan.index)[:, :, None, None], axis=1)
    side = attention(q, gather(k), gather(v),
                     **{**kwargs, "mask": Mask(causal=mask.causal),
                        "kv_positions": plan.sink_positions, "kv_segment_ids": sink_seg,
                        "sinks": None},
                     implementation=implementation, return_lse=True, block_sizes=block_sizes)
    return merge([main, side])

  return split


def _normalised(q, k, v, *, mask, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                sinks, scale, logits_soft_cap, implementation, block_sizes):
  """Checks every argument; returns (implementation, normalised keyword arguments, block_sizes)."""
  q_shape, k_shape, v_shape = _shape(q, "q"), _shape(k, "k"), _shape(v, "v")
  for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
    if len(shape) != 4:
      raise ValueError(f"attention: {name} must have rank 4 [B, T, H, D], got shape {shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_float(x, name)
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  b, tq, hq, d = q_shape
  if k_shape[0] != b or v_shape[0] != b:
    raise ValueError(f"attention: batch sizes differ: q {b}, k {k_shape[0]}, v {v_shape[0]}")
  if k_shape[:3] != v_shape[:3]:
    raise ValueError(f"attention: k [B, Tk, Hkv, D] and v [B, Tk, Hkv, Dv] must agree on B, Tk "
                     f"and Hkv, got k {k_shape} and v {v_shape}")
  tk, hkv = k_shape[1], k_shape[2]
  if k_shape[3] != d:
    raise ValueError(f"attention: q and k must have the same head dim D, got q {d} and "
                     f"k {k_shape[3]}")
  if hkv == 0 or hq % hkv != 0:
    raise ValueError(f"attention: the query heads Hq={hq} must be a multiple of the key/value "
                     f"heads Hkv={hkv}")
  if tq == 0 or tk == 0:
    raise ValueError(f"attention: sequence lengths must be positive, got Tq={tq}, Tk={tk}")
  if mask is None:
    mask = Mask()
  if not isinstance(mask, Mask):
    raise TypeError(f"attention: mask must be an lsm Mask or None, got {type(mask).__name__}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("attention: give both q_segment_ids and kv_segment_ids, or neither; got "
                     f"q_segment_ids={'set' if q_segment_ids is not None else None}, "
                     f"kv_segment_ids={'set' if kv_segment_ids is not None else None}")
  if mask.layout is not None and q_positions is None and kv_positions is None:
    _check_layout_covers(mask, tq, tk)
  q_positions = _token_array(q_positions, "q_positions", b, tq)
  kv_positions = _token_array(kv_positions, "kv_positions", b, tk)
  q_segment_ids = _token_array(q_segment_ids, "q_segment_ids", b, tq)
  kv_segment_ids = _token_array(kv_segment_ids, "kv_segment_ids", b, tk)
  # Default positions are numpy arrays: concrete under jit and shard_map, so the kernels' block
  # visit plans are made at trace time.
  if q_positions is None:
    q_positions = np.broadcast_to(np.arange(tq, dtype=np.int32), (b, tq))
  if kv_positions is None:
    kv_positions = np.broadcast_to(np.arange(tk, dtype=np.int32), (b, tk))
  if sinks is not None:
    _shape(sinks, "sinks")
    if tuple(sinks.shape) != (hq,):
      raise ValueError(f"attention: sinks must have shape [Hq] = ({hq},), got "
                       f"{tuple(sinks.shape)}")
    _check_float(sinks, "sinks")
  scale = _positive_number(d ** -0.5 if scale is None else scale, "scale", False)
  logits_soft_cap = _positive_number(logits_soft_cap, "logits_soft_cap", True)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"attention: block_sizes must be a BlockSizes or None, got "
                    f"{type(block_sizes).__name__}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: implementation must be one of {IMPLEMENTATIONS} or None, got "
                     f"{implementation!r}")
  tokens = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if implementation is None:
    implementation, why = default_implementation(q, k, mask, tokens, block_sizes)
    log_once(f"attention: implementation=None -> '{implementation}' ({why})")
  if implementation in _KERNELS:
    kernel_platform = _KERNELS[implementation][1]
    platform = pallas_common.platform()
    if platform not in ("cpu", kernel_platform):
      raise ValueError(f"attention: implementation={implementation!r} runs on {kernel_platform} "
                       f"(or interpreted on cpu), but the default backend is {platform!r}")
    reason = _kernel_unsupported(implementation, q, k, mask, tokens, block_sizes,
                                 interpret=platform == "cpu")
    if reason is not None:
      raise ValueError(f"attention: implementation={implementation!r} cannot run this call: "
                       f"{reason}")

  kwargs = dict(mask=mask, q_positions=q_positions, kv_positions=kv_positions,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks,
                scale=scale, logits_soft_cap=logits_soft_cap)
  return implementation, kwargs, block_sizes


def attention_parts(q, k, v, *, mask: Mask | None = None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, scale=None, logits_soft_cap=None,
                    implementation: str | None = None, block_sizes: BlockSizes | None = None):
  """The forward and backward passes of one attention call, for callers that run their own
  ``custom_vjp`` over several calls (ring attention: one call per hop, merged by lse).

  Arguments are checked as `attention` checks them (shapes from ``q``, ``k``, ``v``; the
  positions and ids only for their shapes — the returned functions take their own). Returns
  ``(implementation, forward, backward)``:

  - ``forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` (no sinks: merge them in);
  - ``backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, d_lse) -> (dq, dk, dv)``
    with float32 (or float64) gradients. Given the *final* ``out`` and ``lse`` of the merged
    attention, it returns this call's share of the gradients: the ring's backward sums them.

  Positions and ids are [B, T] int32 (segment ids may be None). ``reference`` has no blockwise
  backward and is refused.
  """
  implementation, kw, block_sizes = _normalised(
      q, k, v, mask=mask, q_positions=q_positions, kv_positions=kv_positions,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=None, scale=scale,
      logits_soft_cap=logits_soft_cap, implementation=implementation, block_sizes=block_sizes)
  static = dict(mask=kw["mask"], scale=kw["scale"], logits_soft_cap=kw["logits_soft_cap"])
  if implementation == "reference":
    raise ValueError("attention_parts: implementation='reference' materialises the scores and has "
                     "no blockwise backward; use 'xla', 'pallas_tpu' or 'pallas_gpu'")
  if implementation == "xla":
    return (implementation, *xla_parts(block_sizes=block_sizes or BlockSizes(), **static))
  kernel = _KERNELS[implementation][0].KERNEL
  return (implementation, *kernel.parts(block_sizes=block_sizes, **static))
