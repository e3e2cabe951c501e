"""The decoder LM: decoding and packing invariants of the whole model, causality, stacked
parameters with full logical specs, remat policies and bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import load_config
from lsm.models import LM, count_params, mixer_names

VOCAB = 40


def _model(*overrides, seed=0):
  config = load_config(None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                              "model.num_kv_heads=2", "model.mlp_dim=48", *overrides]).model
  with nnx.use_eager_sharding(False):
    return LM(config, vocab_size=VOCAB, rngs=nnx.Rngs(seed))


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("cache", ["dense", "ring"])
@pytest.mark.parametrize("chunk", [1, 5, 9])
def test_prefill_then_decode_equals_one_forward(cache, chunk):
  extra = ["model.attention.window=6", "model.attention.sink_tokens=2"] if cache == "ring" else []
  model = _model(*extra)
  tokens = _tokens(2, 20)
  full = model(tokens)
  sizes = [chunk] * (11 // chunk) + [11 % chunk] + [1] * 9
  assert _rel(decode_in_pieces(model, tokens, [s for s in sizes if s], 24), full) < 1e-5


def decode_in_pieces(model, tokens, sizes, max_length):
  """Logits of ``tokens`` [B, T] fed through the model's cache in chunks of ``sizes`` (sum T)."""
  assert sum(sizes) == tokens.shape[1]
  state = model.init_cache(tokens.shape[0], max_length)
  decode = nnx.jit(lambda m, x, p, c: m.decode(x, positions=p, cache=c))
  outs, t = [], 0
  for size in sizes:
    pos = jnp.broadcast_to(jnp.arange(t, t + size), (tokens.shape[0], size))
    logits, state = decode(model, tokens[:, t:t + size], pos, state)
    outs.append(logits)
    t += size
  return jnp.concatenate(outs, axis=1)


def test_packing_equals_separate_documents():
  model = _model("model.attention.window=5")
  a, b = _tokens(1, 9, seed=2), _tokens(1, 14, seed=3)
  packed = model(jnp.concatenate([a, b], 1),
                 positions=jnp.concatenate([jnp.arange(9), jnp.arange(14)])[None],
                 segment_ids=jnp.repeat(jnp.array([1, 2]), jnp.array([9, 14]))[None])
  alone = jnp.concatenate([model(a), model(b)], axis=1)
  assert _rel(packed, alone) < 1e-5


def test_no_logit_depends_on_a_later_token():
  model = _model()
  tokens = _tokens(1, 12)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % VOCAB)
  a, b = model(tokens), model(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_stacked_parameters_carry_full_logical_specs():
  model = _model("model.num_layers=4", "model.tie_embeddings=false")
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves
  for path, variable in leaves:
    names = variable.out_sharding
    where = jax.tree_util.keystr(path)
    assert names is not None and len(names) == variable.get_value().ndim, where
    assert (names[0] == "layers") == ("blocks" in where), where
    if "blocks" in where:
      assert variable.get_value().shape[0] == 4, where  # one slice per repeat of the pattern
  assert count_params(model) == sum(v.get_value().size for _, v in leaves)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_results(remat):
  tokens = _tokens(2, 10)

  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

  plain_loss, plain_grads = loss_and_grads(_model())
  loss, grads = loss_and_grads(_model(f"model.remat={remat}"))
  assert abs(float(loss) - float(plain_loss)) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bf16_compute_with_float32_params():
  tokens = _tokens(2, 10)
  f32 = _model()(tokens)
  model = _model("model.dtype=bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  bf16 = model(tokens)
  assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert _rel(bf16, f32) < 5e-2


def test_registry_knows_attention_and_model_rejects_bad_vocab():
  assert "attention" in mixer_names()
  config = load_config(None, []).model
  with pytest.raises(ValueError, match="model.vocab_size must be a positive int"):
    LM(config, rngs=nnx.Rngs(0))
