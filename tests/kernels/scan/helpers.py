"""Comparisons shared by the scan-op tests."""

import numpy as np


def normalised_error(x, ref) -> float:
  """max |x - ref| / max |ref|, after checking shapes match and x is finite."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x))
  return float(np.max(np.abs(x - ref))) / max(float(np.max(np.abs(ref))), 1e-30)


def assert_close(x, ref, tol, what):
  err = normalised_error(x, ref)
  assert err <= tol, f"{what}: normalised error {err:.3g} > {tol:g}"
