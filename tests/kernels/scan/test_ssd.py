"""`ssd`: every implementation against the float64 sequential reference (forward, final state and
gradients), packing, state chaining, chunk-size independence and argument errors."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan import common
from lsm.kernels.scan.ssd import IMPLEMENTATIONS
from lsm.kernels.scan.ssd import ssd as ssd_eager
from tests.kernels.scan.helpers import assert_close

FAST = tuple(i for i in IMPLEMENTATIONS if i != "reference")
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
ARGNAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "h0")
CHUNK = 16
# Compiling dominates these tests on CPU: each case is jitted once (eager dispatch of the many
# small ops is slower) and cases share shapes where they can. No per-jit compiler options: XLA's
# LLVM options are process-wide, and changing them per compile crashed later compiles in the
# same test worker.
ssd = jax.jit(ssd_eager, static_argnames=("delta_softplus", "chunk_size", "implementation",
                                          "interpret"))


def _seed(*parts) -> int:
  return zlib.crc32(repr(parts).encode())


def _draw(seed, *, b=2, t=37, h=4, g=2, p=8, n=4, dtype=jnp.float32):
  """Inputs drawn in float64 and cast to ``dtype`` (A, dt_bias stay float32 as in the layers)."""
  rng = np.random.default_rng(seed)
  arrays = {
      "x": rng.normal(size=(b, t, h, p)), "dt": rng.normal(size=(b, t, h)) - 1.0,
      "A": -np.exp(rng.normal(size=(h,))), "B": rng.normal(size=(b, t, g, n)),
      "C": rng.normal(size=(b, t, g, n)), "D": rng.normal(size=(h,)),
      "dt_bias": 0.5 * rng.normal(size=(h,)), "h0": rng.normal(size=(b, h, p, n)),
  }
  params = {"A", "dt_bias"}
  return {k: jnp.asarray(v, jnp.float32 if k in params and dtype != jnp.float64 else dtype)
          for k, v in arrays.items()}


def _resets(b, t, positions):
  reset = np.zeros((b, t), bool)
  for row, col in positions:
    reset[row, col] = True
  return jnp.asarray(reset)


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size"))
def _outputs_and_grads(inputs, reset, implementation, chunk_size=CHUNK):
  """(y, h_last, gradients of a fixed random projection of both w.r.t. every input)."""
  x, h0 = inputs["x"], inputs["h0"]
  key_y, key_h = jax.random.split(jax.random.key(1))
  wy = jax.random.normal(key_y, x.shape, jnp.float64)
  wh = jax.random.normal(key_h, h0.shape, jnp.float64)

  def loss(args):
    y, h_last = ssd_eager(**args, reset=reset, chunk_size=chunk_size,
                          implementation=implementation)
    value = jnp.sum(y.astype(jnp.float64) * wy) + jnp.sum(h_last.astype(jnp.float64) * wh)
    return value, (y, h_last)

  (_, (y, h_last)), grads = jax.value_and_grad(loss, has_aux=True)(inputs)
  return y, h_last, grads


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype,groups", [(jnp.float32, 1), (jnp.float32, 2), (jnp.bfloat16, 2)])
def test_matches_reference(implementation, dtype, groups):
  """Forward, final state and all gradients against float64, with resets (one on a chunk
  boundary, one inside a chunk, one at t=0) and T not a multiple of the chunk size."""
  inputs = _draw(_seed("match", implementation, jnp.dtype(dtype).name, groups), g=groups,
                 dtype=dtype)
  reset = _resets(2, 37, [(0, CHUNK), (0, 21), (1, 0), (1, 33)])
  y, h_last, grads = _outputs_and_grads(inputs, reset, implementation)
  wide = {k: v.astype(jnp.float64) for k, v in inputs.items()}
  y_ref, h_ref, grads_ref = _outputs_and_grads(wide, reset, "reference")
  assert y.dtype == dtype and h_last.dtype == jnp.float32
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert_close(y, y_ref, tol, "y")
  assert_close(h_last, h_ref, tol, "h_last")
  for name in ARGNAMES:
    assert grads[name].dtype == inputs[name].dtype
    assert_close(grads[name], grads_ref[name], tol, f"d{name}")


def _pieces(inputs, cut):
  """Every input but h0, cut to the time steps ``cut`` (a slice)."""
  return {k: v[:, cut] if v.ndim >= 3 else v for k, v in inputs.items() if k != "h0"}


def _rows(*parts):
  """Batch rows from several input dicts of one row each, in order."""
  return {k: jnp.concatenate([p[k] for p in parts]) if parts[0][k].ndim >= 3 else parts[0][k]
          for k in parts[0]}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_equals_separate(implementation):
  """Two documents packed per row with a reset equal the documents run alone (the second from
  zero state) by the float64 reference; the reset is on a chunk boundary in row 0 (t=16) and
  inside a chunk in row 1 (t=24)."""
  inputs = _draw(_seed("packed", implementation), t=40)
  y, h_last = ssd(**inputs, reset=_resets(2, 40, [(0, 16), (1, 24)]), chunk_size=CHUNK,
                  implementation=implementation)
  wide = {k: v.astype(jnp.float64) for k, v in inputs.items()}
  row = [{k: v[i:i + 1] if v.ndim >= 3 else v for k, v in wide.items()} for i in range(2)]
  zero = jnp.zeros_like(wide["h0"][:1])
  # Same-length documents share a call: 16 steps (row 0 before its reset, row 1 after) and 24.
  y16, h16 = ssd(**_rows(_pieces(row[0], slice(None, 16)), _pieces(row[1], slice(24, None))),
                 h0=jnp.concatenate([row[0]["h0"], zero]), implementation="reference")
  y24, h24 = ssd(**_rows(_pieces(row[1], slice(None, 24)), _pieces(row[0], slice(16, None))),
                 h0=jnp.concatenate([row[1]["h0"], zero]), implementation="reference")
  want = jnp.stack([jnp.concatenate([y16[0], y24[1]]), jnp.concatenate([y24[0], y16[1]])])
  tol = TOLERANCE[jnp.dtype(jnp.float32)]
  assert_close(y, want, tol, "y")
  assert_close(h_last, jnp.stack([h24[1], h16[1]]), tol, "h_last")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_state_chaining(implementation):
  """scan(x1 ‖ x2) == scan(x2, h0=scan(x1).h_last), split inside a chunk."""
  inputs = _draw(_seed("chain", implementation), t=40)
  y, h_last = ssd(**inputs, reset=_resets(2, 40, []), chunk_size=CHUNK,
                  implementation=implementation)
  first, second = _pieces(inputs, slice(None, 20)), _pieces(inputs, slice(20, None))
  y1, h1 = ssd(**first, h0=inputs["h0"], chunk_size=CHUNK, implementation=implementation)
  y2, h2 = ssd(**second, h0=h1, chunk_size=CHUNK, implementation=implementation)
  assert_close(jnp.concatenate([y1, y2], axis=1), y, 1e-6, "y")
  assert_close(h2, h_last, 1e-6, "h_last")


@pytest.mark.parametrize("implementation", FAST)
def test_chunk_size_independent(implementation):
  """Chunks of 12 (T=40 not a multiple, resets elsewhere in the chunk) give what 16 gives."""
  inputs = _draw(_seed("chunks", implementation), t=40)
  reset = _resets(2, 40, [(0, 16), (1, 24)])
  y16, h16 = ssd(**inputs, reset=reset, chunk_size=CHUNK, implementation=implementation)
  y12, h12 = ssd(**inputs, reset=reset, chunk_size=12, implementation=implementation)
  assert_close(y12, y16, 1e-5, "y")
  assert_close(h12, h16, 1e-5, "h_last")


def test_reference_matches_definition():
  """The reference against a plain numpy loop of the equations, with every option on."""
  inputs = {k: np.asarray(v, np.float64) for k, v in _draw(_seed("def"), t=9).items()}
  reset = np.zeros((2, 9), bool)
  reset[0, 4] = reset[1, 0] = True
  for softplus in (True, False):
    y, h_last = ssd(**{k: jnp.asarray(v) for k, v in inputs.items()}, reset=jnp.asarray(reset),
                    delta_softplus=softplus, implementation="reference")
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    rep = x.shape[2] // B.shape[2]
    want = np.zeros(x.shape)
    for b in range(2):
      for h in range(4):
        state = inputs["h0"][b, h].copy()
        for t in range(9):
          delta = dt[b, t, h] + inputs["dt_bias"][h]
          delta = np.log1p(np.exp(delta)) if softplus else delta
          state = 0 * state if reset[b, t] else state
          state = np.exp(delta * A[h]) * state + delta * np.outer(x[b, t, h], B[b, t, h // rep])
          want[b, t, h] = state @ C[b, t, h // rep] + inputs["D"][h] * x[b, t, h]
        np.testing.assert_allclose(h_last[b, h], state, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_optional_arguments_default_to_zero():
  inputs = _draw(_seed("opt"), t=20)
  y, h_last = ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                  chunk_size=8)
  zeros = {"D": jnp.zeros(4), "dt_bias": jnp.zeros(4), "h0": jnp.zeros((2, 4, 8, 4))}
  y0, h0 = ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], **zeros,
               implementation="reference")
  assert_close(y, y0, 1e-5, "y")
  assert_close(h_last, h0, 1e-5, "h_last")


def _bad(**changes):
  inputs = _draw(0, b=1, t=5, h=4, g=2)
  inputs.update(changes)
  return inputs


@pytest.mark.parametrize("kwargs,error,match", [
    (_bad(x=jnp.zeros((1, 5, 4))), ValueError, "x must have rank 4"),
    (_bad(dt=jnp.zeros((1, 5, 3))), ValueError, r"dt must have shape \[1, 5, 4\], got"),
    (_bad(A=jnp.zeros((4, 1))), ValueError, r"A must have shape \[4\]"),
    (_bad(B=jnp.zeros((1, 5, 3, 4)), C=jnp.zeros((1, 5, 3, 4))), ValueError, "multiple of"),
    (_bad(C=jnp.zeros((1, 5, 2, 5))), ValueError, r"C must have shape \[1, 5, 2, 4\]"),
    (_bad(D=jnp.zeros((3,))), ValueError, r"D must have shape \[4\]"),
    (_bad(dt_bias=jnp.zeros((4,), jnp.int32)), TypeError, "dt_bias must have a floating"),
    (_bad(h0=jnp.zeros((1, 4, 4, 8))), ValueError, r"h0 must have shape \[1, 4, 8, 4\]"),
    (_bad(x=jnp.zeros((1, 0, 4, 8))), ValueError, "at least one time step"),
    ({**_bad(), "reset": jnp.zeros((1, 5), jnp.int32)}, TypeError, "reset must have dtype bool"),
    ({**_bad(), "reset": jnp.zeros((1, 6), bool)}, ValueError, r"reset must have shape \[1, 5\]"),
    ({**_bad(), "chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({**_bad(), "implementation": "cuda"}, ValueError, "implementation must be one of"),
    ({**_bad(), "delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
])
def test_bad_arguments_raise_before_tracing(kwargs, error, match):
  """Shapes only (ShapeDtypeStruct): the checks must fire before any array is touched."""
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) if hasattr(v, "shape") else v
              for k, v in kwargs.items()}
  with pytest.raises(error, match=match):
    ssd_eager(**abstract)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_kernels_reject_float64(implementation):
  inputs = _draw(0, b=1, t=5, dtype=jnp.float64)
  with pytest.raises(ValueError, match="cannot run this call: the kernels take bfloat16"):
    ssd_eager(**inputs, implementation=implementation)


@pytest.mark.parametrize("implementation,chunk,match", [
    ("pallas_gpu", 24, "power of two >= 16, got 24"), ("pallas_gpu", 8, "power of two"),
    ("pallas_tpu", 12, "multiple of 8, got 12")])
def test_compiled_kernels_check_chunk_size(implementation, chunk, match):
  inputs = _draw(0, b=1, t=40)
  with pytest.raises(ValueError, match=match):
    ssd_eager(**inputs, chunk_size=chunk, implementation=implementation, interpret=False)


@pytest.mark.parametrize("platform,kernel", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu"),
                                             ("cpu", None)])
def test_default_implementation(monkeypatch, platform, kernel):
  """The backend's kernel for float32 state, the chunked XLA path for float64 or on CPU."""
  monkeypatch.setattr(common, "platform", lambda: platform)
  for dtype, uses_kernel in ((jnp.float32, kernel is not None), (jnp.float64, False)):
    inputs = _draw(0, b=1, t=40, dtype=dtype)
    jaxpr = str(jax.make_jaxpr(lambda args: ssd_eager(**args))(inputs))
    assert ("lsm_ssd_chunk_outputs" in jaxpr) == uses_kernel, (platform, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("platform,implementation,call", [
    ("tpu", "pallas_tpu", "tpu_custom_call"), ("cuda", "pallas_gpu", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_real_hardware(platform, implementation, call, dtype):
  """Forward and gradient lower through Mosaic (TPU) and Triton (GPU) from this CPU machine, at
  Mamba-2 sizes with T not a multiple of the chunk and grouped heads."""
  b, t, h, g, p, n = 1, 200, 8, 2, 64, 128
  S = jax.ShapeDtypeStruct
  args = (S((b, t, h, p), dtype), S((b, t, h), jnp.float32), S((h,), jnp.float32),
          S((b, t, g, n), dtype), S((b, t, g, n), dtype), S((h,), jnp.float32),
          S((h,), jnp.float32), S((b, h, p, n), jnp.float32), S((b, t), jnp.bool_))

  def loss(x, dt, A, B, C, D, dt_bias, h0, reset):
    y, h_last = ssd_eager(x, dt, A, B, C, D, dt_bias, h0, reset=reset, chunk_size=64,
                          implementation=implementation, interpret=False)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h_last)

  grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))
  exported = jax.export.export(
      grad, platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)])(*args)
  assert exported.mlir_module().count(call) == 2  # chunk states, chunk outputs
