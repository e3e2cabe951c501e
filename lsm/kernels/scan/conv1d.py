"""Depthwise causal conv1d over packed documents, with a carried window for prefill and decoding.

``y_t = bias + sum_k weight[k] * x_{t-W+1+k}``, where a tap ``s = t-W+1+k`` counts only when no
token in ``(s, t]`` starts a new document. The W-1 tokens before x (and their reset flags) come
from a `ConvState`, so ``conv(x1 ‖ x2) == conv(x2, state=conv(x1).state)`` with the same resets.
Plain jnp: W is small, so a sum of W shifted products is as fast as XLA makes anything here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from lsm.kernels.scan.common import check_array, check_positive_int, check_reset, state_dtype


@struct.dataclass
class ConvState:
  """The W-1 tokens before the next call: inputs [B, W-1, C] and their reset flags [B, W-1]."""

  inputs: jax.Array
  resets: jax.Array


def init_conv_state(batch: int, width: int, channels: int, dtype=jnp.float32) -> ConvState:
  """An empty window (zeros, no resets): what comes before the first token."""
  batch = check_positive_int("init_conv_state", "batch", batch)
  width = check_positive_int("init_conv_state", "width", width)
  channels = check_positive_int("init_conv_state", "channels", channels)
  return ConvState(inputs=jnp.zeros((batch, width - 1, channels), dtype),
                   resets=jnp.zeros((batch, width - 1), jnp.bool_))


def _check_state(state, batch: int, width: int, channels: int):
  if not isinstance(state, ConvState):
    raise TypeError(f"causal_conv1d: state must be a ConvState (from init_conv_state) or None, "
                    f"got {type(state).__name__}")
  check_array("causal_conv1d", "state.inputs", state.inputs, shape=(batch, width - 1, channels))
  if not hasattr(state.resets, "dtype") or state.resets.dtype != jnp.bool_:
    raise TypeError(f"causal_conv1d: state.resets must be a bool array, got "
                    f"{getattr(state.resets, 'dtype', type(state.resets).__name__)}")
  if tuple(state.resets.shape) != (batch, width - 1):
    raise ValueError(f"causal_conv1d: state.resets must have shape [{batch}, {width - 1}], got "
                     f"{tuple(state.resets.shape)}")


def causal_conv1d(x, weight, bias=None, *, reset=None, state: ConvState | None = None):
  """Depthwise causal convolution of x [B, T, C] with weight [W, C] (+ bias [C]).

  reset: None or bool [B, T] (True: token t starts a document; no tap crosses it).
  state: None (zeros before token 0) or the `ConvState` returned by the previous call.
  Returns ``(y [B, T, C] in x's dtype, new_state)``; ``new_state`` holds the last W-1 tokens of
  ``state ‖ x`` (in the state's dtype, x's without one) and their reset flags. Sums in float32
  (float64 for float64 inputs).
  """
  check_array("causal_conv1d", "x", x, ndim=3)
  batch, length, channels = x.shape
  check_array("causal_conv1d", "weight", weight, ndim=2)
  if weight.shape[1] != channels or weight.shape[0] < 1:
    raise ValueError(f"causal_conv1d: weight must have shape [W, {channels}] with W >= 1 to "
                     f"match x's channels, got {tuple(weight.shape)}")
  width = weight.shape[0]
  check_array("causal_conv1d", "bias", bias, shape=(channels,), allow_none=True)
  check_reset("causal_conv1d", reset, batch, length)
  if state is None:
    state = init_conv_state(batch, width, channels, x.dtype)
  else:
    _check_state(state, batch, width, channels)

  acc = state_dtype(x, weight, bias, state.inputs)
  if reset is None:
    reset = jnp.zeros((batch, length), jnp.bool_)
  x_BSC = jnp.concatenate([state.inputs.astype(acc), x.astype(acc)], axis=1)
  reset_BS = jnp.concatenate([state.resets, reset], axis=1)
  weight = weight.astype(acc)

  # Lag j reads token t-j (index t+W-1-j of x_BSC); it is cut once any of t, t-1, .., t-j+1
  # (indices t+W-1 .. t+W-j) starts a document.
  y_BTC = x_BSC[:, width - 1:] * weight[width - 1]
  keep_BT = jnp.ones((batch, length), jnp.bool_)
  for lag in range(1, width):
    start = width - 1 - lag
    keep_BT = keep_BT & ~reset_BS[:, start + 1:start + 1 + length]
    tap_BTC = x_BSC[:, start:start + length] * weight[start]
    y_BTC = y_BTC + jnp.where(keep_BT[..., None], tap_BTC, 0)
  if bias is not None:
    y_BTC = y_BTC + bias.astype(acc)

  total = width - 1 + length
  new_state = ConvState(inputs=x_BSC[:, total - (width - 1):].astype(state.inputs.dtype),
                        resets=reset_BS[:, total - (width - 1):])
  return y_BTC.astype(x.dtype), new_state
