"""Mamba (selective scan) and Mamba-2 (SSD) mixers, and the gated RMSNorm Mamba-2 ends with.

Both follow the mixer contract of DESIGN.md::

    y = mixer(x[B,T,D], *, positions, segment_ids)
    cache = mixer.init_cache(batch_size, max_length, dtype)
    y, cache = mixer(x[B,t,D], *, positions, segment_ids, cache=cache)

The cache is the recurrence itself — the conv window and the scan state — so its size does not
depend on ``max_length``, and a prefill chunk (t > 1) and a decoding step (t = 1) run the same
code. Positions are checked and otherwise unused: the recurrence orders tokens itself.

Step sizes are ``Δ = max(softplus(dt + dt_bias), DT_FLOOR)``, computed here in float32 and handed
to the scan op with ``delta_softplus=False``: the floor keeps a channel from freezing (Δ -> 0
makes exp(ΔA) = 1 and shuts its input out), the same way whichever implementation runs the scan.
A_log, D and dt_bias are float32 whatever ``param_dtype`` is; the states are float32.

Logical axis names: ``embed`` (d_model), ``mlp`` (Mamba's inner width E), ``heads`` /
``head_dim`` (Mamba-2's E = H * P), ``kv_heads`` (Mamba-2's B/C groups, shared by heads the way
key/value heads are), ``state`` for N, ``conv`` for the conv taps and ``rank`` for Mamba's dt
rank (all three replicated).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lsm.kernels.scan.common import resets_from_segments
from lsm.kernels.scan.conv1d import ConvState, init_conv_state
from lsm.kernels.scan.selective import IMPLEMENTATIONS as SELECTIVE_IMPLEMENTATIONS
from lsm.kernels.scan.ssd import IMPLEMENTATIONS as SSD_IMPLEMENTATIONS
from lsm.layers import checks
from lsm.layers.params import logical_param
from lsm.parallel import scan as pscan

DT_FLOOR = 1e-4



def _project(key, shape, dtype):
  """Projections from the first axis to the rest: truncated normal of variance 1 / fan-in."""
  init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                           out_axis=tuple(range(1, len(shape))))
  return init(key, shape, dtype)


def _conv_init(key, shape, dtype):
  """Uniform in +-1/sqrt(W), W = shape[0]: the usual depthwise-conv init (fan-in W)."""
  limit = 1 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


@struct.dataclass
class SSMCache:
  """What a Mamba / Mamba-2 layer carries between calls.

  conv: the conv window (`ConvState`); ssm: the scan state, float32 [B, E, N] (Mamba) or
  [B, H, P, N] (Mamba-2); segment_ids: [B] int32, the segment id of each row's last token (a
  chunk whose first token has another id starts a new document).
  """

  conv: ConvState
  ssm: jax.Array
  segment_ids: jax.Array


def _dt_bias_init(dt_min: float, dt_max: float):
  """softplus(bias) log-uniform in [dt_min, dt_max] (at least DT_FLOOR): the inverse softplus of
  a sampled step, ``dt + log(1 - exp(-dt))``."""
  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))
    dt = jnp.maximum(dt, DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _delta(dt, dt_bias):
  return jnp.maximum(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias[...]), DT_FLOOR)


class _SSMMixer(nnx.Module):
  """Shared argument checks, cache and document resets of `Mamba` and `Mamba2`."""

  def _check_config(self, d_model, state_size, expand, conv_width, chunk_size, dt_min, dt_max,
                    implementation, implementations, dtype, param_dtype):
    owner = type(self).__name__
    self.d_model = checks.positive_int(owner, "d_model", d_model)
    self.state_size = checks.positive_int(owner, "state_size", state_size)
    self.expand = checks.positive_int(owner, "expand", expand)
    self.conv_width = checks.positive_int(owner, "conv_width", conv_width)
    self.chunk_size = checks.positive_int(owner, "chunk_size", chunk_size)
    self.dt_min = checks.positive_float(owner, "dt_min", dt_min)
    self.dt_max = checks.positive_float(owner, "dt_max", dt_max)
    if self.dt_min > self.dt_max:
      raise ValueError(f"{owner}: dt_min must be <= dt_max, got dt_min={dt_min} and "
                       f"dt_max={dt_max}")
    if implementation is not None and implementation not in implementations:
      raise ValueError(f"{owner}: implementation must be one of {implementations} or None, got "
                       f"{implementation!r}")
    self.implementation = implementation
    self.dtype = checks.float_dtype(owner, "dtype", dtype)
    return checks.float_dtype(owner, "param_dtype", param_dtype)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> SSMCache:
    """An empty cache (zero state, empty conv window). ``max_length`` is checked and bounds
    nothing; ``dtype`` (default: the compute dtype) is the conv window's, the state is float32."""
    owner = f"{type(self).__name__}.init_cache"
    batch_size = checks.positive_int(owner, "batch_size", batch_size)
    checks.positive_int(owner, "max_length", max_length)
    dtype = self.dtype if dtype is None else checks.float_dtype(owner, "dtype", dtype)
    return SSMCache(conv=init_conv_state(batch_size, self.conv_width, self._conv_channels, dtype),
                    ssm=jnp.zeros((batch_size, *self._state_shape), jnp.float32),
                    segment_ids=jnp.zeros((batch_size,), jnp.int32))

  def __call__(self, x_BTD, *, positions=None, segment_ids=None, cache: SSMCache | None = None):
    """x [B, T, D] -> y [B, T, D] in ``dtype`` (and the updated cache when one is given).

    positions: [B, T] or [T] integers, checked and unused. segment_ids: [B, T] or [T]
    integers; the state and conv window restart where the id changes (packed documents). With a
    cache, None means segment 0 for every token.
    cache: from `init_cache`; x then holds the next t >= 1 tokens and the call returns
      ``(y, cache)``.
    """
    x_BTD, reset_BT, last_segment_B = self._inputs(x_BTD, positions, segment_ids, cache)
    y_BTD, conv_state, ssm_state = self._mix(x_BTD, reset_BT, cache)
    if cache is None:
      return y_BTD
    return y_BTD, SSMCache(conv=conv_state, ssm=ssm_state.astype(jnp.float32),
                           segment_ids=last_segment_B)

  def _inputs(self, x_BTD, positions, segment_ids, cache):
    """Checks the call; returns (x in the compute dtype, reset [B, T] or None, last segment ids
    [B] for the next cache or None)."""
    owner = type(self).__name__
    checks.float_array(owner, "x", x_BTD, rank=3, last_dim=self.d_model)
    b, t, _ = x_BTD.shape
    checks.token_array(owner, "positions", positions, b, t)
    segment_ids = checks.token_array(owner, "segment_ids", segment_ids, b, t)
    x_BTD = x_BTD.astype(self.dtype)
    if cache is None:
      if segment_ids is None:
        return x_BTD, None, None
      return x_BTD, resets_from_segments(segment_ids), None
    self._check_cache(cache, b)
    seg_BT = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    previous_BT = jnp.concatenate([cache.segment_ids[:, None], seg_BT[:, :-1]], axis=1)
    return x_BTD, seg_BT != previous_BT, seg_BT[:, -1]

  def _check_cache(self, cache, batch_size: int):
    owner = type(self).__name__
    if not isinstance(cache, SSMCache):
      raise TypeError(f"{owner}: cache must be an SSMCache (from init_cache), got "
                      f"{type(cache).__name__}")
    w = self.conv_width - 1
    expected = (("conv.inputs", cache.conv.inputs, (batch_size, w, self._conv_channels)),
                ("conv.resets", cache.conv.resets, (batch_size, w)),
                ("ssm", cache.ssm, (batch_size, *self._state_shape)),
                ("segment_ids", cache.segment_ids, (batch_size,)))
    for name, value, shape in expected:
      if tuple(value.shape) != shape:
        raise ValueError(f"{owner}: cache.{name} must have shape {list(shape)} to match x and "
                         f"the layer (from init_cache({batch_size}, ...)), got "
                         f"{tuple(value.shape)}")


