"""Memory grows linearly with the sequence: no Tq x Tk buffer outside the reference."""

import jax
import jax.numpy as jnp
import pytest

from lsm.kernels.attention import Mask, attention


def _temp_bytes(t: int, implementation: str, grad: bool) -> int:
  """XLA's planned scratch memory for attention (and its gradient) at length ``t``."""
  q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)

  def fwd(q, k, v):
    return attention(q, k, v, mask=Mask(causal=True), implementation=implementation)

  fn = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2)) if grad else fwd
  return jax.jit(fn).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_xla_path_memory_is_linear_in_length(grad):
  short, long = _temp_bytes(2048, "xla", grad), _temp_bytes(8192, "xla", grad)
  one_score_matrix = 8192 * 8192 * 4  # a single head's float32 Tq x Tk at the long length
  assert long < one_score_matrix / 8, (long, one_score_matrix)
  # 4x the length: about 4x the memory (block-sized scratch is constant), never 16x.
  assert long <= 5 * short, (short, long)


def test_reference_does_materialise_scores():
  # The check above can see a Tq x Tk buffer: the reference path has one.
  assert _temp_bytes(2048, "reference", False) >= 4 * 2048 * 2048 * 4
