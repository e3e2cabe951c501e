"""Sequence-parallel scans on 8 emulated devices equal the single-device ops.

Each op runs under meshes with 8 and 4 (next to a data axis of 2) devices on ``sequence``, on
packed rows whose documents cross shard boundaries, with an initial state; the outputs, the final
state and the gradients of every input are compared with the plain op on the same draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan.common import resets_from_segments
from lsm.parallel import scan as pscan
from lsm.parallel.mesh import make_mesh

B, T = 2, 48
MESHES = {"seq8": {"data": 1, "fsdp": 1, "sequence": 8, "tensor": 1},
          "data2_seq4": {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}}


def packed_resets(rng, t=T):
  """Three documents per row, boundaries anywhere (also inside shards and on their edges)."""
  starts = [np.sort(rng.choice(np.arange(1, t), 2, replace=False)) for _ in range(B)]
  starts[0][0] = 6  # exactly on a shard boundary of the 8-way split
  seg = np.stack([np.searchsorted(s, np.arange(t), side="right") for s in starts])
  return resets_from_segments(jnp.asarray(seg, jnp.int32))


def assert_sharded_equals_single_device(fn, args, mesh_shape, tol):
  """fn(*args) -> tuple of arrays; values and gradients of a random projection, sharded vs not."""
  rng = np.random.default_rng(7)
  ref_out = fn(*args)
  weights = [jnp.asarray(rng.normal(size=o.shape), o.dtype) for o in ref_out]

  def loss(*args):
    return sum(jnp.sum(o * w) for o, w in zip(fn(*args), weights)).real

  grad_args = tuple(i for i, a in enumerate(args) if a is not None and a.dtype != jnp.bool_)
  ref_grads = jax.grad(loss, argnums=grad_args)(*args)
  with jax.set_mesh(make_mesh(mesh_shape)):
    out = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(loss, argnums=grad_args))(*args)
  for got, want in zip(out, ref_out):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
  for i, got, want in zip(grad_args, grads, ref_grads):
    scale = float(jnp.max(jnp.abs(want))) + 1e-30
    err = float(jnp.max(jnp.abs(got - want))) / scale
    assert err < tol, f"gradient of argument {i}: relative error {err:.2e}"


@pytest.mark.parametrize("mesh,reverse", [("seq8", False), ("data2_seq4", True)])
def test_linear_scan_sharded_equals_single_device(mesh, reverse):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(0.5, 1.0, size=(B, T, 3)))
  b = jnp.asarray(rng.normal(size=(B, T, 3)))
  h0 = jnp.asarray(rng.normal(size=(B, 3)))
  reset = packed_resets(rng)
  fn = lambda a, b, h0, reset: pscan.linear_scan(a, b, h0, reset=reset, reverse=reverse)  # noqa
  assert_sharded_equals_single_device(fn, (a, b, h0, reset), MESHES[mesh], 1e-10)


@pytest.mark.parametrize("mesh", ["data2_seq4"])
def test_selective_scan_sharded_equals_single_device(mesh):
  rng = np.random.default_rng(1)
  e, n = 4, 3
  x, dt, z = (jnp.asarray(rng.normal(size=(B, T, e))) for _ in range(3))
  A = -jnp.asarray(rng.uniform(0.5, 2.0, size=(e, n)))
  Bm, Cm = (jnp.asarray(rng.normal(size=(B, T, n))) for _ in range(2))
  D, dt_bias = jnp.asarray(rng.normal(size=(e,))), jnp.asarray(rng.normal(size=(e,)))
  h0 = jnp.asarray(rng.normal(size=(B, e, n)))
  reset = packed_resets(rng)

  def fn(x, dt, A, Bm, Cm, D, z, dt_bias, h0, reset):
    return pscan.selective_scan(x, dt, A, Bm, Cm, D, z, dt_bias, h0, reset=reset, chunk_size=4,
                                implementation="xla_chunked")

  assert_sharded_equals_single_device(fn, (x, dt, A, Bm, Cm, D, z, dt_bias, h0, reset), MESHES[mesh], 1e-9)


@pytest.mark.parametrize("mesh,groups", [("seq8", 2), ("data2_seq4", 1)])
def test_ssd_sharded_equals_single_device(mesh, groups):
  rng = np.random.default_rng(2)
  h, p, n = 4, 3, 2
  x = jnp.asarray(rng.normal(size=(B, T, h, p)))
  dt = jnp.asarray(rng.normal(size=(B, T, h)))
  A = -jnp.asarray(rng.uniform(0.5, 2.0, size=(h,)))
  Bm, Cm = (jnp.asarray(rng.normal(size=(B, T, groups, n))) for _ in range(2))
  D, dt_bias = jnp.asarray(rng.normal(size=(h,))), jnp.asarray(rng.normal(size=(h,)))
  h0 = jnp.asarray(rng.normal(size=(B, h, p, n)))
  reset = packed_resets(rng)

  def fn(x, dt, A, Bm, Cm, D, dt_bias, h0, reset):
    return pscan.ssd(x, dt, A, Bm, Cm, D, dt_bias, h0, reset=reset, chunk_size=4,
                     implementation="xla_chunked")

  assert_sharded_equals_single_device(fn, (x, dt, A, Bm, Cm, D, dt_bias, h0, reset), MESHES[mesh], 1e-9)


@pytest.mark.parametrize("mesh", MESHES)
def test_causal_conv1d_sharded_equals_single_device(mesh):
  from lsm.kernels.scan.conv1d import ConvState

  rng = np.random.default_rng(3)
  c, w = 5, 4
  x = jnp.asarray(rng.normal(size=(B, T, c)))
  weight, bias = jnp.asarray(rng.normal(size=(w, c))), jnp.asarray(rng.normal(size=(c,)))
  state = ConvState(jnp.asarray(rng.normal(size=(B, w - 1, c))),
                    jnp.asarray(rng.random((B, w - 1)) < 0.3))
  reset = packed_resets(rng)

  def fn(x, weight, bias, reset, inputs, resets):
    y, new = pscan.causal_conv1d(x, weight, bias, reset=reset, state=ConvState(inputs, resets))
    return y, new.inputs

  assert_sharded_equals_single_device(fn, (x, weight, bias, reset, state.inputs, state.resets), MESHES[mesh], 1e-12)


def test_length_not_divisible_by_the_shards_is_an_error():
  x = jnp.ones((B, 12, 3))
  with jax.set_mesh(make_mesh(MESHES["seq8"])):
    with pytest.raises(ValueError, match="linear_scan: .*multiple of 8.*T=12"):
      pscan.linear_scan(x, x)
