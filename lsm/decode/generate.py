"""Batched generation from an `LM`: chunked prefill into the mixers' caches, then a jitted decode
step with a donated cache.

Prompts of different lengths: the common prefix (the shortest prompt) is prefilled in chunks for
the whole batch, then each step feeds every row its next prompt token while it has one and its
sampled token after, so any cache kind (dense, ring buffer, recurrent state) sees exactly the
tokens of its own row in order.

``cache_policy``: a `BlockMemoryPolicy` gives every attention mixer a training-free block memory
(`lsm.layers.block_memory`) instead of its dense cache; `cache_policy_of` reads it from a config.

Landmark models (`lsm.layers.LandmarkAttention`): the model reads a landmark token after every
block of regular tokens (`lsm.data.landmarks`), so generate inserts them: into the prompts, and
as forced tokens at every landmark position while decoding. Landmarks are never sampled nor
returned; prompts and outputs are regular tokens only. The landmark id is the last of the
model's vocabulary (as `lsm.train` appends it to the data's).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.config import ConfigError
from lsm.decode.sampling import check_sampling, sample
from lsm.layers import (CACHE_POLICIES, BlockMemoryPolicy, BlockSelectPolicy, HeavyHitterPolicy,
                        LandmarkAttention, SinkWindowPolicy, SnapKVPolicy)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # the new tokens per prompt (stop token included when hit)
  prefill_s: float
  decode_s: float
  decode_steps: int
  batch_size: int

  @property
  def tokens_per_s(self) -> float:
    return self.batch_size * self.decode_steps / max(self.decode_s, 1e-9)


def landmark_layout(model: nnx.Module) -> tuple[int, int] | None:
  """``(block_size, landmark_id)`` for a model with landmark attention, else None."""
  sizes = {m.block_size for _, m in nnx.iter_graph(model) if isinstance(m, LandmarkAttention)}
  if not sizes:
    return None
  if len(sizes) > 1:
    raise ValueError(f"generate: the model's landmark layers disagree on block_size "
                     f"({sorted(sizes)}); one landmark layout per model is supported")
  return sizes.pop(), model.vocab_size - 1


def _with_landmarks(prompt: np.ndarray, block_size: int, landmark_id: int) -> np.ndarray:
  """The prompt with a landmark after every complete block of ``block_size`` tokens."""
  return np.insert(prompt, np.arange(block_size, prompt.size + 1, block_size),
                   landmark_id).astype(np.int32)


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("generate: prompts must be a non-empty list of token lists")
  out = []
  for i, p in enumerate(prompts):
    p = np.asarray(p)
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f"generate: prompts[{i}] must be a non-empty 1-D list of ints, got "
                       f"shape {p.shape} dtype {p.dtype}")
    if p.min() < 0 or p.max() >= vocab_size:
      raise ValueError(f"generate: prompts[{i}] has token ids outside [0, {vocab_size})")
    out.append(p.astype(np.int32))
  return out


# Jitted once per model structure (graphdef) and shapes, shared by every call.


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _init_cache(graphdef, params, batch, max_length, dtype, policy):
  return nnx.merge(graphdef, params).init_cache(batch, max_length, dtype, policy=policy)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill_call(graphdef, params, tokens, positions, cache):
  """One jitted prefill chunk: (last position's logits, cache); the cache is donated."""
  logits, cache = nnx.merge(graphdef, params).decode(tokens, positions=positions, cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def step_call(graphdef, params, token, position, cache):
  """One jitted decoding step of one token per row: (logits, cache); the cache is donated."""
  logits, cache = nnx.merge(graphdef, params).decode(token[:, None], positions=position[:, None],
                                                     cache=cache)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(4, 5))
def _pick(logits, key, forced, has_forced, sampling, banned):
  temperature, top_k, top_p = sampling
  if banned is not None:  # the landmark token: only ever forced
    logits = logits.at[:, banned].set(-jnp.inf)
  return jnp.where(has_forced, forced, sample(logits, key, temperature=temperature, top_k=top_k,
                                              top_p=top_p))


_POLICY_CLASSES = {"block_memory": BlockMemoryPolicy, "sink_window": SinkWindowPolicy,
                   "heavy_hitter": HeavyHitterPolicy, "snapkv": SnapKVPolicy,
                   "block_select": BlockSelectPolicy}


def cache_policy_of(decode_config):
  """The attention cache policy a `DecodeConfig` asks for (``decode.cache_policy``, with its
  section ``decode.<cache_policy>``): None for "full"."""
  name = decode_config.cache_policy
  if name == "full":
    return None
  try:
    return _POLICY_CLASSES[name](**getattr(decode_config, name).model_dump())
  except ValueError as error:
    raise ConfigError(f"decode.{name}: {error}") from None


def generate(model: nnx.Module, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
             prefill_chunk: int = 512, max_length: int | None = None, seed: int = 0,
             cache_dtype=jnp.float32, cache_policy=None) -> Generation:
  """Continues every prompt by up to ``max_new_tokens`` tokens (fewer after a stop token).
  ``cache_policy``: None (each mixer's own cache) or one of `lsm.layers.CACHE_POLICIES` for the
  attention mixers (block memory, sink + window, heavy hitters, SnapKV, block selection; with
  SnapKV the prompt it compresses is the first prefill chunk, so give ``prefill_chunk`` >= the
  prompt length). Landmark models get their landmark tokens inserted (module docstring)."""
  landmarks = landmark_layout(model)
  prompts = _check_prompts(prompts, model.vocab_size - (landmarks is not None))
  if cache_policy is not None and not isinstance(cache_policy, CACHE_POLICIES):
    names = ", ".join(p.__name__ for p in CACHE_POLICIES)
    raise TypeError(f"generate: cache_policy must be one of {names} or None, got "
                    f"{type(cache_policy).__name__}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
      max_new_tokens < 1):
    raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
  check_sampling(temperature, top_k, top_p)
  b = len(prompts)
  if landmarks is None:
    needed = max(p.size for p in prompts) + max_new_tokens
  else:  # positions count the landmarks
    block_size, landmark_id = landmarks
    span = block_size + 1
    needed = max(p.size for p in prompts) + max_new_tokens
    needed += needed // block_size
    prompts = [_with_landmarks(p, block_size, landmark_id) for p in prompts]
  common = min(p.size for p in prompts)
  steps = needed - common
  max_length = max_length or needed
  if max_length < needed:
    raise ValueError(f"generate: max_length={max_length} is shorter than the longest prompt plus "
                     f"max_new_tokens ({needed}{', landmarks counted' if landmarks else ''})")
  graphdef, params = nnx.split(model)
  started = time.perf_counter()
  cache = _init_cache(graphdef, params, b, max_length, jnp.dtype(cache_dtype), cache_policy)
  tokens = np.stack([p[:common] for p in prompts])
  logits = None
  for start in range(0, common, prefill_chunk):
    chunk = tokens[:, start:start + prefill_chunk]
    positions = np.broadcast_to(np.arange(start, start + chunk.shape[1], dtype=np.int32),
                                chunk.shape)
    logits, cache = prefill_call(graphdef, params, jnp.asarray(chunk), jnp.asarray(positions),
                                 cache)
  jax.block_until_ready(logits)
  prefill_s = time.perf_counter() - started

  forced = np.zeros((b, steps), np.int32)
  has_forced = np.zeros((b, steps), bool)
  for i, p in enumerate(prompts):
    rest = p[common:]
    forced[i, :rest.size] = rest
    has_forced[i, :rest.size] = True
  if landmarks is not None:  # every row is at position common + n at step n
    at_landmark = (common + np.arange(steps)) % span == block_size
    forced[:, at_landmark] = landmark_id
    has_forced[:, at_landmark] = True
  sampling = (float(temperature), top_k, None if top_p is None else float(top_p))
  key = jax.random.key(seed)
  out = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  stop = set(int(t) for t in stop_tokens)
  started = time.perf_counter()
  n = 0
  for n in range(steps):
    key, sub = jax.random.split(key)
    token = np.asarray(_pick(logits, sub, forced[:, n], has_forced[:, n], sampling,
                             None if landmarks is None else landmarks[1]))
    for i in range(b):
      if not has_forced[i, n] and not done[i]:
        out[i].append(int(token[i]))
        done[i] = int(token[i]) in stop or len(out[i]) >= max_new_tokens
    if done.all() or n == steps - 1:
      break
    logits, cache = step_call(graphdef, params, jnp.asarray(token),
                              jnp.full((b,), common + n, jnp.int32), cache)
  jax.block_until_ready(logits)
  return Generation(tokens=out, prefill_s=prefill_s, decode_s=time.perf_counter() - started,
                    decode_steps=n + 1, batch_size=b)
