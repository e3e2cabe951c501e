"""S4D and S4 mixers: the convolution, the recurrence and the cached prefill agree (outputs and
gradients), packed documents equal separate ones, the cache is the state alone, and bad
arguments raise naming themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.s4 import S4, S4D, S4Cache
from tests.layers.helpers import assert_close, normalised_error

D_MODEL, STATE, T = 4, 4, 12
CONFIGS = {
    "s4d_zoh": (S4D, dict()),
    "s4d_bilinear": (S4D, dict(discretization="bilinear")),
    "s4": (S4, dict()),
}


def _layer(name, dtype=jnp.float64, **overrides):
  cls, kwargs = CONFIGS[name]
  # A wide dt range, so some channels forget within T tokens and some do not.
  return cls(D_MODEL, state_size=STATE, dt_min=1e-2, dt_max=1.0, rngs=nnx.Rngs(3), dtype=dtype,
             **{**kwargs, **overrides})


def _x(seed, t=T, b=2):
  return np.random.default_rng(seed).standard_normal((b, t, D_MODEL))


def _functions(layer):
  """Jitted pure functions of (params, x): the forward pass, one decoding step per token (the
  recurrence), and a prefill of ``split`` tokens followed by single steps."""
  graphdef, params = nnx.split(layer)

  @jax.jit
  def forward(params, x, segment_ids=None):
    return nnx.merge(graphdef, params)(x, segment_ids=segment_ids)

  def decode_from(params, x, split):
    module = nnx.merge(graphdef, params)
    cache = module.init_cache(x.shape[0], x.shape[1])
    ys = []
    if split:
      y, cache = module(x[:, :split], cache=cache)
      ys.append(y)

    def step(cache, x_B1D):
      y, cache = module(x_B1D[:, None], cache=cache)
      return cache, y[:, 0]

    _, y_TBD = jax.lax.scan(step, cache, jnp.swapaxes(x[:, split:], 0, 1))
    return jnp.concatenate(ys + [jnp.swapaxes(y_TBD, 0, 1)], axis=1)

  decode = jax.jit(decode_from, static_argnames="split")
  return params, forward, decode


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convolution_recurrence_and_prefill_agree(name):
  layer = _layer(name)
  params, forward, decode = _functions(layer)
  x = _x(0)
  y = forward(params, x)
  assert y.shape == x.shape and y.dtype == jnp.float64
  assert normalised_error(decode(params, x, split=0), y) < 1e-10
  # Causal: changing tokens 6.. leaves outputs 0..5 as they were.
  changed = forward(params, np.concatenate([x[:, :6], 0 * x[:, 6:]], axis=1))
  assert normalised_error(changed[:, :6], y[:, :6]) < 1e-12
  assert normalised_error(changed[:, 6:], y[:, 6:]) > 1e-3
  # float32: both modes within the float32 tolerance of the float64 layer.
  params32, forward32, decode32 = _functions(_layer(name, jnp.float32))
  x32 = x.astype(np.float32)
  assert_close(forward32(params32, x32), y, what="float32 convolution")
  assert_close(decode32(params32, x32, split=5), y, what="float32 prefill + decode")


@pytest.mark.parametrize("name", ["s4d_zoh", "s4"])
def test_packed_documents_equal_separate_ones(name):
  """Row 0 holds two documents (cut at 5), row 1 one; the recurrence that packed documents take
  against separate convolutions: outputs, gradients, and a cached chunk with a document start."""
  layer = _layer(name)
  params, forward, _ = _functions(layer)
  x = jnp.asarray(_x(2))
  seg_np = np.array([[0] * 5 + [1] * 7, [7] * 12], np.int32)

  def separate(p, x):
    # Each document alone in a row, zero-padded after its end (causal: padding changes nothing).
    rows = jnp.stack([x[0].at[5:].set(0), jnp.roll(x[0], -5, axis=0).at[7:].set(0), x[1]])
    y = forward(p, rows)
    return jnp.stack([jnp.concatenate([y[0, :5], y[1, :7]]), y[2]])

  graphdef, _ = nnx.split(layer)
  # The same parameters; S4D's recurrence through linear_scan's reference implementation.
  host_graphdef, _ = nnx.split(_layer(name, implementation="reference") if name != "s4" else layer)
  host = jax.jit(lambda p, x: nnx.merge(host_graphdef, p)(x, segment_ids=seg_np))

  @jax.jit
  def cached(p, x):
    """3 tokens, a chunk of 5 holding row 0's document start, then single steps."""
    module = nnx.merge(graphdef, p)
    cache = module.init_cache(2, T)
    y0, cache = module(x[:, :3], cache=cache)
    y1, cache = module(x[:, 3:8], segment_ids=jnp.asarray(seg_np[:, 3:8]), cache=cache)
    ys = [y0, y1]
    for t in range(8, T):
      y, cache = module(x[:, t:t + 1], cache=cache)
      ys.append(y)
    return jnp.concatenate(ys, axis=1)

  want = jax.jit(separate)(params, x)
  # Traced ids: lax.cond picks the recurrence. Host ids: the choice is made while tracing.
  assert normalised_error(forward(params, x, jnp.asarray(seg_np)), want) < 1e-10
  assert normalised_error(host(params, x), want) < 1e-10
  assert normalised_error(cached(params, x), want) < 1e-10
  # One document throughout: the convolution, the same outputs as without ids.
  assert normalised_error(forward(params, x, jnp.zeros((2, T), jnp.int32)),
                          forward(params, x)) < 1e-12
  # Gradients (parameters and x) through the packed recurrence equal the convolutions'.
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) ** 2)
  grad = lambda f: jax.jit(jax.grad(loss(f), (0, 1)))
  g_packed = grad(lambda p, x: forward(p, x, jnp.asarray(seg_np)))(params, x)
  g_separate = grad(separate)(params, x)
  leaves = jax.tree_util.tree_leaves_with_path(g_separate)
  assert len(leaves) == len(jax.tree_util.tree_leaves(g_packed)) > 10
  for (path, g_sep), g in zip(leaves, jax.tree_util.tree_leaves(g_packed)):
    assert float(np.max(np.abs(g_sep))) > 0, path
    # float32 parameters have float32 gradients
    assert normalised_error(g, g_sep) < 1e-6, (path, normalised_error(g, g_sep))


