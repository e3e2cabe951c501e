"""Initial state matrices of S4 and S4D, built once in float64 numpy.

HiPPO-LegS is normal plus rank one: ``A = S - p p^T`` with ``S = -I/2 + (skew-symmetric)``. In
the unitary eigenbasis V of S this is ``V^* A V = diag(Λ) - P P^*`` (``P = V^* p``), the
diagonal-plus-low-rank (DPLR) form S4 computes with. The eigenvalues of a real matrix come in
conjugate pairs, so S4 keeps one of each pair: N complex states stand for a real system of 2N,
whose output is ``2 Re(C h)`` (the partner's contribution is the conjugate).
"""

from __future__ import annotations

import numpy as np

from lsm.kernels.scan.common import check_choice, check_positive_int

S4D_INITS = ("lin", "inv")


def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
  """HiPPO-LegS ``(A [n, n], B [n])``: ``A[i, k] = -sqrt(2i+1) sqrt(2k+1)`` below the diagonal,
  ``-(i+1)`` on it, 0 above; ``B[i] = sqrt(2i+1)``."""
  n = check_positive_int("hippo_legs", "n", n)
  r = np.sqrt(2.0 * np.arange(n) + 1.0)
  a = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(1.0, n + 1.0))
  return a, r


def hippo_legs_nplr(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The normal-plus-low-rank form of `hippo_legs` in its eigenbasis, all n states kept.

  Returns ``(Lambda [n], P [n], B [n], V [n, n])``, complex128, with V unitary and
  ``A = V (diag(Lambda) - P P^*) V^*``, ``B_hippo = V B``; ``Re(Lambda) = -1/2``. Eigenvalues
  are sorted by imaginary part.
  """
  a, b = hippo_legs(n)
  p = np.sqrt(np.arange(n) + 0.5)
  skew = a + np.outer(p, p) + 0.5 * np.eye(n)
  # -i * skew is Hermitian, so eigh gives a unitary V and skew = V diag(i omega) V^*.
  omega, v = np.linalg.eigh(-1j * skew)
  v_h = v.conj().T
  return -0.5 + 1j * omega, v_h @ p, v_h @ b, v


def dplr_legs(state_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """S4's initial ``(Lambda, P, B)``, each [state_size] complex128: the DPLR form of HiPPO-LegS
  of size ``2 * state_size``, keeping the eigenvalues with positive imaginary part."""
  n = check_positive_int("dplr_legs", "state_size", state_size)
  lam, p, b, _ = hippo_legs_nplr(2 * n)
  keep = lam.imag > 0
  if keep.sum() != n:
    raise ValueError(f"dplr_legs: HiPPO-LegS of size {2 * n} has {int(keep.sum())} eigenvalues "
                     f"in the upper half plane, expected {n} conjugate pairs")
  return lam[keep], p[keep], b[keep]


def s4d_init(state_size: int, kind: str = "lin") -> np.ndarray:
  """S4D's diagonal A [state_size] complex128, real part -1/2 (one of each conjugate pair).

  ``"lin"``: ``A_n = -1/2 + i pi n`` (S4D-Lin). ``"inv"``: ``A_n = -1/2 + i (M/pi)(M/(2n+1) - 1)``
  with ``M = 2 * state_size`` the real state size (S4D-Inv, close to the spectrum of LegS).
  """
  n = check_positive_int("s4d_init", "state_size", state_size)
  check_choice("s4d_init", "kind", kind, S4D_INITS)
  idx = np.arange(n, dtype=np.float64)
  if kind == "lin":
    return -0.5 + 1j * np.pi * idx
  m = 2.0 * n
  return -0.5 + 1j * (m / np.pi) * (m / (2 * idx + 1) - 1)
