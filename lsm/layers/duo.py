"""DuoAttention: a policy per key/value head (Xiao et al., 2024, "DuoAttention: Efficient
long-context LLM inference with retrieval and streaming heads", arXiv:2410.10819).

Each KV head (with its GQA group of query heads) is a *retrieval* head — full causal attention
and a dense cache — or a *streaming* head — StreamingLLM's ``sink_tokens`` + ``window`` and a
ring cache of ``sink_tokens + window`` slots, so its memory is bounded whatever the length.
The heads of each type are gathered and run in one op call per type; the outputs go back in
head order before the output projection.

Which heads need retrieval is learnt: with gates (`enable_gates`), every KV head mixes its two
outputs, ``alpha * full + (1 - alpha) * streaming`` with ``alpha`` a `DuoGate` in [0, 1], and the
layer records its distillation error against full attention (`DuoDistillation`). Calibration
(`lsm.train.duo_calibrate.calibrate`) trains only the gates on ``distillation + l1 * sum
|alpha|``; `fix_head_types` then makes the heads with the highest alphas retrieval heads and the
others streaming heads, and removes the gates.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lsm.kernels.attention import attention
from lsm.kernels.attention.patterns import sink_window
from lsm.layers import checks
from lsm.layers.attention import Attention
from lsm.layers.kv_cache import DenseKVCache, RingKVCache
from lsm.layers.rope import RopeScaling

HEAD_TYPES = ("retrieval", "streaming")


class DuoGate(nnx.Param):
  """The calibration gate ``alpha`` of each KV head: 1 = full attention, 0 = streaming."""


class DuoDistillation(nnx.Variable):
  """A gated layer's distillation error in its last call: the mean over tokens of
  ``||y_gated - y_full||^2``, with ``y_full`` the layer's output with every head retrieval."""


@struct.dataclass
class DuoCache:
  """The cache of a `DuoAttention` layer: a dense cache of its retrieval heads and a ring cache
  (``sink_tokens + window`` slots) of its streaming heads; None for a type without heads."""

  retrieval: DenseKVCache | None
  streaming: RingKVCache | None


def check_head_types(owner: str, head_types, num_kv_heads: int) -> tuple[str, ...]:
  """``head_types`` as a tuple of `HEAD_TYPES` entries, one per KV head (None: all retrieval)."""
  if head_types is None:
    return ("retrieval",) * num_kv_heads
  if isinstance(head_types, str) or not isinstance(head_types, (tuple, list)):
    raise TypeError(f"{owner}: head_types must be a tuple of {HEAD_TYPES} entries (one per KV "
                    f"head) or None, got {type(head_types).__name__}")
  if len(head_types) != num_kv_heads or any(h not in HEAD_TYPES for h in head_types):
    raise ValueError(f"{owner}: head_types must hold one of {HEAD_TYPES} for each of the "
                     f"{num_kv_heads} KV heads, got {tuple(head_types)!r}")
  return tuple(head_types)


