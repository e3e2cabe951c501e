"""Mamba and Mamba-2 mixers: cached decoding, packed documents, causality, dtypes, parameters and
argument errors. Nothing here depends on which scan implementation is the default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.kernels.scan.conv1d import init_conv_state
from lsm.layers.mamba import DT_FLOOR, GatedRMSNorm, Mamba, Mamba2, SSMCache
from tests.layers.helpers import assert_close

D_MODEL, T = 16, 37
LAYERS = {
    "mamba": lambda **kw: Mamba(D_MODEL, state_size=4, chunk_size=8, rngs=nnx.Rngs(0), **kw),
    "mamba2": lambda **kw: Mamba2(D_MODEL, state_size=4, head_dim=8, num_groups=2, chunk_size=8,
                                  rngs=nnx.Rngs(0), **kw),
}


@nnx.jit
def forward(layer, x, segment_ids):
  return layer(x, segment_ids=segment_ids)


@nnx.jit
def cached(layer, x, segment_ids, cache):
  return layer(x, segment_ids=segment_ids, cache=cache)


def inputs(seed=1, batch=2, length=T):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL), jnp.float32)


def two_documents(batch=2, length=T, split=15):
  return jnp.broadcast_to((jnp.arange(length) >= split).astype(jnp.int32) + 3, (batch, length))


@pytest.mark.parametrize("name", LAYERS)
def test_prefill_then_decode_equals_forward(name):
  layer = LAYERS[name]()
  x = inputs()
  # The second document starts during decoding: the cache's last segment id restarts it.
  segment_ids = two_documents(split=25)
  full = forward(layer, x, segment_ids)
  assert full.shape == (2, T, D_MODEL) and full.dtype == jnp.float32
  n = 20
  y, cache = cached(layer, x[:, :n], segment_ids[:, :n], layer.init_cache(2, 8))
  outs = [y]
  for i in range(n, T):
    y, cache = cached(layer, x[:, i:i + 1], segment_ids[:, i:i + 1], cache)
    outs.append(y)
  assert_close(jnp.concatenate(outs, axis=1), full, what="prefill + decode vs forward")
  assert cache.ssm.dtype == jnp.float32
  np.testing.assert_array_equal(cache.segment_ids, segment_ids[:, -1])


@pytest.mark.parametrize("name", LAYERS)
def test_packed_equals_separate(name):
  layer = LAYERS[name]()
  x = inputs(seed=3)
  split = 15
  packed = forward(layer, x, two_documents(split=split))
  # The first document alone is a prefix of the unpacked run (causality makes the rest moot).
  first = forward(layer, x, jnp.zeros((2, T), jnp.int32))[:, :split]
  second = forward(layer, x[:, split:], jnp.zeros((2, T - split), jnp.int32))
  assert_close(packed, jnp.concatenate([first, second], axis=1), what="packed vs separate")


@pytest.mark.parametrize("name", LAYERS)
def test_causal_and_documents_isolated(name):
  graphdef, state = nnx.split(LAYERS[name]())
  length, split = 12, 7
  x = inputs(seed=4, batch=1, length=length)
  segment_ids = two_documents(batch=1, length=length, split=split)

  # Row by row with grad: on jax 0.10.2 (CPU), freeing a jitted jacrev of Mamba2 segfaults.
  @jax.jit
  def row(state, x, t):
    def y_t(x):
      y_BT = nnx.merge(graphdef, state)(x, segment_ids=segment_ids).sum(-1)
      return jnp.sum(y_BT * jax.nn.one_hot(t, length))
    return jnp.abs(jax.grad(y_t)(x)).sum(-1)[0]

  influence = np.stack([row(state, x, t) for t in range(length)])  # [t, s]: dy_t / dx_s
  t, s = np.indices((length, length))
  same_doc = (t < split) == (s < split)
  assert np.all(influence[(s > t) | ~same_doc] == 0), "a future or other-document token leaks"
  assert np.all(influence[(s <= t) & same_doc] > 0), "a past token of the document is ignored"


@pytest.mark.parametrize("name", LAYERS)
def test_bfloat16_close_to_float32(name):
  x = inputs(seed=5)
  ref = forward(LAYERS[name](), x, two_documents())
  y = forward(LAYERS[name](dtype=jnp.bfloat16), x.astype(jnp.bfloat16), two_documents())
  assert y.shape == (2, T, D_MODEL) and y.dtype == jnp.bfloat16
  assert_close(y, ref, jnp.bfloat16, what="bf16 vs f32")


@nnx.jit
def output_and_grads(layer, x, segment_ids):
  def loss(layer, x):
    y = layer(x, segment_ids=segment_ids)
    return jnp.sum(jnp.sin(y)), y

  return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)


@pytest.mark.parametrize("name", LAYERS)
def test_reference_implementation_agrees(name):
  x = inputs(seed=6)
  segment_ids = two_documents()
  (grads, dx), y = output_and_grads(LAYERS[name](), x, segment_ids)
  (grads_ref, dx_ref), y_ref = output_and_grads(LAYERS[name](implementation="reference"), x,
                                                segment_ids)
  assert_close(y, y_ref, what="default vs reference")
  assert_close(dx, dx_ref, what="d/dx, default vs reference")
  for (path, g), (_, g_ref) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_ref)):
    assert_close(g.get_value(), g_ref.get_value(), what=f"d/d{'.'.join(map(str, path))}")


def test_parameters_names_and_dtypes():
  layer = LAYERS["mamba"](param_dtype=jnp.bfloat16)
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  names = {path: tuple(v.get_value()) for path, v in nnx.to_flat_state(specs)}
  assert names == {
      ("in_x",): ("embed", "mlp"), ("in_z",): ("embed", "mlp"),
      ("conv_weight",): ("conv", "mlp"), ("conv_bias",): ("mlp",),
      ("x_dt",): ("mlp", "rank"), ("x_B",): ("mlp", "state"), ("x_C",): ("mlp", "state"),
      ("dt_proj",): ("rank", "mlp"), ("dt_bias",): ("mlp",), ("A_log",): ("mlp", "state"),
      ("D",): ("mlp",), ("out",): ("mlp", "embed")}
  assert layer.in_x[...].dtype == jnp.bfloat16 and layer.in_x.shape == (16, 32)
  assert layer.dt_proj.shape == (1, 32)
  for p in (layer.A_log, layer.D, layer.dt_bias):
    assert p[...].dtype == jnp.float32
  np.testing.assert_allclose(-jnp.exp(layer.A_log[...]), -np.tile(np.arange(1, 5), (32, 1)),
                             rtol=1e-6)
  step = jax.nn.softplus(layer.dt_bias[...])
  assert jnp.all(step >= 1e-3 * (1 - 1e-5)) and jnp.all(step <= 0.1 * (1 + 1e-5))
  assert float(jnp.max(step) / jnp.min(step)) > 5  # spread over the range, not one value

  layer2 = LAYERS["mamba2"]()
  specs = nnx.get_partition_spec(nnx.state(layer2, nnx.Param))
  names = {path: tuple(v.get_value()) for path, v in nnx.to_flat_state(specs)}
  assert names[("in_x",)] == ("embed", "heads", "head_dim")
  assert names[("in_B",)] == ("embed", "kv_heads", "state")
  assert names[("conv_x",)] == ("conv", "heads", "head_dim")
  assert names[("out",)] == ("heads", "head_dim", "embed")
  assert names[("norm", "scale")] == ("heads", "head_dim")
  assert layer2.num_heads == 4 and layer2.A_log.shape == (4,) and layer2.in_B.shape == (16, 2, 4)
  assert jnp.all((-layer2.A_log[...] <= 0) & (layer2.A_log[...] <= np.log(16) + 1e-6))


@pytest.mark.parametrize("name", LAYERS)
def test_step_sizes_have_a_floor(name):
  layer = LAYERS[name]()
  layer.dt_bias[...] = jnp.full(layer.dt_bias.shape, -50.0, jnp.float32)
  x = inputs(seed=7)[:, :20]
  _, cache = cached(layer, x, jnp.zeros((2, 20), jnp.int32), layer.init_cache(2, 8))
  # softplus(-50) ~ 2e-22 would leave the state ~1e-22; the floor Δ = 1e-4 lets inputs in.
  assert DT_FLOOR == 1e-4 and float(jnp.max(jnp.abs(cache.ssm))) > 1e-6


def test_gated_rmsnorm_matches_definition():
  norm = GatedRMSNorm(4, 3, num_groups=2)
  norm.scale[...] = jnp.arange(1, 13, dtype=jnp.float32).reshape(4, 3)
  y, z = (jax.random.normal(jax.random.key(i), (2, 5, 4, 3), jnp.float64) for i in (0, 1))
  g = np.asarray(y) * np.asarray(z) / (1 + np.exp(-np.asarray(z)))
  g = g.reshape(2, 5, 2, 6)
  want = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + 1e-6)
  want = want.reshape(2, 5, 4, 3) * np.arange(1, 13).reshape(4, 3)
  out = norm(y.astype(jnp.float32), z.astype(jnp.float32))
  assert out.dtype == jnp.float32
  assert_close(out, want, what="gated rmsnorm")
  with pytest.raises(ValueError, match=r"GatedRMSNorm: z must have shape \[..., 4, 3\]"):
    norm(y, z[..., :2])
  with pytest.raises(ValueError, match="num_heads must be a multiple of num_groups"):
    GatedRMSNorm(4, 3, num_groups=3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(d_model=0), ValueError, "Mamba2?: d_model must be a positive int, got 0"),
    (dict(state_size=-1), ValueError, "state_size must be a positive int"),
    (dict(conv_width=0), ValueError, "conv_width must be a positive int"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (dict(dt_min=0.2, dt_max=0.1), ValueError, "dt_min must be <= dt_max"),
    (dict(dt_min=0.0), ValueError, "dt_min must be a positive finite number"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of"),
    (dict(dtype=jnp.int32), TypeError, "dtype must be a floating dtype"),
    (dict(param_dtype="int8"), TypeError, "param_dtype must be a floating dtype"),
])
@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_bad_constructor_arguments(cls, kwargs, error, match):
  args = dict(d_model=D_MODEL, state_size=4, rngs=nnx.Rngs(0))
  if cls is Mamba2:
    args["head_dim"] = 8
  args.update(kwargs)
  with pytest.raises(error, match=match):
    cls(**args)


def test_bad_mamba2_shapes():
  with pytest.raises(ValueError, match="expand \\* d_model = 32 must be a multiple of head_dim, "
                                       "got head_dim=12"):
    Mamba2(16, head_dim=12, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"heads .* = 4\) must be a multiple of num_groups, got "
                                       r"num_groups=3"):
    Mamba2(16, head_dim=8, num_groups=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Mamba: dt_rank must be a positive int"):
    Mamba(16, dt_rank=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", LAYERS)
def test_bad_call_arguments(name):
  layer = LAYERS[name]()
  owner = type(layer).__name__
  x = inputs(length=5)
  with pytest.raises(ValueError, match=rf"{owner}: x must have shape \[..., ..., 16\], got "
                                       r"shape \(5, 16\)"):
    layer(x[0])
  with pytest.raises(ValueError, match=r"x must have shape \[..., ..., 16\]"):
    layer(x[..., :8])
  with pytest.raises(TypeError, match="x must have a floating dtype"):
    layer(x.astype(jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids must have shape \[5\] or \[2, 5\]"):
    layer(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
    layer(x, segment_ids=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"positions must have shape \[5\] or \[2, 5\]"):
    layer(x, positions=jnp.arange(6))
  with pytest.raises(TypeError, match=f"{owner}: cache must be an SSMCache"):
    layer(x, cache=init_conv_state(2, 4, 32))
  with pytest.raises(ValueError, match=r"cache.conv.inputs must have shape \[2, 3, \d+\]"):
    layer(x, cache=layer.init_cache(1, 8))
  other = LAYERS["mamba2" if name == "mamba" else "mamba"]().init_cache(2, 8)
  with pytest.raises(ValueError, match=f"{owner}: cache"):
    layer(x, cache=other)
  bad = layer.init_cache(2, 8)
  with pytest.raises(ValueError, match=r"cache.segment_ids must have shape \[2\]"):
    layer(x, cache=SSMCache(conv=bad.conv, ssm=bad.ssm, segment_ids=jnp.zeros((2, 1), jnp.int32)))
  with pytest.raises(ValueError, match="init_cache: max_length must be a positive int"):
    layer.init_cache(2, 0)
  with pytest.raises(ValueError, match="init_cache: batch_size must be a positive int"):
    layer.init_cache(0, 8)
