"""LMs built from the state-space mixers: the decoding, packing and causality invariants of the
whole model, and bf16 training for 300 steps with no non-finite loss."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lsm.config import load_config
from lsm.train import train
from tests.models.test_lm import VOCAB, _rel, _tokens, decode_in_pieces
from tests.models.test_lm import _model as lm_model

# S4 (DPLR) has the same invariants tested at the layer level (tests/layers/test_s4.py).
PATTERNS = {"mamba2+attention": "[mamba2,attention]", "mamba+s4d": "[mamba,s4d]"}
SSM_SMALL = ["model.ssm.state_size=8", "model.ssm.head_dim=16", "model.ssm.chunk_size=8"]


def _model(pattern, *overrides, seed=0):
  return lm_model(*SSM_SMALL, f"model.layer_pattern={pattern}", *overrides, seed=seed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_decode_equals_one_forward(pattern):
  model = _model(PATTERNS[pattern])
  tokens = _tokens(2, 23)
  full = model(tokens)
  assert _rel(decode_in_pieces(model, tokens, [11, 5, 1, 1, 1, 1, 1, 1, 1], 32), full) < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS)
def test_packing_equals_separate_documents(pattern):
  model = _model(PATTERNS[pattern])
  a, b = _tokens(1, 9, seed=2), _tokens(1, 14, seed=3)
  packed = model(jnp.concatenate([a, b], 1),
                 positions=jnp.concatenate([jnp.arange(9), jnp.arange(14)])[None],
                 segment_ids=jnp.repeat(jnp.array([1, 2]), jnp.array([9, 14]))[None])
  alone = jnp.concatenate([model(a), model(b)], axis=1)
  assert _rel(packed, alone) < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS)
def test_no_logit_depends_on_a_later_token(pattern):
  model = _model(PATTERNS[pattern])
  tokens = _tokens(1, 24)
  changed = tokens.at[:, 13:].set((tokens[:, 13:] + 1) % VOCAB)
  a, b = model(tokens), model(changed)
  # FFT convolutions (s4) are causal in exact arithmetic; their rounding spreads over all outputs.
  assert _rel(a[:, :13], b[:, :13]) < 1e-6
  assert _rel(a[:, 13:], b[:, 13:]) > 1e-2


TRAIN = ["model.d_model=32", "model.num_heads=4", "model.num_kv_heads=4", "model.mlp_dim=64",
         "model.ssm.state_size=16", "model.ssm.head_dim=16", "model.ssm.chunk_size=16",
         "model.dtype=bfloat16", "data.task=mqar", "data.seq_len=32", "data.batch_size=8",
         "data.task_options.num_pairs=4", "data.task_options.num_queries=2",
         "train.steps=300", "train.log_every=10", "train.eval_every=300", "train.eval_batches=1",
         "checkpoint.every=300", "checkpoint.async_save=false", "optimizer.learning_rate=3e-3",
         "optimizer.warmup_steps=20"]


@pytest.mark.slow
@pytest.mark.parametrize("pattern,layers", [("[mamba2]", 2), ("[mamba2,mamba2,attention]", 3)])
def test_bf16_training_for_300_steps_stays_finite_and_learns(tmp_path, pattern, layers):
  config = load_config(None, [f"name=ssm{layers}", f"train.output_dir={tmp_path}/{{name}}", *TRAIN,
                              f"model.layer_pattern={pattern}", f"model.num_layers={layers}"])
  result = train(config)
  assert result.step == 300
  records = [json.loads(line) for line in open(result.log_file)]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