class DuoAttention(Attention):
  """Causal self-attention with a type per KV head: ``"retrieval"`` (every earlier token) or
  ``"streaming"`` (the first ``sink_tokens`` and the last ``window`` positions).

  Args:
    d_model, num_heads, num_kv_heads, head_dim: as `Attention`; a KV head's type applies to its
      ``num_heads // num_kv_heads`` query heads.
    window, sink_tokens: the streaming heads' `sink_window` mask.
    head_types: one of ``"retrieval"``, ``"streaming"`` per KV head (None: all retrieval).
    gates: add a `DuoGate` per KV head (initialised to ``gate_init``) for calibration: every head
      then runs both ways and mixes them, ``head_types`` is not read, and the layer takes no
      cache (see `enable_gates`).
    rope_base, rope_scaling, logits_soft_cap, implementation, qk_norm, rngs, dtype, param_dtype:
      as `Attention`.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, window: int, sink_tokens: int = 0, head_types=None, gates: bool = False,
               gate_init: float = 1.0, rope_base: float = 10000.0,
               rope_scaling: RopeScaling = RopeScaling(), logits_soft_cap: float | None = None,
               implementation: str | None = None, qk_norm: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    window = checks.positive_int("DuoAttention", "window", window)
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, (int, np.integer)) or (
        sink_tokens < 0):
      raise ValueError(f"DuoAttention: sink_tokens must be a non-negative int, got "
                       f"{sink_tokens!r}")
    if not isinstance(gates, bool):
      raise TypeError(f"DuoAttention: gates must be a bool, got {gates!r}")
    gate_init = _gate_value("DuoAttention", "gate_init", gate_init)
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, rope_base=rope_base,
                     rope_scaling=rope_scaling, logits_soft_cap=logits_soft_cap,
                     implementation=implementation, qk_norm=qk_norm, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)
    self.head_types = check_head_types("DuoAttention", head_types, self.num_kv_heads)
    self.window, self.sink_tokens = window, int(sink_tokens)
    self.streaming_mask = sink_window(window, self.sink_tokens)
    # Data attributes (None until gates are added), so a `DuoGate` can take their place.
    self.gates, self.distillation = nnx.data(None), nnx.data(None)
    if gates:
      self.add_gates(gate_init)

  def set_head_types(self, head_types) -> None:
    """Sets the type of each KV head (a tuple of `HEAD_TYPES` entries, or None: all retrieval)."""
    self.head_types = check_head_types("DuoAttention.set_head_types", head_types,
                                       self.num_kv_heads)

  def add_gates(self, init: float = 1.0) -> None:
    """(Re)sets a `DuoGate` of ``init`` per KV head and a `DuoDistillation`, with the leading
    (``layers``) axes of the layer's parameters when it is stacked."""
    init = _gate_value("DuoAttention.add_gates", "init", init)
    lead = self.query[...].shape[:-3]
    self.gates = DuoGate(jnp.full(lead + (self.num_kv_heads,), init, jnp.float32),
                         out_sharding=("layers",) * len(lead) + ("kv_heads",),
                         eager_sharding=False)
    self.distillation = DuoDistillation(jnp.zeros(lead, jnp.float32))

  def remove_gates(self) -> None:
    """Drops the gates: the layer runs by its head types again and takes caches."""
    self.gates, self.distillation = nnx.data(None), nnx.data(None)

  def kv_heads(self, head_type: str) -> tuple[int, ...]:
    """The KV heads of ``head_type``, in order."""
    return tuple(g for g, h in enumerate(self.head_types) if h == head_type)

  def init_cache(self, batch_size: int, max_length: int, dtype=None, *,
                 policy=None) -> DuoCache:
    """A `DuoCache`: ``max_length`` dense slots for the retrieval heads, ``sink_tokens +
    window`` ring slots for the streaming heads. ``policy`` must be None (the head types are the
    policy). ``dtype`` defaults to the compute dtype."""
    if policy is not None:
      raise ValueError(f"DuoAttention.init_cache: policy must be None (the head types are the "
                       f"cache policy), got {policy!r}")
    max_length = checks.positive_int("DuoAttention.init_cache", "max_length", max_length)
    dtype = self.dtype if dtype is None else dtype
    retrieval, streaming = (len(self.kv_heads(h)) for h in HEAD_TYPES)
    return DuoCache(
        retrieval=DenseKVCache.create(batch_size, max_length, retrieval, self.head_dim, dtype)
        if retrieval else None,
        streaming=RingKVCache.create(batch_size, streaming, self.head_dim, dtype,
                                     window=self.window, sink_tokens=self.sink_tokens)
        if streaming else None)

  def __call__(self, x_BTD, *, positions=None, segment_ids=None, cache: DuoCache | None = None):
    """As `Attention.__call__`: ``y`` for x [B, T, D], or ``(y, cache)`` with a `DuoCache`."""
    positions, segment_ids = self._check_call(x_BTD, positions, segment_ids, cache)
    b, t, _ = x_BTD.shape
    rope_positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    q_BTHK, k_BTGK, v_BTGK = self._project(x_BTD)
    q_BTHK, k_BTGK = (self._rope(z, rope_positions) for z in (q_BTHK, k_BTGK))
    common = dict(q_positions=positions, q_segment_ids=segment_ids,
                  logits_soft_cap=self.logits_soft_cap, implementation=self.implementation)
    if self.gates is not None:
      return self._gated(q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, common)

    group = self.num_heads // self.num_kv_heads
    outputs, query_order, caches = [], [], {}
    for head_type, mask in zip(HEAD_TYPES, (self.mask, self.streaming_mask)):
      kv_heads = self.kv_heads(head_type)
      if not kv_heads:
        caches[head_type] = None
        continue
      query_heads = [g * group + i for g in kv_heads for i in range(group)]
      query_order += query_heads
      k_BSGK, v_BSGK = (_take_heads(z, kv_heads) for z in (k_BTGK, v_BTGK))
      kv_positions, kv_segment_ids = positions, segment_ids
      if cache is not None:
        (k_BSGK, v_BSGK, kv_positions, kv_segment_ids), caches[head_type] = getattr(
            cache, head_type).append(k_BSGK, v_BSGK, positions, segment_ids)
        k_BSGK, v_BSGK = k_BSGK.astype(self.dtype), v_BSGK.astype(self.dtype)
      outputs.append(attention(_take_heads(q_BTHK, query_heads), k_BSGK, v_BSGK, mask=mask,
                               kv_positions=kv_positions, kv_segment_ids=kv_segment_ids,
                               **common))
    out_BTHK = _take_heads(jnp.concatenate(outputs, axis=2), np.argsort(query_order))
    y_BTD = self._output(out_BTHK)
    return y_BTD if cache is None else (y_BTD, DuoCache(**caches))

  def _gated(self, q_BTHK, k_BTGK, v_BTGK, positions, segment_ids, common):
    """Every head both ways, mixed by its gate; records the distillation error."""
    kv = dict(kv_positions=positions, kv_segment_ids=segment_ids, **common)
    full_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, mask=self.mask, **kv)
    streaming_BTHK = attention(q_BTHK, k_BTGK, v_BTGK, mask=self.streaming_mask, **kv)
    alpha_H = jnp.repeat(jnp.clip(self.gates[...], 0.0, 1.0),
                         self.num_heads // self.num_kv_heads)[:, None].astype(self.dtype)
    y_BTD = self._output(alpha_H * full_BTHK + (1 - alpha_H) * streaming_BTHK)
    error_BTD = (y_BTD - self._output(full_BTHK)).astype(jnp.float32)
    self.distillation[...] = jnp.mean(jnp.sum(jnp.square(error_BTD), axis=-1))
    return y_BTD

  def _check_cache(self, cache, batch_size: int):
    if self.gates is not None:
      raise ValueError("DuoAttention: cache must be None while the layer has gates (they are "
                       "for calibration); call fix_head_types or remove_gates before decoding")
    if not isinstance(cache, DuoCache):
      raise TypeError(f"DuoAttention: cache must be a DuoCache (from init_cache), got "
                      f"{type(cache).__name__}")
    for head_type, kind in zip(HEAD_TYPES, (DenseKVCache, RingKVCache)):
      part, heads = getattr(cache, head_type), len(self.kv_heads(head_type))
      expected = None if not heads else (kind.__name__, batch_size, heads, self.head_dim)
      got = None if part is None else (type(part).__name__, part.keys.shape[0],
                                       *part.keys.shape[2:])
      if got != expected:
        raise ValueError(f"DuoAttention: cache.{head_type} must be {_describe(expected)} for "
                         f"head_types={self.head_types} and x, got {_describe(got)}")
    ring = cache.streaming
    if ring is not None and (ring.window, ring.sink_tokens) != (self.window, self.sink_tokens):
      raise ValueError(f"DuoAttention: cache.streaming must have the layer's window="
                       f"{self.window} and sink_tokens={self.sink_tokens}, got window="
                       f"{ring.window} and sink_tokens={ring.sink_tokens}")


def _gate_value(owner: str, name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not 0.0 <= value <= 1.0):
    raise ValueError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")
  return float(value)


def _describe(spec) -> str:
  if spec is None:
    return "None"
  kind, batch, heads, head_dim = spec
  return f"a {kind} of (batch, kv heads, head dim) = ({batch}, {heads}, {head_dim})"


def _take_heads(z_BTHK, heads):
  """``z[:, :, heads]`` for static ``heads``: a slice when they are a run, else a gather."""
  heads = np.asarray(heads)
  first, count = int(heads[0]), heads.size
  if np.array_equal(heads, np.arange(first, first + count)):
    return z_BTHK if count == z_BTHK.shape[2] else z_BTHK[:, :, first:first + count]
  return jnp.take(z_BTHK, heads, axis=2)


def duo_layers(model: nnx.Module) -> list[DuoAttention]:
  """Every `DuoAttention` in ``model``, in graph order."""
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, DuoAttention)]