class Mamba(_SSMMixer):
  """The Mamba-1 block: a gated selective state-space scan over E = expand * d_model channels.

  ``x, z = in(x)``; ``x = silu(conv(x))``; ``dt, B, C`` from x (dt through a rank-``dt_rank``
  bottleneck); ``y = selective_scan(x, Δ, A, B, C, D, gate z)``; ``out(y)``.

  Args:
    d_model: width of x. state_size: N per channel. expand: E / d_model.
    conv_width: taps of the causal depthwise conv. dt_rank: bottleneck of dt (None:
      ceil(d_model / 16)). dt_min, dt_max: initial steps, log-uniform in between.
    chunk_size, implementation: passed to `selective_scan` (None: its default for the backend).
    dtype: compute dtype; param_dtype: projections' and conv's dtype.
  """

  def __init__(self, d_model: int, *, state_size: int = 16, expand: int = 2,
               conv_width: int = 4, dt_rank: int | None = None, dt_min: float = 1e-3,
               dt_max: float = 0.1, chunk_size: int = 64, implementation: str | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    param_dtype = self._check_config(d_model, state_size, expand, conv_width, chunk_size, dt_min,
                                     dt_max, implementation, SELECTIVE_IMPLEMENTATIONS, dtype,
                                     param_dtype)
    if dt_rank is None:
      dt_rank = math.ceil(d_model / 16)
    self.dt_rank = checks.positive_int("Mamba", "dt_rank", dt_rank)
    d, e, n, r, w = d_model, expand * d_model, state_size, self.dt_rank, conv_width
    self.inner = e
    f32 = jnp.float32
    self.in_x = logical_param(_project, rngs.params(), (d, e), ("embed", "mlp"), param_dtype)
    self.in_z = logical_param(_project, rngs.params(), (d, e), ("embed", "mlp"), param_dtype)
    self.conv_weight = logical_param(_conv_init, rngs.params(), (w, e), ("conv", "mlp"),
                                     param_dtype)
    self.conv_bias = logical_param(nnx.initializers.zeros, None, (e,), ("mlp",), param_dtype)
    self.x_dt = logical_param(_project, rngs.params(), (e, r), ("mlp", "rank"), param_dtype)
    self.x_B = logical_param(_project, rngs.params(), (e, n), ("mlp", "state"), param_dtype)
    self.x_C = logical_param(_project, rngs.params(), (e, n), ("mlp", "state"), param_dtype)
    self.dt_proj = logical_param(
        nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), rngs.params(), (r, e),
        ("rank", "mlp"), param_dtype)
    self.dt_bias = logical_param(_dt_bias_init(self.dt_min, self.dt_max), rngs.params(), (e,),
                                 ("mlp",), f32)
    # S4D-real: A_n = -(n + 1) in every channel.
    self.A_log = logical_param(
        lambda key, shape, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=dtype)),
                                                   shape),
        None, (e, n), ("mlp", "state"), f32)
    self.D = logical_param(nnx.initializers.ones, None, (e,), ("mlp",), f32)
    self.out = logical_param(_project, rngs.params(), (e, d), ("mlp", "embed"), param_dtype)

  @property
  def _conv_channels(self) -> int:
    return self.inner

  @property
  def _state_shape(self) -> tuple[int, ...]:
    return (self.inner, self.state_size)

  def _mix(self, x_BTD, reset_BT, cache):
    """(y [B, T, D], conv state, ssm state) of the checked inputs."""
    cd = self.dtype
    xs_BTE = x_BTD @ self.in_x[...].astype(cd)
    z_BTE = x_BTD @ self.in_z[...].astype(cd)
    xs_BTE, conv_state = pscan.causal_conv1d(
        xs_BTE, self.conv_weight[...].astype(cd), self.conv_bias[...].astype(cd), reset=reset_BT,
        state=None if cache is None else cache.conv)
    xs_BTE = jax.nn.silu(xs_BTE)
    dt_BTR = xs_BTE @ self.x_dt[...].astype(cd)
    B_BTN = xs_BTE @ self.x_B[...].astype(cd)
    C_BTN = xs_BTE @ self.x_C[...].astype(cd)
    delta_BTE = _delta(dt_BTR @ self.dt_proj[...].astype(cd), self.dt_bias)
    y_BTE, h_BEN = pscan.selective_scan(
        xs_BTE, delta_BTE, -jnp.exp(self.A_log[...]), B_BTN, C_BTN, D=self.D[...], z=z_BTE,
        h0=None if cache is None else cache.ssm, reset=reset_BT, delta_softplus=False,
        chunk_size=self.chunk_size, implementation=self.implementation)
    return y_BTE @ self.out[...].astype(cd), conv_state, h_BEN


