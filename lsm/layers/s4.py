"""S4D (diagonal) and S4 (diagonal plus low rank, HiPPO-LegS) mixers.

Both follow the mixer contract of DESIGN.md::

    y = mixer(x[B,T,D], *, positions, segment_ids)
    cache = mixer.init_cache(batch_size, max_length, dtype)
    y, cache = mixer(x[B,t,D], *, positions, segment_ids, cache=cache)

Each of the H = d_model channels is its own SSM over ``state_size`` = N complex states, one of
each conjugate pair of a real system of 2N states (`lsm.kernels.scan.s4`), so the SSM output is
``2 Re(C h)``. The layer is ``y = SSM(x) + D x`` followed by GELU and a gated linear unit:
``out = (g W_v + b_v) * sigmoid(g W_g + b_g)``, ``g = gelu(y)``, with W_v, W_g [H, D].

Modes, all exact (the same outputs up to rounding):
  * convolution (no cache, no document start inside x): the length-T kernel, then `fft_conv`;
  * recurrence where a document starts inside x (``segment_ids``): one FFT convolution cannot
    restart the state, so ``lax.cond(any(reset), recurrence, convolution)`` picks per call (a
    static choice when segment_ids are host numpy). S4D runs `linear_scan` on the complex
    (Ā, B̄ u); S4 a `lax.scan` of its dense discretised step;
  * with the sequence sharded over a mesh's ``sequence`` axis, S4D always runs its recurrence
    (`lsm.parallel.scan.linear_scan` folds the states across devices); S4's convolution and
    dense recurrence are left to XLA, which gathers the sequence;
  * with a cache: one token is one recurrent step. S4D prefills by convolution, adding what the
    carried state contributes (``2 Re(C Ā^{t+1} h0)``) and computing the final state in closed
    form (`diagonal_final_state`); S4 prefills with its recurrence, which gives both at once.
The cache is the state alone (`S4Cache`, size independent of ``max_length``), so the first token
of a call always continues it: begin a new document with a fresh cache.

Δ is bounded: ``Δ = dt_min (dt_max / dt_min)^sigmoid(dt_logit)`` (log-uniform at init). The SSM
parameters (A or Λ, P, B, C as real and imaginary parts, dt_logit, D) are float32 and the SSM
runs in float32 / complex64 (float64 / complex128 for a float64 layer); ``param_dtype`` is the
output projections'. Logical axes: ``mlp`` for the H channels, ``state`` for N, ``embed`` for D.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax

from lsm.kernels.scan import s4 as ops
from lsm.kernels.scan.common import resets_from_segments
from lsm.kernels.scan.s4_init import dplr_legs, s4d_init
from lsm.layers import checks
from lsm.layers.params import logical_param
from lsm.parallel import scan as pscan

# The complex states rule out the Pallas linear scans (real inputs only).
S4D_IMPLEMENTATIONS = ("reference", "xla_chunked", "xla_associative")


@struct.dataclass
class S4Cache:
  """The state an S4 / S4D layer carries between calls: [B, H, N] complex64 (complex128 for a
  float64 layer)."""

  state: jax.Array


def _constant(value):
  """An initializer returning ``value`` broadcast over the leading (channel) dimensions."""
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(value, dtype), shape)
  return init


def _dt_logit_init(key, shape, dtype):
  # sigmoid(logit(v)) = v uniform in (0, 1): log Δ uniform in [log dt_min, log dt_max].
  v = jax.random.uniform(key, shape, jnp.float32, 1e-3, 1 - 1e-3)
  return jnp.log(v / (1 - v)).astype(dtype)


def _complex_param(owner: nnx.Module, name: str, shape, values_N=None, key=None):
  """Two float32 [H, N] parameters, ``name_real`` and ``name_imag``: ``values_N`` for every
  channel, or (with ``key``, no values) a complex normal of unit variance."""
  if values_N is None:
    keys = jax.random.split(key)
    inits = (nnx.initializers.normal(math.sqrt(0.5)),) * 2
  else:
    keys = (None, None)
    inits = (_constant(values_N.real), _constant(values_N.imag))
  for part, init, part_key in zip(("real", "imag"), inits, keys):
    setattr(owner, f"{name}_{part}", logical_param(init, part_key, shape, ("mlp", "state"),
                                                   jnp.float32))


class _S4Mixer(nnx.Module):
  """What S4D and S4 share: checks, Δ, D, the output gate and the cache. A subclass defines
  ``_ssm(u [B, T, H], reset, h0) -> (SSM output [B, T, H] without D, last state or None)``."""

  def _setup(self, d_model, state_size, discretization, discretizations, dt_min, dt_max, rngs,
             dtype, param_dtype):
    owner = type(self).__name__
    self.d_model = checks.positive_int(owner, "d_model", d_model)
    self.state_size = checks.positive_int(owner, "state_size", state_size)
    if discretization not in discretizations:
      raise ValueError(f"{owner}: discretization must be one of {discretizations}, got "
                       f"{discretization!r}")
    self.discretization = discretization
    self.dt_min = checks.positive_float(owner, "dt_min", dt_min)
    self.dt_max = checks.positive_float(owner, "dt_max", dt_max)
    if self.dt_min > self.dt_max:
      raise ValueError(f"{owner}: dt_min must be <= dt_max, got dt_min={dt_min} and "
                       f"dt_max={dt_max}")
    self.dtype = checks.float_dtype(owner, "dtype", dtype)
    param_dtype = checks.float_dtype(owner, "param_dtype", param_dtype)
    h = self.d_model
    self.dt_logit = logical_param(_dt_logit_init, rngs.params(), (h,), ("mlp",), jnp.float32)
    self.d = logical_param(nnx.initializers.ones, rngs.params(), (h,), ("mlp",), jnp.float32)
    project = nnx.initializers.lecun_normal()
    for name in ("out_value", "out_gate"):
      setattr(self, name, logical_param(project, rngs.params(), (h, h), ("mlp", "embed"),
                                        param_dtype))
      setattr(self, f"{name}_bias", logical_param(nnx.initializers.zeros, rngs.params(), (h,),
                                                  ("embed",), param_dtype))

  @property
  def _real_dtype(self):
    return jnp.promote_types(self.dtype, jnp.float32)

  def _complex(self, name: str):
    rdt = self._real_dtype
    return lax.complex(getattr(self, f"{name}_real")[...].astype(rdt),
                       getattr(self, f"{name}_imag")[...].astype(rdt))

  def _dt(self):
    frac = jax.nn.sigmoid(self.dt_logit[...].astype(self._real_dtype))
    return self.dt_min * jnp.exp(frac * math.log(self.dt_max / self.dt_min))

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> S4Cache:
    """A zero state. ``max_length`` is checked and bounds nothing; ``dtype`` (default: the
    compute dtype) is a real dtype whose complex counterpart, at least complex64, holds it."""
    owner = f"{type(self).__name__}.init_cache"
    batch_size = checks.positive_int(owner, "batch_size", batch_size)
    checks.positive_int(owner, "max_length", max_length)
    real = self.dtype if dtype is None else checks.float_dtype(owner, "dtype", dtype)
    state_dtype = jnp.promote_types(jnp.promote_types(real, jnp.float32), jnp.complex64)
    return S4Cache(jnp.zeros((batch_size, self.d_model, self.state_size), state_dtype))

  def __call__(self, x_BTD, *, positions=None, segment_ids=None, cache: S4Cache | None = None):
    """x [B, T, D] -> y [B, T, D] in ``dtype`` (and the updated cache when one is given).

    positions: [B, T] or [T] integers, checked and unused (the recurrence orders tokens).
    segment_ids: [B, T] or [T] integers; a token whose id differs from the previous token's
      starts a document (the state entering it is zero). With a cache, x holds the next t >= 1
      tokens and the call returns ``(y, cache)``.
    """
    owner = type(self).__name__
    checks.float_array(owner, "x", x_BTD, rank=3, last_dim=self.d_model)
    b, t, _ = x_BTD.shape
    checks.token_array(owner, "positions", positions, b, t)
    segment_ids = checks.token_array(owner, "segment_ids", segment_ids, b, t)
    if cache is not None:
      self._check_cache(cache, b)
    if isinstance(segment_ids, np.ndarray):
      reset = np.concatenate([np.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
      reset = jnp.asarray(reset) if reset.any() else None
    else:
      reset = None if segment_ids is None else resets_from_segments(segment_ids)
    u_BTH = x_BTD.astype(self.dtype).astype(self._real_dtype)
    h0 = None if cache is None else cache.state.astype(self._state_dtype)
    y_BTH, state = self._ssm(u_BTH, reset, h0)
    y_BTH = y_BTH + self.d[...].astype(self._real_dtype) * u_BTH
    g_BTH = jax.nn.gelu(y_BTH.astype(self.dtype))
    value, gate = ((g_BTH @ getattr(self, n)[...].astype(self.dtype)
                    + getattr(self, f"{n}_bias")[...].astype(self.dtype))
                   for n in ("out_value", "out_gate"))
    out_BTD = value * jax.nn.sigmoid(gate)
    return out_BTD if cache is None else (out_BTD, S4Cache(state.astype(cache.state.dtype)))

  @property
  def _state_dtype(self):
    return jnp.promote_types(self._real_dtype, jnp.complex64)

  def _check_cache(self, cache, batch_size: int):
    owner = type(self).__name__
    if not isinstance(cache, S4Cache):
      raise TypeError(f"{owner}: cache must be an S4Cache (from init_cache), got "
                      f"{type(cache).__name__}")
    state = cache.state
    expected = (batch_size, self.d_model, self.state_size)
    if not hasattr(state, "shape") or tuple(state.shape) != expected:
      raise ValueError(f"{owner}: cache.state must have shape [batch, d_model, state_size] = "
                       f"{list(expected)}, got {getattr(state, 'shape', type(state).__name__)}")
    if not jnp.issubdtype(state.dtype, jnp.complexfloating):
      raise TypeError(f"{owner}: cache.state must be complex (complex64 or complex128), got "
                      f"{state.dtype}")


def _either(reset, recurrence, convolution):
  """Convolution unless a document starts inside the call (reset None: none does)."""
  if reset is None:
    return convolution()
  # Differentiating a cond keeps every branch's residuals (zeros for the branch not taken); with
  # the branches rematerialised those are the small inputs, not the recurrence's [B,T,H,N] states.
  return lax.cond(jnp.any(reset), jax.checkpoint(recurrence), jax.checkpoint(convolution))


class S4D(_S4Mixer):
  """S4D: diagonal A per channel, S4D-Lin init ``A_n = -1/2 + i pi n``, ``B = 1``, C complex
  normal; ``discretization`` "zoh" or "bilinear"; the kernel is a Vandermonde product.

  implementation: the `linear_scan` of the recurrence where documents start inside a call, one
  of `S4D_IMPLEMENTATIONS` (None: "xla_chunked").
  """

  def __init__(self, d_model: int, *, state_size: int = 64, discretization: str = "zoh",
               dt_min: float = 1e-3, dt_max: float = 0.1, implementation: str | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self._setup(d_model, state_size, discretization, ops.DISCRETIZATIONS, dt_min, dt_max, rngs,
                dtype, param_dtype)
    if implementation is not None and implementation not in S4D_IMPLEMENTATIONS:
      raise ValueError(f"S4D: implementation must be one of {S4D_IMPLEMENTATIONS} or None, got "
                       f"{implementation!r}")
    self.implementation = "xla_chunked" if implementation is None else implementation
    a_N = s4d_init(self.state_size, "lin")
    self.log_neg_a_real = logical_param(_constant(np.log(-a_N.real)), rngs.params(),
                                        (self.d_model, self.state_size), ("mlp", "state"),
                                        jnp.float32)
    self.a_imag = logical_param(_constant(a_N.imag), rngs.params(),
                                (self.d_model, self.state_size), ("mlp", "state"), jnp.float32)
    shape = (self.d_model, self.state_size)
    _complex_param(self, "b", shape, np.ones(self.state_size, complex))
    _complex_param(self, "c", shape, key=rngs.params())

  def _ssm(self, u_BTH, reset, h0):
    rdt = self._real_dtype
    a_HN = lax.complex(-jnp.exp(self.log_neg_a_real[...].astype(rdt)),
                       self.a_imag[...].astype(rdt))
    b_HN, c_HN, dt_H = self._complex("b"), self._complex("c"), self._dt()
    abar_HN, bbar_HN = ops.discretize_diagonal(a_HN, b_HN, dt_H, self.discretization)
    batch, t, _ = u_BTH.shape
    if h0 is not None and t == 1:
      y_BH, state = ops.diagonal_step(h0, u_BTH[:, 0], abar_HN, bbar_HN, c_HN)
      return y_BH[:, None], state

    def recurrence():
      a_BTHN = jnp.broadcast_to(abar_HN, (batch, t, *abar_HN.shape))
      h_BTHN, last = pscan.linear_scan(a_BTHN, bbar_HN * u_BTH[..., None], h0, reset=reset,
                                       implementation=self.implementation)
      return 2 * jnp.einsum("bthn,hn->bth", h_BTHN, c_HN).real, last

    def convolution():
      k_HL = ops.vandermonde_kernel(a_HN, b_HN, c_HN, dt_H, t, self.discretization)
      y_BTH = ops.fft_conv(u_BTH, k_HL)
      if h0 is None:
        return y_BTH, None
      y_BTH = y_BTH + ops.diagonal_state_response(h0, abar_HN, c_HN, t)
      return y_BTH, ops.diagonal_final_state(u_BTH, abar_HN, bbar_HN, h0)

    if h0 is None and pscan.sequence_shards() > 1:
      # Sequence-sharded: the scan folds states across devices, where one FFT would gather.
      return recurrence()[0], None
    if h0 is None:
      return _either(reset, lambda: recurrence()[0], lambda: convolution()[0]), None
    return _either(reset, recurrence, convolution)


class S4(_S4Mixer):
  """S4: ``A = diag(Λ) - P P^*`` per channel from HiPPO-LegS of size 2N (`dplr_legs`), B from
  HiPPO, C complex normal; bilinear discretisation (the Cauchy kernel needs the resolvent of a
  bilinear Ā, so "bilinear" is the one choice). The kernel comes from `s4_kernel`; the recurrence
  uses the dense discretised Ā [H, N, N] (`discretize_dplr`).
  """

  def __init__(self, d_model: int, *, state_size: int = 64, discretization: str = "bilinear",
               dt_min: float = 1e-3, dt_max: float = 0.1, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self._setup(d_model, state_size, discretization, ("bilinear",), dt_min, dt_max, rngs, dtype,
                param_dtype)
    lambda_N, p_N, b_N = dplr_legs(self.state_size)
    self.log_neg_lambda_real = logical_param(_constant(np.log(-lambda_N.real)), rngs.params(),
                                             (self.d_model, self.state_size), ("mlp", "state"),
                                             jnp.float32)
    self.lambda_imag = logical_param(_constant(lambda_N.imag), rngs.params(),
                                     (self.d_model, self.state_size), ("mlp", "state"),
                                     jnp.float32)
    shape = (self.d_model, self.state_size)
    _complex_param(self, "p", shape, p_N)
    _complex_param(self, "b", shape, b_N)
    _complex_param(self, "c", shape, key=rngs.params())

  def _ssm(self, u_BTH, reset, h0):
    rdt = self._real_dtype
    lambda_HN = lax.complex(-jnp.exp(self.log_neg_lambda_real[...].astype(rdt)),
                            self.lambda_imag[...].astype(rdt))
    p_HN, b_HN, c_HN, dt_H = self._complex("p"), self._complex("b"), self._complex("c"), self._dt()
    t = u_BTH.shape[1]

    def recurrence():
      abar_HNN, bbar_HN = ops.discretize_dplr(lambda_HN, p_HN, p_HN, b_HN, dt_H)
      if h0 is not None and t == 1:
        y_BH, state = ops.dense_step(h0, u_BTH[:, 0], abar_HNN, bbar_HN, c_HN)
        return y_BH[:, None], state
      return ops.dense_recurrence(u_BTH, abar_HNN, bbar_HN, c_HN, h0, reset=reset)

    if h0 is not None:
      return recurrence()

    def convolution():
      k_HL = ops.s4_kernel(lambda_HN, p_HN, p_HN, b_HN, c_HN, dt_H, t)
      return ops.fft_conv(u_BTH, k_HL)

    return _either(reset, lambda: recurrence()[0], convolution), None
