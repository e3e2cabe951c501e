"""Error measure and tolerances of the layer tests (CONVENTIONS.md: float32 1e-5, bf16 2e-2)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def normalised_error(x, ref) -> float:
  """``max|x - ref| / max|ref|``; every entry of x must be finite."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x)), "non-finite values"
  return float(np.max(np.abs(x - ref))) / max(float(np.max(np.abs(ref))), 1e-30)


def assert_close(x, ref, dtype=jnp.float32, what: str = "output"):
  err = normalised_error(x, ref)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert err <= tol, f"{what}: normalised error {err:.3g} > {tol:g} ({jnp.dtype(dtype).name})"


@nnx.jit
def forward(layer, x, positions, segment_ids):
  """``layer(x, positions=, segment_ids=)`` under `nnx.jit`."""
  return layer(x, positions=positions, segment_ids=segment_ids)


@nnx.jit
def cached(layer, x, positions, segment_ids, cache):
  """``layer(x, ..., cache=cache)`` under `nnx.jit`: (y, cache)."""
  return layer(x, positions=positions, segment_ids=segment_ids, cache=cache)
