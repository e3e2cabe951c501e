"""S4 and S4D: discretisation, convolution kernels, FFT convolution and the recurrent step.

Every channel h of H runs its own linear system of N complex states, one of each conjugate pair
of a real system of 2N states, so an output is ``2 Re(C h)``:

    h_t = Ā h_{t-1} + B̄ u_t,   y_t = 2 Re(C · h_t)   =>   y = K * u,   K_l = 2 Re(C Ā^l B̄).

S4D has a diagonal A [H, N]; S4 has ``A = diag(Λ) - P Q^*`` (diagonal plus rank one, `s4_init`).
Everything is computed in complex64 (complex128 when an input is 64-bit). Outputs and kernels are
real; states are complex.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lsm.kernels.scan.common import (check_array, check_choice, check_positive_int, check_reset,
                                     state_dtype)

DISCRETIZATIONS = ("zoh", "bilinear")


def _dtypes(*xs):
  """(complex dtype, real dtype) of the computation: 128/64-bit when any input is 64-bit."""
  wide = jnp.dtype(state_dtype(*xs)) in (jnp.float64, jnp.complex128)
  return (jnp.complex128, jnp.float64) if wide else (jnp.complex64, jnp.float32)


def _check_ssm(op: str, arrays: dict, dt=None):
  """Each of ``arrays`` (name -> array) [H, N], and dt [H] unless None; returns (H, N)."""
  first = next(iter(arrays))
  check_array(op, first, arrays[first], ndim=2, complex_ok=True)
  h, n = arrays[first].shape
  for name, x in arrays.items():
    check_array(op, name, x, shape=(h, n), complex_ok=True)
  if dt is not None:
    check_array(op, "dt", dt, shape=(h,))
  return h, n


def discretize_diagonal(A, B, dt, method: str = "zoh"):
  """(Ā, B̄) [H, N] of the diagonal system ``h' = A h + B u`` over a step dt [H].

  ``"zoh"`` (zero-order hold): ``Ā = exp(ΔA)``, ``B̄ = (Ā - 1) / A · B``.
  ``"bilinear"``: ``Ā = (1 + ΔA/2) / (1 - ΔA/2)``, ``B̄ = ΔB / (1 - ΔA/2)``.
  """
  _check_ssm("discretize_diagonal", dict(A=A, B=B), dt)
  check_choice("discretize_diagonal", "method", method, DISCRETIZATIONS)
  cdt, _ = _dtypes(A, B, dt)
  A, B, dt = A.astype(cdt), B.astype(cdt), dt.astype(cdt)[:, None]
  if method == "zoh":
    return jnp.exp(dt * A), jnp.expm1(dt * A) / A * B
  half = dt * A / 2
  return (1 + half) / (1 - half), dt * B / (1 - half)


def _log_abar(A, dt, method: str):
  """log Ā of `discretize_diagonal`, so that ``Ā^l = exp(l log Ā)``."""
  if method == "zoh":
    return dt[:, None] * A
  half = dt[:, None] * A / 2
  return jnp.log1p(half) - jnp.log1p(-half)


def discretize_dplr(Lambda, P, Q, B, dt):
  """Bilinear (Ā [H, N, N], B̄ [H, N]) of ``A = diag(Λ) - P Q^*`` over a step dt [H].

  ``Ā = (2/Δ - A)^{-1} (2/Δ + A)``, ``B̄ = 2 (2/Δ - A)^{-1} B``, with the inverse of the
  diagonal-plus-rank-one matrix by the Woodbury identity:
  ``(2/Δ - A)^{-1} = D - (D P)(Q^* D) / (1 + Q^* D P)``, ``D = diag(1 / (2/Δ - Λ))``.
  """
  _check_ssm("discretize_dplr", dict(Lambda=Lambda, P=P, Q=Q, B=B), dt)
  cdt, _ = _dtypes(Lambda, P, Q, B, dt)
  Lambda, P, Q, B = (x.astype(cdt) for x in (Lambda, P, Q, B))
  two_over_dt = (2 / dt.astype(cdt))[:, None]
  d = 1 / (two_over_dt - Lambda)
  q_conj = Q.conj()
  denom = 1 + jnp.sum(q_conj * d * P, axis=-1)[:, None, None]
  inv_HNN = jax.vmap(jnp.diag)(d) - (d * P)[:, :, None] * (q_conj * d)[:, None, :] / denom
  forward_HNN = jax.vmap(jnp.diag)(two_over_dt + Lambda) - P[:, :, None] * q_conj[:, None, :]
  return inv_HNN @ forward_HNN, 2 * jnp.einsum("hnm,hm->hn", inv_HNN, B)


@jax.checkpoint
def _cauchy(v, z, w):
  # Checkpointed: the [..., L, N] quotients are recomputed for the gradient, never stored.
  return jnp.sum(v[..., None, :] / (z[..., :, None] - w[..., None, :]), axis=-1)


def cauchy(v, z, w):
  """``out[..., l] = sum_n v[..., n] / (z[..., l] - w[..., n])``; leading dims broadcast."""
  check_array("cauchy", "v", v, complex_ok=True)
  check_array("cauchy", "z", z, complex_ok=True)
  check_array("cauchy", "w", w, complex_ok=True)
  if min(v.ndim, z.ndim, w.ndim) < 1 or v.shape[-1] != w.shape[-1]:
    raise ValueError(f"cauchy: v and w must have the same last dimension N, got shapes "
                     f"{tuple(v.shape)} and {tuple(w.shape)}")
  try:
    jnp.broadcast_shapes(v.shape[:-1], z.shape[:-1], w.shape[:-1])
  except ValueError:
    raise ValueError(f"cauchy: the leading dimensions of v {tuple(v.shape)}, z {tuple(z.shape)} "
                     f"and w {tuple(w.shape)} must broadcast") from None
  cdt, _ = _dtypes(v, z, w)
  return _cauchy(v.astype(cdt), z.astype(cdt), w.astype(cdt))


def s4_kernel(Lambda, P, Q, B, C, dt, length: int):
  """The bilinear S4 kernel K [H, length], ``K_l = 2 Re(C Ā^l B̄)``, ``A = diag(Λ) - P Q^*``.

  The truncated generating function ``sum_{l<L} K_l z^l = C̃ (I - zĀ)^{-1} B̄`` with
  ``C̃ = C (I - Ā^L)`` is exact at the L-th roots of unity, where an inverse FFT reads K off.
  With the bilinear Ā, ``(I - zĀ)^{-1} B̄ = M^{-1} ΔB``, ``M = diag(d) + s P Q^*``,
  ``d_n = (1 - z) - (1 + z) Δ Λ_n / 2``, ``s = (1 + z) Δ / 2``; Woodbury reduces ``C̃ M^{-1} B``
  to four Cauchy sums ``k_xy = sum_n x_n y_n / d_n``. ``d_n = -(1 + a_n)(z - w_n)`` with
  ``a_n = Δ Λ_n / 2``, ``w_n = (1 - a_n) / (1 + a_n)`` (outside the unit circle when
  ``Re Λ < 0``), so nothing is singular at ``z = -1``.
  """
  h, _ = _check_ssm("s4_kernel", dict(Lambda=Lambda, P=P, Q=Q, B=B, C=C), dt)
  length = check_positive_int("s4_kernel", "length", length)
  cdt, rdt = _dtypes(Lambda, P, Q, B, C, dt)
  Lambda, P, Q, B, C = (x.astype(cdt) for x in (Lambda, P, Q, B, C))
  abar_HNN, _ = discretize_dplr(Lambda, P, Q, B, dt)
  dt = dt.astype(rdt)[:, None]
  c_tilde = C - jnp.einsum("hn,hnm->hm", C, jnp.linalg.matrix_power(abar_HNN, length))

  a = dt * Lambda / 2
  w = (1 - a) / (1 + a)
  scale = -1 / (1 + a)
  q_conj = Q.conj()
  numer_4HN = jnp.stack([c_tilde * B, c_tilde * P, q_conj * B, q_conj * P]) * scale
  z_L = jnp.exp(-2j * jnp.pi * jnp.arange(length) / length).astype(cdt)
  k00, k01, k10, k11 = _cauchy(numer_4HN, z_L, w)
  s_HL = (1 + z_L) * dt / 2
  khat_HL = dt * (k00 - s_HL * k01 * k10 / (1 + s_HL * k11))
  return 2 * jnp.fft.ifft(khat_HL, axis=-1).real


def vandermonde_kernel(A, B, C, dt, length: int, method: str = "zoh"):
  """The S4D kernel ``K [H, length]``, ``K_l = 2 Re(sum_n C_n B̄_n Ā_n^l)``, diagonal A [H, N]."""
  _check_ssm("vandermonde_kernel", dict(A=A, B=B, C=C), dt)
  length = check_positive_int("vandermonde_kernel", "length", length)
  check_choice("vandermonde_kernel", "method", method, DISCRETIZATIONS)
  cdt, rdt = _dtypes(A, B, C, dt)
  A, C, dt = A.astype(cdt), C.astype(cdt), dt.astype(rdt)
  _, bbar = discretize_diagonal(A, B, dt, method)
  powers_HNL = jnp.exp(_log_abar(A, dt, method)[..., None] * jnp.arange(length, dtype=rdt))
  return 2 * jnp.einsum("hn,hnl->hl", C * bbar, powers_HNL).real


def fft_conv(u, K):
  """Causal convolution ``y[b, t, h] = sum_{0 <= l <= t} K[h, l] u[b, t - l, h]``.

  u [B, T, H], K [H, L] (taps past T are unused; a kernel shorter than T is zero beyond L). Both
  are zero-padded to a power of two >= T + L - 1 so the FFT's circular convolution is linear.
  Returns y [B, T, H] in float32 (float64 for 64-bit inputs).
  """
  check_array("fft_conv", "u", u, ndim=3)
  _, t, h = u.shape
  check_array("fft_conv", "K", K, ndim=2)
  if K.shape[0] != h:
    raise ValueError(f"fft_conv: K must have shape [{h}, L] to match u's channels, got "
                     f"{tuple(K.shape)}")
  _, rdt = _dtypes(u, K)
  taps = min(K.shape[1], t)
  n = 1 << max(t + taps - 2, 0).bit_length()
  u_hat = jnp.fft.rfft(u.astype(rdt), n=n, axis=1)
  k_hat = jnp.fft.rfft(K[:, :taps].astype(rdt), n=n, axis=1)
  return jnp.fft.irfft(u_hat * k_hat.T, n=n, axis=1)[:, :t]


def _check_state(op: str, name: str, state, batch: int, h: int, n: int):
  check_array(op, name, state, shape=(batch, h, n), complex_ok=True)


def diagonal_step(state, u, Abar, Bbar, C):
  """One step of the diagonal system: state [B, H, N], u [B, H] -> (y [B, H], new state)."""
  h, n = _check_ssm("diagonal_step", dict(Abar=Abar, Bbar=Bbar, C=C))
  check_array("diagonal_step", "u", u, ndim=2, shape=(None, h))
  _check_state("diagonal_step", "state", state, u.shape[0], h, n)
  cdt, rdt = _dtypes(state, u, Abar, Bbar, C)
  new = Abar.astype(cdt) * state.astype(cdt) + Bbar.astype(cdt) * u.astype(rdt)[..., None]
  return 2 * jnp.einsum("bhn,hn->bh", new, C.astype(cdt)).real, new


def dense_step(state, u, Abar, Bbar, C):
  """One step with a dense Ā [H, N, N] (S4's `discretize_dplr`): state [B, H, N], u [B, H]."""
  check_array("dense_step", "Abar", Abar, ndim=3, complex_ok=True)
  h, n, _ = Abar.shape
  check_array("dense_step", "Abar", Abar, shape=(h, n, n), complex_ok=True)
  for name, x in (("Bbar", Bbar), ("C", C)):
    check_array("dense_step", name, x, shape=(h, n), complex_ok=True)
  check_array("dense_step", "u", u, ndim=2, shape=(None, h))
  _check_state("dense_step", "state", state, u.shape[0], h, n)
  cdt, rdt = _dtypes(state, u, Abar, Bbar, C)
  return _dense_step(state.astype(cdt), u.astype(rdt), Abar.astype(cdt), Bbar.astype(cdt),
                     C.astype(cdt))


def _dense_step(state_BHN, u_BH, abar_HNN, bbar_HN, c_HN):
  new = jnp.einsum("hnm,bhm->bhn", abar_HNN, state_BHN) + bbar_HN * u_BH[..., None]
  return 2 * jnp.einsum("bhn,hn->bh", new, c_HN).real, new


def dense_recurrence(u, Abar, Bbar, C, h0=None, *, reset=None):
  """`dense_step` over time (lax.scan): u [B, T, H] -> (y [B, T, H], last state [B, H, N]).

  reset: None or bool [B, T]; a True drops the state entering that step (a document starts)."""
  check_array("dense_recurrence", "u", u, ndim=3)
  b, t, h = u.shape
  check_array("dense_recurrence", "Abar", Abar, ndim=3, complex_ok=True)
  n = Abar.shape[1]
  check_array("dense_recurrence", "Abar", Abar, shape=(h, n, n), complex_ok=True)
  for name, x in (("Bbar", Bbar), ("C", C)):
    check_array("dense_recurrence", name, x, shape=(h, n), complex_ok=True)
  if h0 is not None:
    _check_state("dense_recurrence", "h0", h0, b, h, n)
  check_reset("dense_recurrence", reset, b, t)
  cdt, rdt = _dtypes(u, Abar, Bbar, C, h0)
  abar, bbar, c = Abar.astype(cdt), Bbar.astype(cdt), C.astype(cdt)
  state = jnp.zeros((b, h, n), cdt) if h0 is None else h0.astype(cdt)
  keep_TB = jnp.ones((t, b), bool) if reset is None else ~reset.T

  def step(carry, inputs):
    u_BH, keep_B = inputs
    y_BH, carry = _dense_step(jnp.where(keep_B[:, None, None], carry, 0), u_BH, abar, bbar, c)
    return carry, y_BH

  last, y_TBH = lax.scan(step, state, (jnp.swapaxes(u.astype(rdt), 0, 1), keep_TB))
  return jnp.swapaxes(y_TBH, 0, 1), last


def diagonal_state_response(h0, Abar, C, length: int):
  """What a state h0 [B, H, N] adds to the next ``length`` outputs of the diagonal system with
  no input: ``y[b, t, h] = 2 Re(sum_n C_n Ā_n^{t+1} h0_n)`` -> [B, length, H]."""
  h, n = _check_ssm("diagonal_state_response", dict(Abar=Abar, C=C))
  check_array("diagonal_state_response", "h0", h0, ndim=3, shape=(None, h, n), complex_ok=True)
  length = check_positive_int("diagonal_state_response", "length", length)
  cdt, rdt = _dtypes(h0, Abar, C)
  powers_HNT = jnp.exp(jnp.log(Abar.astype(cdt))[..., None] * jnp.arange(1, length + 1,
                                                                         dtype=rdt))
  return 2 * jnp.einsum("bhn,hn,hnt->bth", h0.astype(cdt), C.astype(cdt), powers_HNT).real


def diagonal_final_state(u, Abar, Bbar, h0=None):
  """The diagonal system's state after u [B, T, H] from h0 (None: zeros), in closed form:
  ``h_T = Ā^T h0 + sum_s Ā^{T-1-s} B̄ u_s`` (a contraction with powers of Ā) -> [B, H, N]."""
  h, n = _check_ssm("diagonal_final_state", dict(Abar=Abar, Bbar=Bbar))
  check_array("diagonal_final_state", "u", u, ndim=3, shape=(None, None, h))
  b, t, _ = u.shape
  if h0 is not None:
    _check_state("diagonal_final_state", "h0", h0, b, h, n)
  cdt, rdt = _dtypes(u, Abar, Bbar, h0)
  log_abar = jnp.log(Abar.astype(cdt))
  powers_HNT = jnp.exp(log_abar[..., None] * jnp.arange(t - 1, -1, -1, dtype=rdt))
  state = jnp.einsum("bth,hn,hnt->bhn", u.astype(rdt), Bbar.astype(cdt), powers_HNT)
  if h0 is not None:
    state = state + jnp.exp(log_abar * t) * h0.astype(cdt)
  return state