class GatedRMSNorm(nnx.Module):
  """``rmsnorm(y * silu(z)) * scale`` over [..., H, P], normalised within each of ``num_groups``
  groups of H / num_groups heads (all of them with one group), so sharding the groups needs no
  reduction across devices. Computes in float32; returns y's dtype."""

  def __init__(self, num_heads: int, head_dim: int, *, num_groups: int = 1, eps: float = 1e-6,
               param_dtype=jnp.float32):
    self.num_heads = checks.positive_int("GatedRMSNorm", "num_heads", num_heads)
    self.head_dim = checks.positive_int("GatedRMSNorm", "head_dim", head_dim)
    self.num_groups = checks.positive_int("GatedRMSNorm", "num_groups", num_groups)
    if num_heads % num_groups:
      raise ValueError(f"GatedRMSNorm: num_heads must be a multiple of num_groups, got "
                       f"num_heads={num_heads} and num_groups={num_groups}")
    self.eps = checks.positive_float("GatedRMSNorm", "eps", eps)
    param_dtype = checks.float_dtype("GatedRMSNorm", "param_dtype", param_dtype)
    self.scale = logical_param(nnx.initializers.ones, None, (num_heads, head_dim),
                               ("heads", "head_dim"), param_dtype)

  def __call__(self, y, z):
    shape = (self.num_heads, self.head_dim)
    for name, value in (("y", y), ("z", z)):
      checks.float_array("GatedRMSNorm", name, value, rank=None)
      if value.ndim < 2 or tuple(value.shape[-2:]) != shape:
        raise ValueError(f"GatedRMSNorm: {name} must have shape [..., {shape[0]}, {shape[1]}], "
                         f"got {tuple(value.shape)}")
    if y.shape != z.shape:
      raise ValueError(f"GatedRMSNorm: y and z must have the same shape, got {tuple(y.shape)} "
                       f"and {tuple(z.shape)}")
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = g.reshape(*g.shape[:-2], self.num_groups, -1)
    inv_rms = jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.eps)
    normed = (grouped * inv_rms).reshape(g.shape)
    return (normed * self.scale[...].astype(jnp.float32)).astype(y.dtype)


