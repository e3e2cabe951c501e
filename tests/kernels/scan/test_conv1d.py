"""causal_conv1d against a float64 loop over tokens and taps: packed documents, carried state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.kernels.scan.conv1d import ConvState, causal_conv1d, init_conv_state


def loop_conv(x, weight, bias=None, reset=None, prev=None, prev_resets=None):
  """The definition, token by token in float64; prev / prev_resets: the W-1 tokens before x."""
  x = np.asarray(x, np.float64)
  weight = np.asarray(weight, np.float64)
  b, t, c = x.shape
  w = weight.shape[0]
  prev = np.zeros((b, w - 1, c)) if prev is None else np.asarray(prev, np.float64)
  prev_resets = np.zeros((b, w - 1), bool) if prev_resets is None else np.asarray(prev_resets)
  reset = np.zeros((b, t), bool) if reset is None else np.asarray(reset)
  xs = np.concatenate([prev, x], axis=1)
  rs = np.concatenate([prev_resets, reset], axis=1)
  y = np.zeros((b, t, c))
  for bi in range(b):
    for ti in range(t):
      now = ti + w - 1
      for k in range(w):
        src = now - (w - 1) + k
        if not rs[bi, src + 1:now + 1].any():
          y[bi, ti] += weight[k] * xs[bi, src]
  if bias is not None:
    y += np.asarray(bias, np.float64)
  return y


def inputs(seed, b=2, t=13, c=5, w=4, dtype=jnp.float32):
  kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (b, t, c), dtype)
  weight = jax.random.normal(kw, (w, c), dtype)
  bias = jax.random.normal(kb, (c,), dtype)
  return x, weight, bias


def random_resets(seed, b, t, p=0.25):
  return jnp.asarray(np.random.default_rng(seed).random((b, t)) < p)


def assert_close(x, ref, tol):
  x = np.asarray(x, np.float64)
  err = np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)
  assert np.all(np.isfinite(x)) and err <= tol, f"normalised error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_matches_loop(width, with_bias, with_reset):
  x, weight, bias = inputs(width, w=width)
  bias = bias if with_bias else None
  reset = random_resets(width, 2, 13) if with_reset else None
  y, state = causal_conv1d(x, weight, bias, reset=reset)
  assert y.dtype == x.dtype and y.shape == x.shape
  assert_close(y, loop_conv(x, weight, bias, reset), 1e-5)
  assert state.inputs.shape == (2, width - 1, 5) and state.resets.shape == (2, width - 1)
  np.testing.assert_array_equal(state.inputs, x[:, x.shape[1] - (width - 1):])


def test_float64_is_exact():
  x, weight, bias = inputs(7, dtype=jnp.float64)
  reset = random_resets(7, 2, 13)
  y, _ = causal_conv1d(x, weight, bias, reset=reset)
  assert y.dtype == jnp.float64
  np.testing.assert_allclose(y, loop_conv(x, weight, bias, reset), rtol=1e-12, atol=1e-12)


def test_bfloat16_sums_in_float32():
  x, weight, bias = inputs(3, dtype=jnp.bfloat16)
  y, state = causal_conv1d(x, weight, bias)
  assert y.dtype == jnp.bfloat16 and state.inputs.dtype == jnp.bfloat16
  assert_close(y, loop_conv(x, weight, bias), 2e-2)


def test_packed_equals_separate():
  x, weight, bias = inputs(11, b=1, t=17)
  split = 6
  reset = jnp.zeros((1, 17), bool).at[0, split].set(True)
  y, _ = causal_conv1d(x, weight, bias, reset=reset)
  y1, _ = causal_conv1d(x[:, :split], weight, bias)
  y2, _ = causal_conv1d(x[:, split:], weight, bias)
  np.testing.assert_allclose(y, jnp.concatenate([y1, y2], axis=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("split", [1, 3, 8, 12])
def test_chaining_through_state(split):
  x, weight, bias = inputs(5)
  # Resets inside the last W-1 tokens of x1 (and at the split) still cut taps after it.
  reset = jnp.zeros((2, 13), bool).at[0, split - 1].set(True).at[1, split].set(True)
  y, state = causal_conv1d(x, weight, bias, reset=reset)
  y1, state1 = causal_conv1d(x[:, :split], weight, bias, reset=reset[:, :split])
  y2, state2 = causal_conv1d(x[:, split:], weight, bias, reset=reset[:, split:], state=state1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(state2.inputs, state.inputs)
  np.testing.assert_array_equal(state2.resets, state.resets)


def test_token_by_token_decoding():
  x, weight, bias = inputs(9, t=10)
  reset = random_resets(9, 2, 10, p=0.3)
  y, _ = causal_conv1d(x, weight, bias, reset=reset)
  state = init_conv_state(2, 4, 5, jnp.float32)
  step = jax.jit(causal_conv1d)
  outs = []
  for i in range(10):
    yi, state = step(x[:, i:i + 1], weight, bias, reset=reset[:, i:i + 1], state=state)
    outs.append(yi)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, rtol=1e-6, atol=1e-6)


def test_state_resets_count():
  # A reset inside the carried window cuts taps reaching across it, even with reset=None here.
  x, weight, _ = inputs(2, b=1, t=3, c=2)
  prev = jax.random.normal(jax.random.key(4), (1, 3, 2))
  prev_resets = jnp.array([[False, True, False]])
  y, _ = causal_conv1d(x, weight, state=ConvState(inputs=prev, resets=prev_resets))
  assert_close(y, loop_conv(x, weight, prev=prev, prev_resets=prev_resets), 1e-5)
  y_open, _ = causal_conv1d(x, weight, state=ConvState(prev, jnp.zeros((1, 3), bool)))
  assert not np.allclose(y, y_open)


def test_gradients_match_loop_weights():
  x, weight, bias = inputs(12)
  reset = random_resets(12, 2, 13)
  x64, w64, b64 = (a.astype(jnp.float64) for a in (x, weight, bias))

  def loss(x, w, b):
    return jnp.sum(jnp.sin(causal_conv1d(x, w, b, reset=reset)[0]))

  grads = jax.grad(loss, argnums=(0, 1, 2))(x64, w64, b64)
  eps = 1e-6
  # The conv is linear in each argument: check one directional derivative per argument.
  for i, g in enumerate(grads):
    args = [x64, w64, b64]
    d = jax.random.normal(jax.random.key(i), args[i].shape, jnp.float64)
    up, down = list(args), list(args)
    up[i], down[i] = args[i] + eps * d, args[i] - eps * d
    numeric = (loss(*up) - loss(*down)) / (2 * eps)
    np.testing.assert_allclose(jnp.sum(g * d), numeric, rtol=1e-6)


def test_bad_arguments():
  x, weight, bias = inputs(0)
  with pytest.raises(ValueError, match="x must have rank 3"):
    causal_conv1d(x[0], weight)
  with pytest.raises(TypeError, match="x must have a floating dtype"):
    causal_conv1d(x.astype(jnp.int32), weight)
  with pytest.raises(ValueError, match=r"weight must have shape \[W, 5\]"):
    causal_conv1d(x, weight[:, :3])
  with pytest.raises(ValueError, match="weight must have rank 2"):
    causal_conv1d(x, weight[0])
  with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
    causal_conv1d(x, weight, bias[:2])
  with pytest.raises(TypeError, match="reset must have dtype bool"):
    causal_conv1d(x, weight, reset=jnp.zeros((2, 13), jnp.int32))
  with pytest.raises(ValueError, match=r"reset must have shape \[2, 13\]"):
    causal_conv1d(x, weight, reset=jnp.zeros((2, 12), bool))
  with pytest.raises(TypeError, match="state must be a ConvState"):
    causal_conv1d(x, weight, state=jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match=r"state.inputs must have shape \[2, 3, 5\]"):
    causal_conv1d(x, weight, state=init_conv_state(2, 3, 5))
  with pytest.raises(TypeError, match="state.resets must be a bool array"):
    causal_conv1d(x, weight, state=ConvState(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3))))
  with pytest.raises(ValueError, match=r"state.resets must have shape \[2, 3\]"):
    causal_conv1d(x, weight, state=ConvState(jnp.zeros((2, 3, 5)), jnp.zeros((1, 3), bool)))
  with pytest.raises(ValueError, match="width must be a positive int"):
    init_conv_state(2, 0, 5)
