"""The LM with context parallelism: loss and gradients equal those without; decoding with a
cache sharded over the sequence axis equals unsharded decoding, and its cache stays sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm import parallel
from lsm.config import ConfigError, load_config
from lsm.models import LM
from lsm.train.step import Functional, loss_sums
from tests.kernels.attention.helpers import normalised_error

VOCAB, B, T = 40, 4, 64


def _config(*overrides):
  return load_config(None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                            "model.num_kv_heads=2", "model.mlp_dim=48", f"data.seq_len={T}",
                            *overrides])


def _model(config, seed=0):
  with nnx.use_eager_sharding(False):
    return LM(config.model, vocab_size=VOCAB, rngs=nnx.Rngs(seed))


def _packed_batch(seed=0):
  """Three documents per row with positions restarting per document, as the data pipeline packs."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
  seg = np.stack([np.searchsorted(np.sort(rng.choice(np.arange(1, T), 2, replace=False)),
                                  np.arange(T + 1), side="right") for _ in range(B)])
  starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  pos = np.stack([np.arange(T + 1) - np.maximum.accumulate(np.where(s, np.arange(T + 1), 0))
                  for s in starts])
  loss_mask = rng.random((B, T + 1)) < 0.8
  return dict(tokens=tokens, segment_ids=seg.astype(np.int32) + 1,
              positions=pos.astype(np.int32), loss_mask=loss_mask)


def _loss_and_grads(config, mesh_shape):
  model = _model(config)
  fn, params = Functional.of(model)
  batch = _packed_batch()

  def objective(params, batch):
    loss_sum, count, correct, exact = loss_sums(fn.module(params), batch)
    return loss_sum / count, (correct, exact)

  grad = jax.value_and_grad(objective, has_aux=True)
  if mesh_shape is None:
    return jax.jit(grad)(params, batch)
  mesh = parallel.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    batch = parallel.host_batch_to_global(batch, mesh)
    return jax.jit(grad)(params, batch)


@pytest.mark.parametrize("strategy,layout,mesh_shape", [
    ("ring", "zigzag", dict(data=2, fsdp=1, sequence=4, tensor=1)),
    ("ring", "striped", dict(data=1, fsdp=1, sequence=8, tensor=1)),
    ("all_gather", "contiguous", dict(data=1, fsdp=2, sequence=2, tensor=2)),
    ("ulysses", "zigzag", dict(data=4, fsdp=1, sequence=2, tensor=1)),
])
def test_loss_and_grads_equal_without_context_parallelism(strategy, layout, mesh_shape):
  config = _config(f"model.attention.context_parallel.strategy={strategy}",
                   f"model.attention.context_parallel.layout={layout}",
                   "model.attention.implementation=xla")
  (loss, (correct, exact)), grads = _loss_and_grads(config, mesh_shape)
  (loss0, (correct0, exact0)), grads0 = _loss_and_grads(config, None)
  assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
  assert float(correct) == float(correct0)
  # The exact-row flags are per row: the layout permutes tokens, never rows.
  np.testing.assert_array_equal(np.asarray(exact), np.asarray(exact0))
  for path, g, g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                         jax.tree.leaves(grads0)):
    assert normalised_error(g, g0) <= 1e-5, path[0]


def test_model_defaults_positions_to_the_layout():
  """Tokens in zigzag order without positions: the logits are those of the natural order,
  permuted."""
  config = _config("model.attention.implementation=xla")
  model = _model(config)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, T)), jnp.int32)
  want = model(tokens)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, sequence=8, tensor=1))
  perm = parallel.permutation(T, 8, "zigzag")
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, x: m(x))(model, tokens[:, perm])
  assert normalised_error(got, want[:, perm]) <= 1e-5