def enable_gates(model: nnx.Module, *, init: float = 1.0) -> int:
  """Gives every `DuoAttention` of ``model`` without gates a `DuoGate` of ``init`` per KV head;
  returns how many layers have gates."""
  init = _gate_value("enable_gates", "init", init)
  layers = duo_layers(model)
  if not layers:
    raise ValueError(f"enable_gates: model must contain a DuoAttention layer, got a "
                     f"{type(model).__name__} without one")
  for layer in layers:
    if layer.gates is None:
      layer.add_gates(init)
  return len(layers)


def _gated_layers(owner: str, model) -> list[DuoAttention]:
  layers = [layer for layer in duo_layers(model) if layer.gates is not None]
  if not layers:
    raise ValueError(f"{owner}: model must contain a DuoAttention layer with gates (see "
                     f"enable_gates), got a {type(model).__name__} without one")
  return layers


def distillation_loss(model: nnx.Module):
  """The sum of every gated layer's `DuoDistillation` from the last forward pass."""
  return sum(jnp.sum(layer.distillation[...]) for layer in _gated_layers("distillation_loss",
                                                                         model))


def gate_l1(model: nnx.Module):
  """``sum |alpha|`` over every gate of ``model`` (alpha clipped to [0, 1])."""
  return sum(jnp.sum(jnp.clip(layer.gates[...], 0.0, 1.0))
             for layer in _gated_layers("gate_l1", model))