def test_cache_is_the_state():
  for cls in (S4D, S4):
    layer = cls(D_MODEL, state_size=3, rngs=nnx.Rngs(0))
    small, large = layer.init_cache(2, 8), layer.init_cache(2, 4096)
    assert isinstance(small, S4Cache) and small.state.shape == large.state.shape == (2, 4, 3)
    assert small.state.dtype == jnp.complex64
    assert layer.init_cache(1, 8, jnp.float64).state.dtype == jnp.complex128


def test_bfloat16_compute():
  for name in ("s4d_zoh", "s4"):
    (params16, forward16, _), (params, forward, _) = (
        _functions(_layer(name, dtype)) for dtype in (jnp.bfloat16, jnp.float64))
    y16 = forward16(params16, jnp.asarray(_x(5), jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, forward(params, _x(5)), jnp.bfloat16)


def test_parameters_carry_logical_axes():
  for cls in (S4D, S4):
    state = nnx.state(cls(D_MODEL, state_size=3, rngs=nnx.Rngs(0)), nnx.Param)
    for path, var in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
      names = var.get_metadata()["out_sharding"]
      assert len(names) == var[...].ndim, path
      if names[-1:] == ("state",):
        assert var[...].dtype == jnp.float32, path


def test_bad_arguments_raise():
  layer = S4D(D_MODEL, state_size=3, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5, D_MODEL))
  with pytest.raises(ValueError, match=r"S4D: x must have shape \[\.\.\., \.\.\., 4\]"):
    layer(jnp.ones((2, 5, 3)))
  with pytest.raises(ValueError, match=r"S4D: x must have shape"):
    layer(jnp.ones((5, D_MODEL)))
  with pytest.raises(ValueError, match=r"S4D: segment_ids must have shape \[5\] or \[2, 5\]"):
    layer(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(TypeError, match=r"S4D: cache must be an S4Cache"):
    layer(x, cache=jnp.zeros((2, 4, 3), jnp.complex64))
  with pytest.raises(ValueError, match=r"S4D: cache.state must have shape .* \[2, 4, 3\]"):
    layer(x, cache=layer.init_cache(3, 8))
  with pytest.raises(TypeError, match=r"S4D: cache.state must be complex"):
    layer(x, cache=S4Cache(jnp.zeros((2, 4, 3))))
  with pytest.raises(ValueError, match=r"S4D.init_cache: max_length must be a positive int"):
    layer.init_cache(2, 0)
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match=r"S4D: discretization must be one of"):
    S4D(4, discretization="euler", rngs=rngs)
  with pytest.raises(ValueError, match=r"S4: discretization must be one of \('bilinear',\)"):
    S4(4, discretization="zoh", rngs=rngs)
  with pytest.raises(ValueError, match=r"S4D: implementation must be one of"):
    S4D(4, implementation="pallas_tpu", rngs=rngs)
  with pytest.raises(ValueError, match=r"S4: dt_min must be <= dt_max"):
    S4(4, dt_min=0.5, dt_max=0.1, rngs=rngs)
  with pytest.raises(ValueError, match=r"S4: state_size must be a positive int, got 0"):
    S4(4, state_size=0, rngs=rngs)
  with pytest.raises(TypeError, match=r"S4D: dtype must be a floating dtype"):
    S4D(4, dtype=jnp.int32, rngs=rngs)
