"""selective_scan: every implementation against the float64 reference, forward and gradients.

Inputs are drawn in float64 and cast; errors are ``max|x - ref| / max|ref|``. The Pallas kernels
run in interpret mode on CPU, on tiny grids.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan import common, selective, selective_xla
from lsm.kernels.scan.selective import IMPLEMENTATIONS, selective_scan
from tests.kernels.scan.helpers import assert_close

FAST = tuple(i for i in IMPLEMENTATIONS if i != "reference")
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
# T = 37 is not a multiple of the chunk; E = 6, N = 4.
SHAPE = dict(b=2, t=37, e=6, n=4)
CHUNK = 16
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0")


def _seed(*parts) -> int:
  return zlib.crc32(repr(parts).encode())


def _draw(seed, b, t, e, n, *, reset_rate=0.1):
  """float64 inputs (a dict by argument name) and the bool reset [B, T]."""
  rng = np.random.default_rng(seed)
  args = dict(
      x=rng.normal(size=(b, t, e)), dt=rng.normal(size=(b, t, e)) - 1.0,
      A=-np.exp(rng.normal(size=(e, n))), B=rng.normal(size=(b, t, n)),
      C=rng.normal(size=(b, t, n)), D=rng.normal(size=(e,)), z=rng.normal(size=(b, t, e)),
      dt_bias=0.5 * rng.normal(size=(e,)), h0=rng.normal(size=(b, e, n)))
  reset = rng.random((b, t)) < reset_rate
  return args, reset


def _cast(args, dtype):
  """Sequence inputs in ``dtype``; A, D, dt_bias, h0 stay float32 (as in the layers) unless the
  dtype is float64."""
  params = ("A", "D", "dt_bias", "h0")
  out = {}
  for k, v in args.items():
    if v is None:
      out[k] = None
    elif k in params and dtype != jnp.float64:
      out[k] = jnp.asarray(v, jnp.float32)
    else:
      out[k] = jnp.asarray(v, dtype)
  return out


def _run(args, implementation, reset=None, **kw):
  return selective_scan(*(args[k] for k in ARG_NAMES), reset=reset,
                        implementation=implementation, **kw)


def _forward(implementation, **kw):
  """jitted ``(args dict, reset) -> (y, h_last)``."""
  return jax.jit(lambda args, reset: _run(args, implementation, reset, **kw))


def _loss_and_grads(args, implementation, reset, weights, **kw):
  """(y, h_last) and the gradients of a random linear function of them w.r.t. every input."""
  names = [k for k in ARG_NAMES if args[k] is not None]
  w_y, w_h = weights

  def loss(*vals):
    full = dict(args, **dict(zip(names, vals)))
    y, h = _run(full, implementation, reset, **kw)
    return jnp.sum(y.astype(jnp.float64) * w_y) + jnp.sum(h.astype(jnp.float64) * w_h), (y, h)

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))
  grads, (y, h) = grad(*(args[k] for k in names))
  return y, h, dict(zip(names, grads))


def _weights(seed, b, t, e, n):
  rng = np.random.default_rng(seed + 1)
  return jnp.asarray(rng.normal(size=(b, t, e))), jnp.asarray(rng.normal(size=(b, e, n)))


# (dtype, inputs left out): every optional input and a reset, or none of them.
CASES = [(jnp.float32, ()), (jnp.bfloat16, ()),
         (jnp.float32, ("D", "z", "dt_bias", "h0", "reset"))]


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype,left_out", CASES, ids=["f32", "bf16", "f32-bare"])
def test_matches_reference(implementation, dtype, left_out):
  """y, h_last and the gradients w.r.t. every input match the float64 reference."""
  seed = _seed("matches", implementation, jnp.dtype(dtype).name, left_out)
  args, reset = _draw(seed, **SHAPE)
  for name in left_out:
    args[name] = None
  reset = None if "reset" in left_out else jnp.asarray(reset)
  weights = _weights(seed, **SHAPE)
  ref = _loss_and_grads(_cast(args, jnp.float64), "reference", reset, weights)
  got = _loss_and_grads(_cast(args, dtype), implementation, reset, weights, chunk_size=CHUNK)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  assert_close(got[0], ref[0], tol, "y")
  assert_close(got[1], ref[1], tol, "h_last")
  assert set(got[2]) == set(ref[2]) == {k for k in ARG_NAMES if args[k] is not None}
  for name in ref[2]:
    assert_close(got[2][name], ref[2][name], tol, f"d/d{name}")


@pytest.mark.parametrize("implementation", ("pallas_tpu", "pallas_gpu"))
def test_kernels_with_several_channel_blocks(implementation):
  """E = 260 spans several (padded) channel blocks of both kernels; one chunk holds all tokens."""
  seed = _seed("channel blocks", implementation)
  args, reset = _draw(seed, b=1, t=11, e=260, n=3)
  reset = jnp.asarray(reset)
  y_ref, h_ref = _forward("reference")(_cast(args, jnp.float64), reset)
  y, h = _forward(implementation, chunk_size=16)(_cast(args, jnp.float32), reset)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(h, h_ref, 1e-5, "h_last")


def test_reference_is_the_recurrence():
  """The reference against a numpy loop written from the definition."""
  args, reset = _draw(_seed("numpy"), b=1, t=9, e=3, n=2, reset_rate=0.3)
  reset[0, 4] = True
  y, h = _run(_cast(args, jnp.float64), "reference", jnp.asarray(reset))
  a = args
  delta = np.log1p(np.exp(a["dt"] + a["dt_bias"]))
  state = a["h0"][0].copy()
  for t in range(9):
    if reset[0, t]:
      state[:] = 0
    state = np.exp(delta[0, t][:, None] * a["A"]) * state + (
        delta[0, t] * a["x"][0, t])[:, None] * a["B"][0, t][None, :]
    out = state @ a["C"][0, t] + a["D"] * a["x"][0, t]
    out = out * a["z"][0, t] / (1 + np.exp(-a["z"][0, t]))
    np.testing.assert_allclose(y[0, t], out, rtol=1e-12)
  np.testing.assert_allclose(h[0], state, rtol=1e-12)


def _split(args, lo, hi):
  return {k: (v[:, lo:hi] if v is not None and v.ndim == 3 and k != "h0" else v)
          for k, v in args.items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_and_chained(implementation):
  """A reset makes a packed row scan like its documents run alone, and scan(x1 ‖ x2) equals
  scan(x2, h0=scan(x1).h_last) (resets inside both parts). Every call has the same structure
  (h0 and reset given), so the jitted op compiles once per length."""
  args, reset = _draw(_seed("packed", implementation), **SHAPE)
  args = _cast(args, jnp.float32)
  run = _forward(implementation, chunk_size=CHUNK)
  cut, zeros = 20, jnp.zeros_like(args["h0"])
  no_reset = jnp.zeros((2, 37), jnp.bool_)

  packed = no_reset.at[:, cut].set(True)
  y, h = run(dict(args, h0=zeros), packed)
  y1, _ = run(dict(_split(args, 0, cut), h0=zeros), no_reset[:, :cut])
  y2, h2 = run(dict(_split(args, cut, None), h0=zeros), no_reset[:, cut:])
  assert_close(y[:, :cut], y1, 1e-6, "first document")
  assert_close(y[:, cut:], y2, 1e-6, "second document")
  assert_close(h, h2, 1e-6, "h_last of the packed row")

  reset = jnp.asarray(reset)
  y, h = run(args, reset)
  y1, h1 = run(_split(args, 0, cut), reset[:, :cut])
  y2, h2 = run(dict(_split(args, cut, None), h0=h1), reset[:, cut:])
  assert_close(jnp.concatenate([y1, y2], axis=1), y, 1e-6, "chained y")
  assert_close(h2, h, 1e-6, "chained h_last")


def test_causal():
  """The gradient of y_t w.r.t. inputs after t is exactly zero."""
  args, _ = _draw(_seed("causal"), **SHAPE)
  args = _cast(args, jnp.float32)
  t = 17

  def y_t(x, dt, B, C, z):
    y, _ = _run(dict(args, x=x, dt=dt, B=B, C=C, z=z), "xla_chunked", chunk_size=CHUNK)
    return jnp.sum(y[:, t])

  grads = jax.jit(jax.grad(y_t, argnums=range(5)))(*(args[k] for k in ("x", "dt", "B", "C", "z")))
  for g in grads:
    assert np.all(np.asarray(g[:, t + 1:]) == 0)
    assert np.any(np.asarray(g[:, t]) != 0)


# --------------------------------------------------------------------------------- errors


def _good():
  args, _ = _draw(0, b=2, t=5, e=3, n=2)
  return _cast(args, jnp.float32)


@pytest.mark.parametrize("change,kind,message", [
    (dict(dt=np.zeros((2, 5, 4), np.float32)), ValueError, r"dt must have shape \[2, 5, 3\]"),
    (dict(A=np.zeros((4, 2), np.float32)), ValueError, r"A must have shape \[3, N\]"),
    (dict(A=np.zeros((3,), np.float32)), ValueError, "A must have rank 2"),
    (dict(x=np.zeros((2, 5), np.float32)), ValueError, "x must have rank 3"),
    (dict(B=np.zeros((2, 5, 3), np.float32)), ValueError, r"B must have shape \[2, 5, 2\]"),
    (dict(C=np.zeros((2, 4, 2), np.float32)), ValueError, r"C must have shape \[2, 5, 2\]"),
    (dict(D=np.zeros((2,), np.float32)), ValueError, r"D must have shape \[3\]"),
    (dict(z=np.zeros((2, 5, 2), np.float32)), ValueError, r"z must have shape \[2, 5, 3\]"),
    (dict(dt_bias=np.zeros((3, 1), np.float32)), ValueError, r"dt_bias must have shape \[3\]"),
    (dict(h0=np.zeros((2, 3, 3), np.float32)), ValueError, r"h0 must have shape \[2, 3, 2\]"),
    (dict(x=np.zeros((2, 5, 3), np.int32)), TypeError, "x must have a floating dtype"),
    (dict(B=[[0.0]]), TypeError, "B must be an array"),
    (dict(reset=np.zeros((2, 5), np.int32)), TypeError, "reset must have dtype bool"),
    (dict(reset=np.zeros((2, 4), bool)), ValueError, r"reset must have shape \[2, 5\]"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of"),
])
def test_bad_arguments(change, kind, message):
  """Every argument is checked before anything is traced, with a message naming it."""
  args = dict(_good())
  kw = {k: change.pop(k) for k in ("reset", "chunk_size", "implementation") if k in change}
  args.update(change)
  with pytest.raises(kind, match=message):
    _run(args, kw.pop("implementation", None), kw.pop("reset", None), **kw)


def test_kernel_specific_errors():
  args = _good()
  with pytest.raises(ValueError, match="pallas_tpu' needs chunk_size a multiple of 8"):
    _run(args, "pallas_tpu", chunk_size=12)
  narrow = dict(args, x=args["x"].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="pallas_tpu' needs chunk_size a multiple of 16"):
    _run(narrow, "pallas_tpu", chunk_size=8)
  wide = _cast(_draw(0, b=2, t=5, e=3, n=2)[0], jnp.float64)
  for implementation in ("pallas_tpu", "pallas_gpu"):
    with pytest.raises(TypeError, match="carry the state in float32; got inputs that need float64"):
      _run(wide, implementation, interpret=False)
  with pytest.raises(ValueError, match="interpret must be None, True or False"):
    _run(args, "pallas_gpu", interpret="yes")


def test_default_on_cpu_is_xla_chunked(monkeypatch):
  calls = []

  def chunked(*args, **kw):
    calls.append(kw)
    return selective_xla.selective_scan_chunked(*args, **kw)

  monkeypatch.setattr(selective, "selective_scan_chunked", chunked)
  _run(_good(), None, chunk_size=3)
  assert [kw["chunk_size"] for kw in calls] == [3]


# ------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("platform,call", [("tpu", "tpu_custom_call"),
                                           ("cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_lower_for_real_hardware(monkeypatch, platform, call, dtype):
  """With the backend's default implementation (the Pallas kernel) and interpret=False, the
  forward and backward pass lower through Mosaic (TPU) / Triton (GPU) from this CPU machine."""
  monkeypatch.setattr(common, "platform", lambda: "tpu" if platform == "tpu" else "gpu")
  b, t, e, n = 2, 200, 256, 16
  f32 = jnp.float32
  shapes = dict(x=((b, t, e), dtype), dt=((b, t, e), dtype), A=((e, n), f32),
                B=((b, t, n), dtype), C=((b, t, n), dtype), D=((e,), f32), z=((b, t, e), dtype),
                dt_bias=((e,), f32), h0=((b, e, n), f32))
  specs = [jax.ShapeDtypeStruct(*shapes[k]) for k in ARG_NAMES]

  def loss(*args):
    *args, reset = args
    y, h = selective_scan(*args, reset=reset, interpret=False)
    return jnp.sum(y.astype(f32)) + jnp.sum(h)

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(specs)))))
  exported = jax.export.export(
      grad, platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)])(
          *specs, jax.ShapeDtypeStruct((b, t), jnp.bool_))
  assert exported.mlir_module().count(call) == 1  # the forward kernel; the backward is XLA


# --------------------------------------------------------------------------------- memory


def _temp_bytes(implementation, b, t, e, n, chunk_size):
  f32 = jnp.float32
  shapes = dict(x=(b, t, e), dt=(b, t, e), A=(e, n), B=(b, t, n), C=(b, t, n), D=(e,),
                z=(b, t, e), dt_bias=(e,), h0=(b, e, n))
  specs = [jax.ShapeDtypeStruct(shapes[k], f32) for k in ARG_NAMES]

  def loss(*args):
    y, h = selective_scan(*args, chunk_size=chunk_size, implementation=implementation)
    return jnp.sum(y) + jnp.sum(h)

  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(specs)))))
  return grad.lower(*specs).compile().memory_analysis().temp_size_in_bytes


def test_chunked_backward_does_not_store_every_state():
  """fwd+bwd of xla_chunked at T=4096, E=N=16, chunks of 32: temporaries under a fifth of the
  [B, T, E, N] float32 states, and doubling T adds at most two copies of the chunk-boundary
  states [B, T/32, E, N]: the rest is per-chunk work, independent of T."""
  b, t, e, n, chunk = 2, 4096, 16, 16, 32
  states = b * t * e * n * 4
  temp = _temp_bytes("xla_chunked", b, t, e, n, chunk)
  assert temp < states / 5, (temp, states)
  temp_2t = _temp_bytes("xla_chunked", b, 2 * t, e, n, chunk)
  assert temp_2t - temp <= 2 * states // chunk, (temp, temp_2t, states // chunk)


def test_kernel_backward_keeps_only_chunk_states():
  """fwd+bwd of a Pallas kernel (the backward is shared by both): doubling T from 1024 adds less
  than half of the new tokens' [B, T, E, N] float32 states, so no per-token state is kept (what
  grows is the interpreter's copies of the [B, T, E] and [B, T, N] arrays)."""
  b, t, e, n, chunk = 2, 1024, 16, 64, 32
  added_states = b * t * e * n * 4
  temp = _temp_bytes("pallas_gpu", b, t, e, n, chunk)
  temp_2t = _temp_bytes("pallas_gpu", b, 2 * t, e, n, chunk)
  assert temp_2t - temp < added_states / 2, (temp, temp_2t, added_states)
