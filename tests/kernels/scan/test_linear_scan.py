"""linear_scan: every implementation against the float64 reference (values and gradients), the
reference against a plain loop, packing, state chaining, a == 0, errors, and kernel lowering."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan import common, linear
from lsm.kernels.scan.linear import IMPLEMENTATIONS, linear_scan

B, T, C = 2, 37, (3, 5)  # T is no multiple of the chunks and blocks below
CHUNK = 8
XLA = ("xla_chunked", "xla_associative")
KERNELS = ("pallas_tpu", "pallas_gpu")
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.complex64: 1e-5}


def _inputs(seed, dtype, *, shape=(B, T, *C), resets=True):
  """a (some exact zeros, |a| <= 1), b, h0 of ``dtype`` and a random reset mask."""
  rng = np.random.default_rng(seed)
  batch, length, *channels = shape
  a = rng.uniform(-1.0, 1.0, shape)
  b = rng.standard_normal(shape)
  h0 = rng.standard_normal((batch, *channels))
  if jnp.issubdtype(dtype, jnp.complexfloating):
    a = a * np.exp(1j * rng.uniform(0, 2 * np.pi, shape))
    b = b + 1j * rng.standard_normal(shape)
    h0 = h0 + 1j * rng.standard_normal(h0.shape)
  a[rng.uniform(size=shape) < 0.05] = 0
  reset = rng.uniform(size=(batch, length)) < 0.1 if resets else np.zeros((batch, length), bool)
  return tuple(jnp.asarray(x, dtype) for x in (a, b, h0)) + (jnp.asarray(reset),)


def _weights(seed, h_shape, last_shape, dtype):
  rng = np.random.default_rng(seed + 1)
  w = [rng.standard_normal(s) for s in (h_shape, last_shape)]
  if jnp.issubdtype(dtype, jnp.complexfloating):
    w = [x + 1j * rng.standard_normal(x.shape) for x in w]
  return [jnp.asarray(x) for x in w]


@functools.cache
def _value_and_grads(implementation, reverse):
  """Jitted ((da, db, dh0), (h, h_last)) of a linear functional (weights w_h, w_last) of the
  outputs."""

  def loss(a, b, h0, reset, w_h, w_last):
    h, h_last = linear_scan(a, b, h0, reset=reset, reverse=reverse,
                            implementation=implementation, chunk_size=CHUNK)
    value = jnp.sum(w_h * h.astype(w_h.dtype)) + jnp.sum(w_last * h_last.astype(w_last.dtype))
    return jnp.real(value), (h, h_last)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


_run = jax.jit(linear_scan, static_argnames=("reverse", "implementation", "chunk_size"))
_reference = functools.partial(_run, implementation="reference")


def _assert_close(got, want, tol, what):
  got, want = np.asarray(got.astype(want.dtype)), np.asarray(want)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _assert_matches_reference(implementation, dtype, reverse, seed):
  a, b, h0, reset = _inputs(seed, dtype)
  wide = jnp.complex128 if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.float64
  w_h, w_last = _weights(seed, a.shape, h0.shape, wide)
  grads, (h, h_last) = _value_and_grads(implementation, reverse)(a, b, h0, reset, w_h, w_last)
  wide_args = tuple(x.astype(wide) for x in (a, b, h0))
  want_grads, (want_h, want_last) = _value_and_grads("reference", reverse)(
      *wide_args, reset, w_h, w_last)
  assert h.dtype == a.dtype and h_last.dtype == common.state_dtype(a)
  tol = TOL[dtype]
  _assert_close(h, want_h, tol, "h")
  _assert_close(h_last, want_last, tol, "h_last")
  for name, got, want, x in zip(("da", "db", "dh0"), grads, want_grads, (a, b, h0)):
    assert got.dtype == x.dtype, name
    _assert_close(got, want, tol, name)


F32, BF16, C64 = jnp.float32, jnp.bfloat16, jnp.complex64
# (implementation, dtype, reverse): every dtype and direction for the CPU default, a sample of
# them for the others (which share the checks and casts).
REFERENCE_CASES = (
    [("reference", F32, False), ("reference", BF16, True), ("reference", C64, True)]
    + [("xla_chunked", d, r) for d in (F32, C64) for r in (False, True)]
    + [("xla_chunked", BF16, False), ("xla_associative", F32, False),
       ("xla_associative", C64, True)]
    + [(k, d, r) for k in KERNELS for d, r in ((F32, False), (F32, True), (BF16, False))])


@pytest.mark.parametrize("implementation,dtype,reverse", REFERENCE_CASES,
                         ids=[f"{i}-{jnp.dtype(d).name}-{'rev' if r else 'fwd'}"
                              for i, d, r in REFERENCE_CASES])
def test_matches_float64_reference(implementation, dtype, reverse):
  """Values and gradients w.r.t. a, b, h0 with resets and zeros in a; the kernels run in
  interpret mode with grids of several sequence blocks / chunks."""
  seed = zlib.crc32(f"{implementation} {jnp.dtype(dtype).name} {reverse}".encode())
  _assert_matches_reference(implementation, dtype, reverse, seed)


@pytest.mark.parametrize("implementation", KERNELS)
def test_kernels_span_channel_blocks(implementation):
  """Enough channels for several channel blocks of either kernel, forward only."""
  a, b, h0, reset = _inputs(5, jnp.float32, shape=(1, 20, 1100))
  h, h_last = _run(a, b, h0, reset=reset, implementation=implementation, chunk_size=CHUNK)
  want_h, want_last = _reference(*(x.astype(jnp.float64) for x in (a, b, h0)), reset=reset)
  _assert_close(h, want_h, TOL[jnp.float32], "h")
  _assert_close(h_last, want_last, TOL[jnp.float32], "h_last")


def _loop(a, b, h0, reset, reverse):
  """The recurrence written out in numpy."""
  a, b, h = np.asarray(a), np.asarray(b), np.array(h0)
  out = np.zeros_like(b)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  for t in steps:
    keep = ~np.asarray(reset)[:, t].reshape(-1, *(1,) * (a.ndim - 2))
    h = a[:, t] * (h * keep) + b[:, t]
    out[:, t] = h
  return out, h


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_is_the_recurrence(reverse):
  a, b, h0, reset = _inputs(3, jnp.complex128)
  h, h_last = linear_scan(a, b, h0, reset=reset, reverse=reverse, implementation="reference")
  want_h, want_last = _loop(a, b, h0, reset, reverse)
  np.testing.assert_allclose(h, want_h, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(h_last, want_last, rtol=1e-12, atol=1e-12)


def _assert_same(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ("reference",) + XLA)
def test_packed_equals_separate(implementation):
  """[doc1 ‖ doc2] with a reset at doc2's first token: doc1 as alone (from h0), doc2 as alone
  from zero whatever h0 is. Reversed, a reset drops the state coming from t + 1, so it marks
  doc1's last token: doc2 runs from h0 and doc1 from zero. Documents alone run on the
  reference (itself checked against the loop above)."""
  a, b, h0, _ = _inputs(11, jnp.float64)
  split = 16
  run = functools.partial(_run, implementation=implementation, chunk_size=CHUNK)
  reset = jnp.zeros((B, T), bool).at[:, split].set(True)
  h, h_last = run(a, b, h0, reset=reset)
  h1, _ = _reference(a[:, :split], b[:, :split], h0)
  h2, h2_last = _reference(a[:, split:], b[:, split:])
  _assert_same(h, jnp.concatenate([h1, h2], axis=1))
  _assert_same(h_last, h2_last)
  h_other, _ = run(a, b, 5 * h0 + 1, reset=reset)
  np.testing.assert_array_equal(h_other[:, split:], h[:, split:])

  reset = jnp.zeros((B, T), bool).at[:, split - 1].set(True)
  back, back_last = run(a, b, h0, reset=reset, reverse=True)
  r1, r1_last = _reference(a[:, :split], b[:, :split], reverse=True)
  r2, _ = _reference(a[:, split:], b[:, split:], h0, reverse=True)
  _assert_same(back, jnp.concatenate([r1, r2], axis=1))
  _assert_same(back_last, r1_last)
  back_other, _ = run(a, b, 5 * h0 + 1, reset=reset, reverse=True)
  np.testing.assert_array_equal(back_other[:, :split], back[:, :split])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("implementation", ("reference",) + XLA)
def test_state_chaining(implementation, reverse):
  """scan(x1 ‖ x2) == scan(x2, h0=scan(x1).h_last) (x2 first when reversed); the pieces run on
  the reference."""
  a, b, h0, reset = _inputs(13, jnp.float64)
  split = 21
  first, second = (slice(None, split), slice(split, None))
  if reverse:
    first, second = second, first
  h, h_last = _run(a, b, h0, reset=reset, reverse=reverse, implementation=implementation,
                   chunk_size=CHUNK)
  _, mid = _reference(a[:, first], b[:, first], h0, reset=reset[:, first], reverse=reverse)
  h2, h2_last = _reference(a[:, second], b[:, second], mid, reset=reset[:, second],
                           reverse=reverse)
  _assert_same(h[:, second], h2)
  _assert_same(h_last, h2_last)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_decay(implementation):
  """a == 0 everywhere: h == b exactly, and d/da_t = the previous state (finite: no logs)."""
  _, b, h0, reset = _inputs(17, jnp.float32, resets=False)
  a = jnp.zeros_like(b)
  w_h, w_last = jnp.ones(b.shape, jnp.float64), jnp.zeros(h0.shape, jnp.float64)
  (da, _, _), (h, h_last) = _value_and_grads(implementation, False)(a, b, h0, reset, w_h, w_last)
  np.testing.assert_array_equal(h, b)
  np.testing.assert_array_equal(h_last, b[:, -1])
  np.testing.assert_array_equal(da, jnp.concatenate([h0[:, None], b[:, :-1]], axis=1))


def test_float64_stays_float64_and_default_is_chunked_on_cpu():
  a, b, h0, reset = _inputs(19, jnp.float64)
  h, h_last = jax.eval_shape(functools.partial(linear_scan, reset=reset), a, b, h0)
  assert h.dtype == h_last.dtype == jnp.float64
  default = jax.make_jaxpr(functools.partial(linear_scan, reset=reset))(a, b, h0)
  chunked = jax.make_jaxpr(functools.partial(linear_scan, reset=reset,
                                             implementation="xla_chunked"))(a, b, h0)
  assert str(default) == str(chunked)


# ------------------------------------------------------------------------------- errors


@pytest.fixture
def tripwire(monkeypatch):
  def reached(*args, **kwargs):
    raise AssertionError("an implementation was reached before the argument check")

  for name in ("linear_scan_reference", "_associative", "_scan_with_vjp"):
    monkeypatch.setattr(linear, name, reached)


def _f(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


ERROR_CASES = [
    ("a_not_array", dict(a=[[1.0]]), TypeError, r"linear_scan: a must be an array"),
    ("a_int", dict(a=_f(2, 4, 3, dtype=jnp.int32)), TypeError,
     r"a must have a floating or complex dtype, got int32"),
    ("a_rank", dict(a=_f(2), b=_f(2)), ValueError, r"a must have shape \[B, T, \*C\]"),
    ("b_shape", dict(b=_f(2, 4, 4)), ValueError,
     r"b must have shape \[2, 4, 3\], got \(2, 4, 4\)"),
    ("empty", dict(a=_f(2, 0, 3), b=_f(2, 0, 3)), ValueError, r"at least one time step"),
    ("h0_shape", dict(h0=_f(2, 4)), ValueError, r"h0 must have shape \[2, 3\], got \(2, 4\)"),
    ("h0_complex", dict(h0=_f(2, 3, dtype=jnp.complex64)), TypeError, r"h0 may be complex"),
    ("reset_dtype", dict(reset=jnp.zeros((2, 4), jnp.int32)), TypeError,
     r"reset must have dtype bool"),
    ("reset_shape", dict(reset=jnp.zeros((2, 5), bool)), ValueError,
     r"reset must have shape \[2, 4\], got \(2, 5\)"),
    ("reverse", dict(reverse=1), TypeError, r"reverse must be a bool"),
    ("implementation", dict(implementation="pallas"), ValueError,
     r"implementation must be one of .*'pallas'"),
    ("chunk_size", dict(chunk_size=0), ValueError, r"chunk_size must be a positive int, got 0"),
    ("interpret", dict(interpret="yes"), TypeError, r"interpret must be None or a bool"),
    ("kernel_complex", dict(b=_f(2, 4, 3, dtype=jnp.complex64), implementation="pallas_gpu"),
     TypeError, r"'pallas_gpu' takes real .* got b of dtype complex64"),
    ("kernel_float64", dict(a=_f(2, 4, 3, dtype=jnp.float64), implementation="pallas_tpu"),
     TypeError, r"'pallas_tpu' takes real .* got a of dtype float64"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_raise_before_tracing(tripwire, case):
  _, overrides, error, pattern = case
  kwargs = dict(a=_f(2, 4, 3), b=_f(2, 4, 3)) | overrides
  with pytest.raises(error, match=pattern):
    linear_scan(**kwargs)


def test_kernel_on_the_wrong_backend(tripwire, monkeypatch):
  monkeypatch.setattr(common, "platform", lambda: "gpu")
  with pytest.raises(ValueError, match=r"'pallas_tpu' runs on tpu .* backend is 'gpu'"):
    linear_scan(_f(2, 4, 3), _f(2, 4, 3), implementation="pallas_tpu")


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("platform,implementation,call,calls", [
    ("tpu", "pallas_tpu", "tpu_custom_call", 2),
    ("cuda", "pallas_gpu", "__gpu$xla.gpu.triton", 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_real_hardware(monkeypatch, platform, implementation, call, calls,
                                         dtype):
  """Forward and backward (reverse) kernels lower through Mosaic / Triton from this CPU."""
  monkeypatch.setattr(common, "platform", lambda: "tpu" if platform == "tpu" else "gpu")

  def loss(a, b, h0, reset):
    h, h_last = linear_scan(a, b, h0, reset=reset, implementation=implementation,
                            chunk_size=256, interpret=False)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last)

  x = jax.ShapeDtypeStruct((2, 1000, 700), dtype)  # several time and channel blocks
  args = (x, x, jax.ShapeDtypeStruct((2, 700), jnp.float32), jax.ShapeDtypeStruct((2, 1000), bool))
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)])(*args)
  assert exported.mlir_module().count(call) == calls