def test_sharded_cache_decoding_equals_unsharded():
  config = _config("model.attention.implementation=xla")
  model = _model(config)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 24)), jnp.int32)
  decode = nnx.jit(lambda m, x, p, c: m.decode(x, positions=p, cache=c))
  init = nnx.jit(lambda m: m.init_cache(2, 32), )

  def run():
    cache = init(model)
    outs, t = [], 0
    for size in (9, 1, 1, 5, 1, 7):
      pos = jnp.broadcast_to(jnp.arange(t, t + size, dtype=jnp.int32), (2, size))
      logits, cache = decode(model, tokens[:, t:t + size], pos, cache)
      outs.append(logits)
      t += size
    return jnp.concatenate(outs, axis=1), cache

  want, _ = run()
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, sequence=8, tensor=1))
  with jax.set_mesh(mesh):
    got, cache = run()
  assert normalised_error(got, want) <= 1e-5
  np.testing.assert_allclose(np.asarray(got), np.asarray(model(tokens)), rtol=0, atol=1e-4)
  # The cache stays sharded over `sequence`: each device holds 32 / 8 slots.
  keys = cache[0].keys
  assert keys.sharding.shard_shape(keys.shape)[2] == 32 // 8, keys.sharding


def test_sharded_decode_moves_no_cache():
  """The compiled decoding step's collectives move partial outputs, not the cache."""
  config = _config("model.attention.implementation=xla")
  model = _model(config)
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, sequence=8, tensor=1))
  with jax.set_mesh(mesh):
    cache = nnx.jit(lambda m: m.init_cache(1, 4096))(model)
    step = nnx.jit(lambda m, x, p, c: m.decode(x, positions=p, cache=c))
    hlo = step.lower(model, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                     cache).compile().as_text()
  assert "all-gather" not in hlo and "collective-permute" not in hlo and "all-to-all" not in hlo
  assert "all-reduce" in hlo


def test_config_errors_name_the_keys():
  with pytest.raises(ConfigError, match="2 \\* parallel.sequence=8 .*layout=zigzag"):
    _config("parallel.sequence=4", "data.seq_len=68")
  with pytest.raises(ConfigError, match="strategy=ulysses needs model.num_heads=4 and "
                                        "model.num_kv_heads=2 divisible by"):
    _config("parallel.sequence=4", "model.attention.context_parallel.strategy=ulysses")
  with pytest.raises(ConfigError, match="context_parallel.layout"):
    _config("model.attention.context_parallel.layout=zag")


@pytest.mark.parametrize("pattern,mesh_shape", [
    ("[mamba2,attention]", dict(data=2, fsdp=1, sequence=4, tensor=1)),
    ("[mamba,s4d]", dict(data=1, fsdp=1, sequence=8, tensor=1)),
])
def test_scan_mixers_with_the_sequence_sharded_equal_one_device(pattern, mesh_shape):
  """Hybrid SSM + ring attention models share one mesh: scans fold their states over the
  sequence axis, attention rings over it (tokens in the contiguous layout)."""
  config = _config(f"model.layer_pattern={pattern}", "model.attention.context_parallel.layout="
                   "contiguous", "model.attention.context_parallel.strategy=ring",
                   "model.attention.implementation=xla", "model.ssm.state_size=4",
                   "model.ssm.head_dim=16", "model.ssm.chunk_size=4")
  (loss, _), grads = _loss_and_grads(config, mesh_shape)
  (loss0, _), grads0 = _loss_and_grads(config, None)
  assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
  for path, g, g0 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                         jax.tree.leaves(grads0)):
    assert normalised_error(g, g0) <= 1e-5, path[0]


def test_scan_mixers_need_the_contiguous_layout():
  config = _config("model.layer_pattern=[mamba2,attention]", "model.ssm.head_dim=16")
  model = _model(config)
  with jax.set_mesh(parallel.make_mesh(dict(data=1, fsdp=1, sequence=8, tensor=1))):
    with pytest.raises(ValueError, match="scan their tokens in order \\(mamba2\\).*"
                                         "layout=contiguous, got 'zigzag'"):
      model(jnp.zeros((2, T), jnp.int32))
  from lsm.train.loop import check_layer_pattern_or_raise
  with pytest.raises(ConfigError, match="parallel.sequence=4 set model.attention.context_parallel"
                                        ".layout=contiguous"):
    check_layer_pattern_or_raise(_config("model.layer_pattern=[mamba2,attention]",
                                         "parallel.sequence=4"))