class Mamba2(_SSMMixer):
  """The Mamba-2 block: SSD over H = expand * d_model / head_dim heads of width P = head_dim.

  ``z, x, B, C, dt = in(x)``; ``x, B, C = silu(conv(x, B, C))`` (one depthwise conv over the
  three); ``y = ssd(x, Δ, A, B, C, D)``; ``out(GatedRMSNorm(y, z))``. A is one negative scalar per
  head; heads h share B/C group ``h // (H // num_groups)``.

  Args:
    d_model: width of x. state_size: N per head. expand: E / d_model (E % head_dim == 0).
    head_dim: P. num_groups: G, B/C groups (H % G == 0). conv_width: taps of the conv.
    chunk_size, implementation: passed to `ssd`. dt_min, dt_max: initial steps, log-uniform.
    dtype: compute dtype; param_dtype: projections', conv's and norm's dtype.
  """

  def __init__(self, d_model: int, *, state_size: int = 64, expand: int = 2, head_dim: int = 64,
               num_groups: int = 1, conv_width: int = 4, chunk_size: int = 64,
               dt_min: float = 1e-3, dt_max: float = 0.1, implementation: str | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    param_dtype = self._check_config(d_model, state_size, expand, conv_width, chunk_size, dt_min,
                                     dt_max, implementation, SSD_IMPLEMENTATIONS, dtype,
                                     param_dtype)
    self.head_dim = checks.positive_int("Mamba2", "head_dim", head_dim)
    self.num_groups = checks.positive_int("Mamba2", "num_groups", num_groups)
    inner = expand * d_model
    if inner % head_dim:
      raise ValueError(f"Mamba2: expand * d_model = {inner} must be a multiple of head_dim, got "
                       f"head_dim={head_dim}")
    self.num_heads = inner // head_dim
    if self.num_heads % num_groups:
      raise ValueError(f"Mamba2: the number of heads (expand * d_model / head_dim = "
                       f"{self.num_heads}) must be a multiple of num_groups, got "
                       f"num_groups={num_groups}")
    d, h, p, g, n, w = d_model, self.num_heads, head_dim, num_groups, state_size, conv_width
    f32 = jnp.float32
    heads, groups = ("heads", "head_dim"), ("kv_heads", "state")
    self.in_z = logical_param(_project, rngs.params(), (d, h, p), ("embed", *heads),
                              param_dtype)
    self.in_x = logical_param(_project, rngs.params(), (d, h, p), ("embed", *heads),
                              param_dtype)
    self.in_B = logical_param(_project, rngs.params(), (d, g, n), ("embed", *groups),
                              param_dtype)
    self.in_C = logical_param(_project, rngs.params(), (d, g, n), ("embed", *groups),
                              param_dtype)
    self.in_dt = logical_param(_project, rngs.params(), (d, h), ("embed", "heads"),
                               param_dtype)
    self.conv_x = logical_param(_conv_init, rngs.params(), (w, h, p), ("conv", *heads),
                                param_dtype)
    self.conv_B = logical_param(_conv_init, rngs.params(), (w, g, n), ("conv", *groups),
                                param_dtype)
    self.conv_C = logical_param(_conv_init, rngs.params(), (w, g, n), ("conv", *groups),
                                param_dtype)
    self.conv_bias_x = logical_param(nnx.initializers.zeros, None, (h, p), heads, param_dtype)
    self.conv_bias_B = logical_param(nnx.initializers.zeros, None, (g, n), groups, param_dtype)
    self.conv_bias_C = logical_param(nnx.initializers.zeros, None, (g, n), groups, param_dtype)
    self.dt_bias = logical_param(_dt_bias_init(self.dt_min, self.dt_max), rngs.params(), (h,),
                                 ("heads",), f32)
    # Decay rates -A uniform in [1, 16] across heads.
    self.A_log = logical_param(
        lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0)),
        rngs.params(), (h,), ("heads",), f32)
    self.D = logical_param(nnx.initializers.ones, None, (h,), ("heads",), f32)
    self.norm = GatedRMSNorm(h, p, num_groups=g, param_dtype=param_dtype)
    self.out = logical_param(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                          out_axis=2),
        rngs.params(), (h, p, d), (*heads, "embed"), param_dtype)

  @property
  def _conv_channels(self) -> int:
    return self.num_heads * self.head_dim + 2 * self.num_groups * self.state_size

  @property
  def _state_shape(self) -> tuple[int, ...]:
    return (self.num_heads, self.head_dim, self.state_size)

  def _mix(self, x_BTD, reset_BT, cache):
    """(y [B, T, D], conv state, ssm state) of the checked inputs."""
    cd = self.dtype
    b, t, _ = x_BTD.shape
    h, p, g, n = self.num_heads, self.head_dim, self.num_groups, self.state_size
    e, gn = h * p, g * n
    z_BTHP = jnp.einsum("btd,dhp->bthp", x_BTD, self.in_z[...].astype(cd))
    parts = (jnp.einsum("btd,dhp->bthp", x_BTD, self.in_x[...].astype(cd)),
             jnp.einsum("btd,dgn->btgn", x_BTD, self.in_B[...].astype(cd)),
             jnp.einsum("btd,dgn->btgn", x_BTD, self.in_C[...].astype(cd)))
    dt_BTH = jnp.einsum("btd,dh->bth", x_BTD, self.in_dt[...].astype(cd))
    w = self.conv_width
    weight = jnp.concatenate([self.conv_x[...].reshape(w, e), self.conv_B[...].reshape(w, gn),
                              self.conv_C[...].reshape(w, gn)], axis=1).astype(cd)
    bias = jnp.concatenate([self.conv_bias_x[...].reshape(e), self.conv_bias_B[...].reshape(gn),
                            self.conv_bias_C[...].reshape(gn)]).astype(cd)
    conv_in = jnp.concatenate([part.reshape(b, t, -1) for part in parts], axis=-1)
    conv_out, conv_state = pscan.causal_conv1d(conv_in, weight, bias, reset=reset_BT,
                                               state=None if cache is None else cache.conv)
    conv_out = jax.nn.silu(conv_out)
    xs_BTHP = conv_out[..., :e].reshape(b, t, h, p)
    B_BTGN = conv_out[..., e:e + gn].reshape(b, t, g, n)
    C_BTGN = conv_out[..., e + gn:].reshape(b, t, g, n)
    y_BTHP, h_BHPN = pscan.ssd(
        xs_BTHP, _delta(dt_BTH, self.dt_bias), -jnp.exp(self.A_log[...]), B_BTGN, C_BTGN,
        D=self.D[...], h0=None if cache is None else cache.ssm, reset=reset_BT,
        delta_softplus=False, chunk_size=self.chunk_size, implementation=self.implementation)
    y_BTD = jnp.einsum("bthp,hpd->btd", self.norm(y_BTHP, z_BTHP), self.out[...].astype(cd))
    return y_BTD, conv_state, h_BHPN
