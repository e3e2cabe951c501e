"""What is particular to the Pallas kernels: the TPU interpreter, visit plans and grid sizes,
vmap / shard_map, dispatch, lowering for real TPUs and GPUs, and compiled runs on hardware.

The op's shared cases (every mask, GQA, odd lengths, ...) run against both kernels in
test_attention.py. In interpret mode Pallas fills outputs and scratch with NaN before the kernel
runs (checked below), so a block a kernel forgets to write fails every comparison.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import lsm.log
from lsm.kernels.attention import BlockSizes, Mask, attention, api, pallas_common, pallas_gpu
from lsm.kernels.attention import pallas_tpu
from tests.kernels.attention.helpers import (Shape, assert_close, assert_matches_reference, draw,
                                             packed_segments, run, seed_of)

KERNELS = ("pallas_tpu", "pallas_gpu")


def test_interpret_mode_poisons_unwritten_outputs():
  """The premise of the shared suite: an output block a kernel never writes reads as NaN."""

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((16, 8), jnp.float32)
  out = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 8), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
  out = np.asarray(out)
  assert np.all(out[:8] == 1.0) and np.all(np.isnan(out[8:]))


# ------------------------------------------------------------------------- TPU interpreter


def _tpu_interpreted(inputs, dtype, mask, *, tokens=None, grid_points=None, blocks=(16, 128)):
  """pallas_tpu under the TPU interpreter (NaN-filled uninitialised memory), with gradients."""
  def record(token, point, core):
    grid_points.append(tuple(int(x) for x in point))
    return token

  params = pltpu.InterpretParams(uninitialized_memory="nan",
                                 grid_point_recorder=None if grid_points is None else record)
  q, k, v, sinks, w_out, w_lse = inputs.arrays(dtype)
  b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
  q_pos, kv_pos, q_seg, kv_seg = tokens or (None,) * 4
  q_pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq)) if q_pos is None else q_pos
  kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk)) if kv_pos is None else kv_pos

  def loss(q, k, v, sinks):
    out, lse = pallas_tpu.attention_pallas_tpu(
        q, k, v, mask=mask, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg, sinks=sinks, scale=q.shape[-1] ** -0.5, logits_soft_cap=None,
        block_sizes=BlockSizes(*blocks), interpret=params)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite * w_lse), (out, lse)

  names = ("q", "k", "v") if sinks is None else ("q", "k", "v", "sinks")
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=tuple(range(len(names))),
                                              has_aux=True)(q, k, v, sinks)
  return out, lse, dict(zip(names, grads))


@pytest.mark.parametrize("case", ["causal_gqa_sinks", "window_packed"])
def test_tpu_interpreter_matches_reference(case):
  """The TPU interpreter runs the grid like the hardware (scalar prefetch, VMEM scratch, NaN in
  uninitialised memory), on lane-sized key blocks."""
  shape = Shape(b=1, tq=70, tk=300, hq=4, hkv=2 if case == "causal_gqa_sinks" else 4, d=16,
                dv=8)
  inputs = draw(seed_of("tpu interpreter", case), shape, sinks=case == "causal_gqa_sinks")
  tokens, kwargs = None, {}
  if case == "causal_gqa_sinks":
    mask = Mask(causal=True)
    q_pos = np.arange(230, 300)[None]
    tokens = (jnp.asarray(q_pos, jnp.int32), None, None, None)
    kwargs = dict(q_positions=q_pos)
  else:
    mask = Mask(causal=True, window=(40, 0), sink_tokens=2)
    seg, pos = packed_segments(np.random.default_rng(5), 1, 300, max_docs=3)
    tokens = tuple(jnp.asarray(x) for x in (pos[:, -70:], pos, seg[:, -70:], seg))
    kwargs = dict(q_positions=pos[:, -70:], kv_positions=pos, q_segment_ids=seg[:, -70:],
                  kv_segment_ids=seg)
  got = _tpu_interpreted(inputs, jnp.float32, mask, tokens=tokens)
  want = run("reference", jnp.float64, inputs, mask=mask, **kwargs)
  assert_close(got[0], want[0], jnp.float32, "out")
  assert_close(got[1], want[1], jnp.float32, "lse")
  for name in want[2]:
    assert_close(got[2][name], want[2][name], jnp.float32, f"d{name}")


# ------------------------------------------------------------------------- visits


def _plan(mask, t, bq, bk):
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
  return pallas_common.plan_visits(mask, pos, pos, None, None, bq, bk)


def _needed(mask, t, bq, bk):
  """[nq, nk] blocks with at least one allowed pair (elementwise definition)."""
  pos = np.arange(t)
  ok = np.asarray(mask.allowed(pos[:, None], pos[None, :]))
  nq, nk = -(-t // bq), -(-t // bk)
  ok = np.pad(ok, ((0, nq * bq - t), (0, nk * bk - t)))
  return ok.reshape(nq, bq, nk, bk).any(axis=(1, 3))


@pytest.mark.parametrize("name", ["window", "layout"])
def test_kernels_visit_only_visible_blocks(name):
  """Per query block the plan lists exactly the key blocks that hold a visible pair, in order,
  and the grid is only as long as the longest list: work follows the mask's density."""
  t, bq, bk = 4096, 128, 128
  if name == "window":
    mask = Mask(causal=True, window=(511, 0))
  else:
    layout = np.random.default_rng(0).random((t // 256, t // 256)) < 0.25
    mask = Mask(layout=layout, layout_block=(256, 256))
  rows, cols, mixed = _plan(mask, t, bq, bk)
  needed = _needed(mask, t, bq, bk)
  assert mixed is (False if mask.layout is not None else None)  # no block straddles cells
  nq, nk = needed.shape
  index = np.asarray(rows.index).reshape(nq, rows.visits)
  code = np.asarray(rows.code).reshape(nq, rows.visits)
  for i in range(nq):
    active = (code[i] & pallas_common.ACTIVE) != 0
    np.testing.assert_array_equal(index[i][active], np.flatnonzero(needed[i]))
  assert rows.visits == needed.sum(axis=1).max()
  assert sum(rows.counts) == needed.sum() and sum(cols.counts) == needed.sum()
  density = needed.mean()
  if name == "window":
    assert rows.visits == 512 // bk + 1  # window / block + the diagonal block, not T / block
    assert density < 0.15
  else:
    # Every needed block is a layout block: visits / all blocks is the layout's density.
    assert density == pytest.approx(layout.mean())
    assert rows.visits <= nk // 2


def test_tpu_grid_runs_only_the_visits():
  """The forward kernel's grid (recorded by the TPU interpreter) has nq x (longest list)
  points per head, not nq x nk."""
  t, window = 512, 127
  mask = Mask(causal=True, window=(window, 0))
  inputs = draw(seed_of("grid points"), Shape(b=1, tq=t, tk=t, hq=1, hkv=1, d=8, dv=8))
  points = []
  _tpu_interpreted(inputs, jnp.float32, mask, grid_points=points, blocks=(128, 128))
  nq, nk = t // 128, t // 128
  # Forward and dq each run nq * 2 points (window 127 spans 2 key blocks); dk/dv nk * 2.
  assert max(p[3] for p in points) == 1
  assert len(points) == 3 * nq * 2 < 3 * nq * nk


# ------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("implementation", KERNELS)
def test_vmap_over_batch(implementation):
  shape = Shape(b=3, tq=29, tk=29)
  q, k, v, sinks, *_ = draw(seed_of("vmap", implementation), shape, sinks=True).arrays(
      jnp.float32)
  mask = Mask(causal=True, window=(9, 0))

  def one(q, k, v):
    return attention(q, k, v, mask=mask, sinks=sinks, implementation=implementation,
                     block_sizes=BlockSizes(8, 16), return_lse=True)

  mapped_out, mapped_lse = jax.jit(jax.vmap(one))(q[:, None], k[:, None], v[:, None])
  want = run("reference", jnp.float64, draw(seed_of("vmap", implementation), shape, sinks=True),
             grads=False, mask=mask)
  assert_close(mapped_out[:, 0], want[0], jnp.float32, "out")
  assert_close(mapped_lse[:, 0], want[1], jnp.float32, "lse")


@pytest.mark.parametrize("implementation", KERNELS)
def test_inside_shard_map(implementation):
  """Called per shard of a batch- and head-sharded mesh (as context parallelism will), with
  gradients through the kernel."""
  mesh = jax.make_mesh((2, 2), ("data", "heads"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  shape = Shape(b=2, tq=24, tk=24, hq=4, hkv=2)
  inputs = draw(seed_of("shard_map", implementation), shape)
  q, k, v, _, w_out, _ = inputs.arrays(jnp.float32)
  mask = Mask(causal=True)
  spec = P("data", None, "heads", None)

  def local(q, k, v):
    return attention(q, k, v, mask=mask, implementation=implementation,
                     block_sizes=BlockSizes(8, 16))

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)

  @jax.jit
  def loss_and_grads(q, k, v):
    return jax.value_and_grad(lambda *a: jnp.sum(sharded(*a) * w_out), argnums=(0, 1, 2))(
        q, k, v)

  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in (q, k, v))
    _, grads = loss_and_grads(q, k, v)
  inputs.w_lse = np.zeros_like(inputs.w_lse)  # the loss above uses out only
  want = run("reference", jnp.float64, inputs, mask=mask)
  for name, grad in zip("qkv", grads):
    assert_close(grad, want[2][name], jnp.float32, f"d{name}")


# ------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("platform,kernel", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_none_picks_the_backends_kernel_or_says_why_not(monkeypatch, caplog, platform, kernel):
  monkeypatch.setattr(pallas_common, "platform", lambda: platform)
  monkeypatch.setattr(lsm.log, "_said", set())
  q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  tokens = (jnp.zeros((1, 256), jnp.int32),) * 2 + (None, None)
  assert api.default_implementation(q, k, Mask(causal=True), tokens)[0] == kernel
  # float64 is not compiled by the kernels: xla, with the reason.
  name, why = api.default_implementation(q.astype(jnp.float64), k.astype(jnp.float64),
                                         Mask(causal=True), tokens)
  assert name == "xla" and "float64" in why
  # A layout cell smaller than the hardware's tile: xla, naming the layout block.
  layout = Mask(layout=np.ones((64, 64), bool), layout_block=(4, 4))
  name, why = api.default_implementation(q, k, layout, tokens)
  assert name == "xla" and "layout_block" in why


def test_kernel_for_another_accelerator_is_refused(monkeypatch):
  monkeypatch.setattr(pallas_common, "platform", lambda: "gpu")
  q = jnp.zeros((1, 16, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match="implementation='pallas_tpu' runs on tpu"):
    attention(q, q, q, implementation="pallas_tpu")


@pytest.mark.parametrize("module,blocks,match", [
    (pallas_tpu, BlockSizes(16, 64), "multiples of 128"),
    (pallas_tpu, BlockSizes(8, 128), "multiples of 16"),
    (pallas_gpu, BlockSizes(48, 64), "powers of two"),
    (pallas_gpu, BlockSizes(64, 8), "powers of two"),
])
def test_compiled_kernels_name_bad_block_sizes(module, blocks, match):
  pos = jnp.zeros((1, 1024), jnp.int32)
  reason = module.unsupported_reason(Mask(), pos, pos, None, None, blocks, 1024, 1024, 1, False)
  assert reason is not None and match in reason
  # Interpret mode runs any block size.
  assert module.unsupported_reason(Mask(), pos, pos, None, None, blocks, 1024, 1024, 1,
                                   True) is None


def test_interpret_mode_is_logged_once(monkeypatch, caplog):
  monkeypatch.setattr(lsm.log, "_said", set())
  q = jnp.ones((1, 8, 2, 8), jnp.float32)
  with caplog.at_level(logging.INFO, logger="lsm"):
    for _ in range(2):
      attention(q, q, q, implementation="pallas_gpu")
  said = [r.getMessage() for r in caplog.records if "interpret mode" in r.getMessage()]
  assert len(said) == 1, said


# ------------------------------------------------------------------------- lowering


_LOWERING_CASES = {
    "causal": dict(mask=Mask(causal=True)),
    "window_sinks_cap_packed": dict(mask=Mask(causal=True, window=(300, 0), sink_tokens=4),
                                    sinks=True, cap=30.0, segments=True),
    "gqa4_dv64_chunk": dict(mask=Mask(causal=True, chunk=256), hkv=2, dv=64),
    "layout": dict(mask=Mask(layout=np.tri(8, dtype=bool), layout_block=(128, 128))),
    "float32_window": dict(mask=Mask(window=(200, 200)), dtype=jnp.float32),
}


@pytest.mark.parametrize("name", _LOWERING_CASES)
@pytest.mark.parametrize("platform,implementation,call", [
    ("tpu", "pallas_tpu", "tpu_custom_call"), ("cuda", "pallas_gpu", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_real_hardware(monkeypatch, name, platform, implementation, call):
  """Forward and backward lower through Mosaic (TPU) and Triton (GPU) from this CPU machine:
  every op in the kernel bodies has a lowering rule there, and block shapes are accepted."""
  case = _LOWERING_CASES[name]
  monkeypatch.setattr(pallas_common, "platform", lambda: "tpu" if platform == "tpu" else "gpu")
  b, t, hq, d = 1, 1024, 8, 128
  hkv, dv = case.get("hkv", 8), case.get("dv", 128)
  seg = jnp.zeros((b, t), jnp.int32) if case.get("segments") else None

  def loss(q, k, v, sinks, seg):
    out = attention(q, k, v, mask=case["mask"], sinks=sinks, q_segment_ids=seg,
                    kv_segment_ids=seg, logits_soft_cap=case.get("cap"),
                    implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))

  dtype = case.get("dtype", jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((b, t, hq, d), dtype),
          jax.ShapeDtypeStruct((b, t, hkv, d), dtype),
          jax.ShapeDtypeStruct((b, t, hkv, dv), dtype),
          jax.ShapeDtypeStruct((hq,), jnp.float32) if case.get("sinks") else None,
          None if seg is None else jax.ShapeDtypeStruct(seg.shape, seg.dtype))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  exported = jax.export.export(
      grad, platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)])(*args)
  assert exported.mlir_module().count(call) >= 3  # forward, dq, dk/dv


# ------------------------------------------------------------------------- compiled


def _compiled_cases():
  return [
      ("causal", Shape(b=2, tq=300, tk=300, hq=8, hkv=2, d=64, dv=64), Mask(causal=True), {}),
      ("window_sinks_packed", Shape(b=1, tq=517, tk=517, hq=4, hkv=4, d=128, dv=128),
       Mask(causal=True, window=(100, 0), sink_tokens=4), {"packed": True, "sinks": True}),
      ("decode_offset", Shape(b=2, tq=7, tk=333, hq=8, hkv=1, d=96, dv=64), Mask(causal=True),
       {"offset": True}),
  ]


def _assert_compiled_matches_reference(implementation):
  for name, shape, mask, opts in _compiled_cases():
    seed = seed_of("compiled", name)
    inputs = draw(seed, shape, sinks=opts.get("sinks", False))
    kwargs = dict(mask=mask, block_sizes=None)
    if opts.get("packed"):
      seg, pos = packed_segments(np.random.default_rng(seed), shape.b, shape.tq, max_docs=3)
      kwargs.update(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    if opts.get("offset"):
      kwargs.update(q_positions=np.arange(shape.tk - shape.tq, shape.tk),
                    kv_positions=np.arange(shape.tk))
    for dtype in (jnp.float32, jnp.bfloat16):
      assert_matches_reference(implementation, inputs, dtype, **kwargs)


@pytest.mark.gpu
def test_compiled_gpu_kernel_matches_reference():
  _assert_compiled_matches_reference("pallas_gpu")


@pytest.mark.tpu
def test_compiled_tpu_kernel_matches_reference():
  _assert_compiled_matches_reference("pallas_tpu")
