"""S4 / S4D kernels against their definitions in float64 numpy: HiPPO-LegS and its DPLR form, the
Cauchy sum, the S4 and Vandermonde kernels against the unrolled discretised recurrence, the FFT
convolution against a direct sum, and the recurrent pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan import s4 as ops
from lsm.kernels.scan.s4_init import dplr_legs, hippo_legs, hippo_legs_nplr, s4d_init


# Jitted: one compilation each instead of dispatching every op eagerly.
_s4_kernel = jax.jit(ops.s4_kernel, static_argnames="length")
_vandermonde = jax.jit(ops.vandermonde_kernel, static_argnames=("length", "method"))
_fft_conv = jax.jit(ops.fft_conv)
_dense_recurrence = jax.jit(ops.dense_recurrence)


def _rel(x, ref):
  x, ref = np.asarray(x), np.asarray(ref)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x))
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _complex(rng, *shape):
  return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _dt(rng, h):
  return np.exp(rng.uniform(np.log(1e-3), np.log(0.5), h))


def _dplr(rng, h, n):
  """Random DPLR systems (Re Λ < 0, Q != P) and HiPPO-LegS ones, [H, N] each, and dt [H]."""
  lam, p, b = dplr_legs(n)
  lam_HN = np.stack([lam, -rng.uniform(0.1, 1, n) + 1j * rng.uniform(-5, 5, n)] * (h // 2))
  p_HN = np.stack([p, 0.3 * _complex(rng, n)] * (h // 2))
  q_HN = np.stack([p, 0.3 * _complex(rng, n)] * (h // 2))
  b_HN = np.stack([b, _complex(rng, n)] * (h // 2))
  return lam_HN, p_HN, q_HN, b_HN, _complex(rng, h, n), _dt(rng, h)


def _bilinear_dense(a_NN, b_N, dt):
  eye = np.eye(len(b_N))
  left = eye - dt / 2 * a_NN
  return np.linalg.solve(left, eye + dt / 2 * a_NN), np.linalg.solve(left, dt * b_N)


def _unrolled(abar_NN, bbar_N, c_N, length):
  """K_l = 2 Re(C Ā^l B̄), by repeated multiplication."""
  out, x = [], bbar_N
  for _ in range(length):
    out.append(2 * (c_N @ x).real)
    x = abar_NN @ x
  return np.array(out)


def test_hippo_legs_is_its_definition():
  a, b = hippo_legs(7)
  for i in range(7):
    assert b[i] == pytest.approx(np.sqrt(2 * i + 1))
    for k in range(7):
      want = -np.sqrt((2 * i + 1) * (2 * k + 1)) if i > k else (-(i + 1) if i == k else 0.0)
      assert a[i, k] == pytest.approx(want, abs=1e-14)


@pytest.mark.parametrize("n", [6, 9, 32])
def test_nplr_form_reconstructs_hippo(n):
  a, b = hippo_legs(n)
  lam, p, b_eig, v = hippo_legs_nplr(n)
  assert np.allclose(v.conj().T @ v, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
  scale = np.max(np.abs(a))
  assert np.max(np.abs(v @ (np.diag(lam) - np.outer(p, p.conj())) @ v.conj().T - a)) < 1e-13 * (
      scale * n)
  np.testing.assert_allclose(v @ b_eig, b, atol=1e-12 * n)


def test_dplr_legs_keeps_one_of_each_conjugate_pair():
  n = 8
  lam, p, b = dplr_legs(n)
  assert lam.shape == p.shape == b.shape == (n,)
  a, _ = hippo_legs(2 * n)
  r = np.sqrt(np.arange(2 * n) + 0.5)
  eig = np.linalg.eigvals(a + np.outer(r, r))  # the normal part, eigenvalues by another route
  upper = eig[eig.imag > 0]
  np.testing.assert_allclose(lam[np.argsort(lam.imag)], upper[np.argsort(upper.imag)], atol=1e-10)
  # P and B are the projections of the HiPPO vectors on the kept eigenvectors: |P|^2 sums to half.
  assert np.sum(np.abs(p) ** 2) == pytest.approx(np.sum(r**2) / 2, rel=1e-10)


def test_s4d_init():
  n = 5
  np.testing.assert_allclose(s4d_init(n, "lin"), -0.5 + 1j * np.pi * np.arange(n))
  inv = s4d_init(n, "inv")
  np.testing.assert_allclose(inv.real, -0.5)
  np.testing.assert_allclose(inv.imag, (10 / np.pi) * (10 / (2 * np.arange(n) + 1) - 1))


def test_cauchy_is_the_explicit_sum():
  rng = np.random.default_rng(0)
  v, w, z = _complex(rng, 3, 1, 6), _complex(rng, 3, 1, 6), _complex(rng, 2, 5)
  got = ops.cauchy(jnp.asarray(v), jnp.asarray(z), jnp.asarray(w))
  want = np.zeros((3, 2, 5), complex)
  for i in range(3):
    for j in range(2):
      for l in range(5):
        want[i, j, l] = sum(v[i, 0, n] / (z[j, l] - w[i, 0, n]) for n in range(6))
  assert _rel(got, want) < 1e-13


def test_discretize_dplr_is_the_dense_bilinear():
  rng = np.random.default_rng(1)
  lam, p, q, b, _, dt = _dplr(rng, 4, 5)
  abar, bbar = ops.discretize_dplr(*(jnp.asarray(x) for x in (lam, p, q, b, dt)))
  for h in range(4):
    want_a, want_b = _bilinear_dense(np.diag(lam[h]) - np.outer(p[h], q[h].conj()), b[h], dt[h])
    assert _rel(abar[h], want_a) < 1e-12 and _rel(bbar[h], want_b) < 1e-12


@pytest.mark.parametrize("length", [1, 16, 37])
def test_s4_kernel_is_the_unrolled_recurrence(length):
  rng = np.random.default_rng(length)
  lam, p, q, b, c, dt = _dplr(rng, 4, 6)
  want = np.stack([
      _unrolled(*_bilinear_dense(np.diag(lam[h]) - np.outer(p[h], q[h].conj()), b[h], dt[h]),
                c[h], length) for h in range(4)])
  got = _s4_kernel(*(jnp.asarray(x) for x in (lam, p, q, b, c, dt)), length=length)
  assert got.dtype == jnp.float64 and _rel(got, want) < 1e-11
  got32 = _s4_kernel(*(jnp.asarray(x, jnp.complex64) for x in (lam, p, q, b, c)),
                     jnp.asarray(dt, jnp.float32), length=length)
  assert got32.dtype == jnp.float32 and _rel(got32, want) < 1e-5


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_vandermonde_kernel_is_the_unrolled_recurrence(method):
  rng = np.random.default_rng(2)
  h, n, length = 3, 5, 29
  a = -rng.uniform(0.1, 1, (h, n)) + 1j * rng.uniform(-4, 4, (h, n))
  b, c, dt = _complex(rng, h, n), _complex(rng, h, n), _dt(rng, h)
  want = np.zeros((h, length))
  for i in range(h):
    if method == "zoh":
      abar = np.exp(dt[i] * a[i])
      bbar = (abar - 1) / a[i] * b[i]
    else:
      abar = (1 + dt[i] * a[i] / 2) / (1 - dt[i] * a[i] / 2)
      bbar = dt[i] * b[i] / (1 - dt[i] * a[i] / 2)
    want[i] = _unrolled(np.diag(abar), bbar, c[i], length)
    got_a, got_b = ops.discretize_diagonal(*(jnp.asarray(x) for x in (a, b, dt)), method)
    assert _rel(got_a[i], abar) < 1e-13 and _rel(got_b[i], bbar) < 1e-12
  got = _vandermonde(*(jnp.asarray(x) for x in (a, b, c, dt)), length=length, method=method)
  assert _rel(got, want) < 1e-11
  got32 = _vandermonde(*(jnp.asarray(x, jnp.complex64) for x in (a, b, c)),
                      jnp.asarray(dt, jnp.float32), length=length, method=method)
  assert got32.dtype == jnp.float32 and _rel(got32, want) < 1e-5


@pytest.mark.parametrize("t,taps", [(1, 1), (13, 13), (13, 5), (9, 20)])
def test_fft_conv_is_the_direct_causal_sum(t, taps):
  rng = np.random.default_rng(t * taps)
  u, k = rng.standard_normal((2, t, 3)), rng.standard_normal((3, taps))
  want = np.zeros((2, t, 3))
  for i in range(t):
    for l in range(min(i + 1, taps)):
      want[:, i] += k[:, l] * u[:, i - l]
  assert _rel(_fft_conv(jnp.asarray(u), jnp.asarray(k)), want) < 1e-13
  got32 = _fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
  assert got32.dtype == jnp.float32 and _rel(got32, want) < 1e-5


def test_dense_recurrence_is_the_kernel_and_restarts_at_resets():
  rng = np.random.default_rng(3)
  lam, p, q, b, c, dt = (jnp.asarray(x) for x in _dplr(rng, 2, 4))
  abar, bbar = ops.discretize_dplr(lam, p, q, b, dt)
  u = jnp.asarray(rng.standard_normal((2, 12, 2)))
  first, second = u[:, :6], u[:, 6:]
  y, last = _dense_recurrence(u, abar, bbar, c)
  assert _rel(y, _fft_conv(u, _s4_kernel(lam, p, q, b, c, dt, length=12))) < 1e-12
  # Chaining: the first document's state carries on into the second.
  _, mid = _dense_recurrence(first, abar, bbar, c)
  y2, last2 = _dense_recurrence(second, abar, bbar, c, mid)
  assert _rel(y2, y[:, 6:]) < 1e-12 and _rel(last2, last) < 1e-12
  # A reset at token 0 forgets h0, one at token 6 the first document.
  reset = jnp.zeros((2, 12), bool).at[:, 6].set(True).at[:, 0].set(True)
  y_reset, _ = _dense_recurrence(jnp.concatenate([second, second], 1), abar, bbar, c, mid,
                                 reset=reset)
  fresh, _ = _dense_recurrence(second, abar, bbar, c)
  assert _rel(y_reset[:, :6], fresh) < 1e-12 and _rel(y_reset[:, 6:], fresh) < 1e-12
  step_y, _ = ops.dense_step(mid, second[:, 0], abar, bbar, c)
  assert _rel(step_y, y[:, 6]) < 1e-12


def test_diagonal_state_response_and_final_state_are_the_recurrence():
  rng = np.random.default_rng(4)
  h, n, t = 3, 4, 10
  a = jnp.asarray(-rng.uniform(0.1, 1, (h, n)) + 1j * rng.uniform(-4, 4, (h, n)))
  b, c = jnp.asarray(_complex(rng, h, n)), jnp.asarray(_complex(rng, h, n))
  abar, bbar = ops.discretize_diagonal(a, b, jnp.asarray(_dt(rng, h)), "zoh")
  u, h0 = rng.standard_normal((2, t, h)), _complex(rng, 2, h, n)
  step = jax.jit(ops.diagonal_step)
  state, ys = jnp.asarray(h0), []
  for i in range(t):
    y_i, state = step(state, jnp.asarray(u[:, i]), abar, bbar, c)
    ys.append(y_i)
  # From zero, the outputs are the convolution with the kernel; h0 adds its response.
  abar_np, bbar_np, c_np = (np.asarray(x) for x in (abar, bbar, c))
  kernel = np.stack([2 * (c_np * bbar_np * abar_np**l).sum(-1).real for l in range(t)], axis=1)
  conv = np.stack([sum(kernel[:, l] * u[:, i - l] for l in range(i + 1)) for i in range(t)], 1)
  response = ops.diagonal_state_response(jnp.asarray(h0), abar, c, t)
  assert _rel(conv + response, np.stack(ys, 1)) < 1e-12
  assert _rel(ops.diagonal_final_state(jnp.asarray(u), abar, bbar, jnp.asarray(h0)), state) < 1e-12


def test_errors_name_the_argument():
  h, n = 2, 3
  hn, dt = jnp.ones((h, n), jnp.complex64), jnp.ones((h,))
  with pytest.raises(ValueError, match=r"discretize_diagonal: B must have shape \[2, 3\]"):
    ops.discretize_diagonal(hn, jnp.ones((h, n + 1)), dt)
  with pytest.raises(ValueError, match=r"discretize_diagonal: method must be one of"):
    ops.discretize_diagonal(hn, hn, dt, "euler")
  with pytest.raises(ValueError, match=r"s4_kernel: dt must have shape \[2\]"):
    ops.s4_kernel(hn, hn, hn, hn, hn, jnp.ones((3,)), 4)
  with pytest.raises(ValueError, match=r"s4_kernel: length must be a positive int, got 0"):
    ops.s4_kernel(hn, hn, hn, hn, hn, dt, 0)
  with pytest.raises(ValueError, match=r"fft_conv: K must have shape \[2, L\]"):
    ops.fft_conv(jnp.ones((1, 4, h)), jnp.ones((3, 4)))
  with pytest.raises(TypeError, match=r"fft_conv: u must have a floating dtype"):
    ops.fft_conv(jnp.ones((1, 4, h), jnp.int32), jnp.ones((h, 4)))
  with pytest.raises(ValueError, match=r"cauchy: v and w must have the same last dimension"):
    ops.cauchy(jnp.ones((n,)), jnp.ones((4,)), jnp.ones((n + 1,)))
  with pytest.raises(ValueError, match=r"dense_recurrence: h0 must have shape \[1, 2, 3\]"):
    ops.dense_recurrence(jnp.ones((1, 4, h)), jnp.ones((h, n, n)), hn, hn, jnp.ones((1, h, 2)))
  with pytest.raises(ValueError, match=r"dense_recurrence: reset must have shape \[1, 4\]"):
    ops.dense_recurrence(jnp.ones((1, 4, h)), jnp.ones((h, n, n)), hn, hn,
                         reset=jnp.zeros((1, 5), bool))
  with pytest.raises(ValueError, match=r"diagonal_step: state must have shape \[1, 2, 3\]"):
    ops.diagonal_step(jnp.ones((2, h, n)), jnp.ones((1, h)), hn, hn, hn)
  with pytest.raises(ValueError, match=r"s4d_init: kind must be one of"):
    s4d_init(4, "legs")
  with pytest.raises(ValueError, match=r"dplr_legs: state_size must be a positive int"):
    dplr_legs(0)