def fix_head_types(model: nnx.Module, *, threshold: float | None = None,
                   retrieval_fraction: float | None = None) -> list[tuple[str, ...]]:
  """Sets the head types of every gated `DuoAttention` of ``model`` from its gates, removes the
  gates and returns the head types of each layer (graph order).

  Give exactly one of ``threshold`` (a head with ``alpha > threshold`` becomes a retrieval head)
  or ``retrieval_fraction`` (that fraction of all KV heads of all gated layers, rounded, become
  retrieval heads: those with the highest alphas, ties to the earlier head). A layer stacked
  over repeated blocks has one table for every repeat: a head's alpha is its largest over them.
  """
  given = [name for name, value in (("threshold", threshold),
                                    ("retrieval_fraction", retrieval_fraction))
           if value is not None]
  if len(given) != 1:
    raise ValueError(f"fix_head_types: give exactly one of threshold or retrieval_fraction, got "
                     f"{' and '.join(given) or 'neither'}")
  value = threshold if threshold is not None else retrieval_fraction
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not 0.0 <= value <= 1.0):
    raise ValueError(f"fix_head_types: {given[0]} must be a number in [0, 1], got {value!r}")
  layers = _gated_layers("fix_head_types", model)
  alphas = [np.clip(np.asarray(layer.gates[...], np.float64), 0.0, 1.0) for layer in layers]
  alphas = [a.reshape(-1, a.shape[-1]).max(axis=0) for a in alphas]
  if threshold is not None:
    retrieval = [a > threshold for a in alphas]
  else:
    flat = np.concatenate(alphas)
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(-flat, kind="stable")[:round(retrieval_fraction * flat.size)]] = True
    retrieval = np.split(chosen, np.cumsum([a.size for a in alphas])[:-1])
  tables = []
  for layer, is_retrieval in zip(layers, retrieval):
    layer.set_head_types(tuple(HEAD_TYPES[0] if r else HEAD_TYPES[1] for r in is_retrieval))
    layer.remove_gates()
    tables.append(layer.head_types)
  return tables
