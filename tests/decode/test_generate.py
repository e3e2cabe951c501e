"""Generation: greedy decoding equals the full forward's argmax, prompts of different lengths
in one batch equal each prompt alone (dense and ring-buffer caches), sampling filters; landmark
models get landmark tokens inserted in the prompt and while decoding, never emitted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import load_config
from lsm.decode import generate, landmark_layout, sample
from lsm.models import LM

VOCAB = 30


def _model(*overrides):
  config = load_config(None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                              "model.num_kv_heads=2", "model.mlp_dim=48", *overrides]).model
  with nnx.use_eager_sharding(False):
    return LM(config, vocab_size=VOCAB, rngs=nnx.Rngs(0))


def _prompt(n, seed):
  return list(np.random.default_rng(seed).integers(0, VOCAB, n))


@pytest.mark.parametrize("cache", ["dense", "ring"])
def test_greedy_equals_argmax_of_the_full_forward(cache):
  model = _model(*(["model.attention.window=4"] if cache == "ring" else []))
  prompt = _prompt(7, 0)
  out = generate(model, [prompt], max_new_tokens=6, prefill_chunk=3).tokens[0]
  assert len(out) == 6
  sequence = list(prompt)
  for token in out:
    logits = model(jnp.asarray([sequence]))
    assert int(jnp.argmax(logits[0, -1])) == token
    sequence.append(token)


@pytest.mark.parametrize("cache", ["dense", "ring"])
def test_a_batch_of_different_lengths_equals_each_prompt_alone(cache):
  model = _model(*(["model.attention.window=4", "model.attention.sink_tokens=1"]
                   if cache == "ring" else []))
  prompts = [_prompt(3, 1), _prompt(9, 2), _prompt(5, 3)]
  together = generate(model, prompts, max_new_tokens=5).tokens
  alone = [generate(model, [p], max_new_tokens=5).tokens[0] for p in prompts]
  assert together == alone


LANDMARK = ["model.layer_pattern=[landmark]", "model.landmark.block_size=3"]


def test_landmark_models_decode_with_landmarks_inserted():
  """Greedy generation equals the argmax of the full forward (training mode) over the sequence
  with a landmark (id VOCAB - 1) after every 3 regular tokens; the landmark is never emitted,
  even where the model would rank it first."""
  model = _model(*LANDMARK)
  assert landmark_layout(model) == (3, VOCAB - 1)
  landmark = VOCAB - 1
  # Make the landmark the model's favourite token, so only the ban keeps it out of the output.
  model.embed.embedding[...] = model.embed.embedding[...].at[landmark].multiply(50.0)
  prompt = list(np.random.default_rng(5).integers(0, VOCAB - 1, 7))
  out = generate(model, [prompt], max_new_tokens=8, prefill_chunk=4).tokens[0]
  assert len(out) == 8 and landmark not in out
  regular, favoured = list(prompt), 0
  for token in out:
    sequence = []
    for i, t in enumerate(regular):
      sequence.append(t)
      if (i + 1) % 3 == 0:
        sequence.append(landmark)
    logits = model(jnp.asarray([sequence]))[0, -1]
    favoured += int(jnp.argmax(logits)) == landmark
    assert int(jnp.argmax(logits.at[landmark].set(-jnp.inf))) == token
    regular.append(token)
  assert favoured > 0
  # Prompts of different lengths in one batch: each as if alone.
  prompts = [prompt, prompt[:4], prompt[:2] + prompt]
  together = generate(model, prompts, max_new_tokens=5).tokens
  assert together == [generate(model, [p], max_new_tokens=5).tokens[0] for p in prompts]


def test_landmark_blocks_in_host_memory_generate_the_same_tokens():
  """``model.landmark.cache_memory=host`` through generate (jitted prefill and steps, donated
  cache): with top-2 retrieval over more blocks than that, the tokens equal the device cache's."""
  prompts = [list(np.random.default_rng(6).integers(0, VOCAB - 1, n)) for n in (14, 5)]
  outputs = {}
  for memory in ("device", "host"):
    model = _model(*LANDMARK, "model.landmark.top_k=2", f"model.landmark.cache_memory={memory}")
    outputs[memory] = generate(model, prompts, max_new_tokens=6, prefill_chunk=4).tokens
  assert outputs["host"] == outputs["device"]


def test_landmark_prompts_may_not_hold_the_landmark_token():
  with pytest.raises(ValueError, match=r"prompts\[0\] has token ids outside \[0, 29\)"):
    generate(_model(*LANDMARK), [[1, 2, VOCAB - 1]], max_new_tokens=2)


def test_stop_tokens_end_a_row():
  model = _model()
  free = generate(model, [_prompt(6, 4)], max_new_tokens=8).tokens[0]
  stopped = generate(model, [_prompt(6, 4)], max_new_tokens=8, stop_tokens=[free[2]]).tokens[0]
  assert stopped == free[:free.index(free[2]) + 1]


def test_sampling_filters():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]] * 400)
  keys = jax.random.key(0)
  greedy = sample(logits, keys)
  assert set(np.asarray(greedy).tolist()) == {1}
  np.testing.assert_array_equal(sample(logits, keys, temperature=1.0, top_k=1), greedy)
  np.testing.assert_array_equal(sample(logits, keys, temperature=1.0, top_p=0.01), greedy)
  top3 = set(np.asarray(sample(logits, keys, temperature=1.0, top_k=3)).tolist())
  assert top3 == {1, 2, 3}
  # top_p=0.9: the smallest set reaching 90% of the mass is tokens 1, 3, 2.
  nucleus = set(np.asarray(sample(logits, keys, temperature=1.0, top_p=0.9)).tolist())
  assert nucleus == {1, 2, 3}
  spread = set(np.asarray(sample(logits, keys, temperature=1.0)).tolist())
  assert spread == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty"),
    (dict(prompts=[[1, 99]]), r"prompts\[0\] has token ids outside \[0, 30\)"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(prompts=[[1]], temperature=-1.0), "temperature must be a number >= 0"),
    (dict(prompts=[[1]], top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(prompts=[[1, 2, 3]], max_new_tokens=4, max_length=5), "max_length=5 is shorter"),
])
def test_bad_arguments_are_named(kwargs, match):
  kwargs = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    generate(_model(), **kwargs)
