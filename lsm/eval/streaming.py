"""Streaming perplexity: a stream longer than the training length decoded token by token with a
KV cache policy, its per-token NLL averaged in position buckets (StreamingLLM, Xiao et al. 2023:
a window-only cache collapses once the first tokens leave it; keeping a few attention sinks
restores it).

Cache policies, by name (`policies_named`):

- ``full``: every mixer's own cache (dense attention caches of the whole stream) — the reference;
  its NLL is the teacher-forced forward pass's. Past the training length it sees positions it
  never trained on.
- ``window``: a ring cache of the last ``decode.sink_window.window`` tokens and no sinks
  (``SinkWindowPolicy(sink_tokens=0, ...)``), StreamingLLM's "window attention".
- ``sink_window``: ``decode.sink_window.sink_tokens`` sinks plus that window.
- any other ``decode.cache_policy`` (``heavy_hitter``, ``snapkv``, ``block_select``,
  ``block_memory``) with its ``decode.<name>`` section.

The stream (`token_streams`): for a text run the end of its corpus (the held-out rows come from
there), documents joined with their BOS / EOS; for a synthetic run, fresh examples of its task at
the training length, one after another (each starts with BOS). Positions are the true stream
positions. By default (``decode.sink_window.positions=stored``) the caches keep them, so the sinks
sit at RoPE distances up to the stream length; with ``positions=renumbered`` the ``window`` and
``sink_window`` caches read keys at positions within the cache, as StreamingLLM does. A policy's
``settings`` in the JSON record which.

Decoding runs ``chunk`` tokens per jitted call (a `lax.scan` of single-token `decode` steps with
the cache in the carry, donated between calls), compiled once per policy: the shapes never change.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm import data as lsm_data
from lsm.decode import cache_policy_of, landmark_layout
from lsm.eval import plots
from lsm.eval.length import task_options_for
from lsm.eval.scoring import empty_cache
from lsm.layers import SinkWindowPolicy
from lsm.train.data import synthetic_eval_batches

DECODE_POLICIES = ("block_memory", "sink_window", "heavy_hitter", "snapkv", "block_select")
POLICY_NAMES = ("full", "window", *DECODE_POLICIES)


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"streaming: {name} must be a positive int, got {value!r}")
  return int(value)


def policies_named(names: list[str], decode_config) -> dict:
  """``{name: policy}`` for each name of `POLICY_NAMES` (module docstring), read from
  ``decode_config`` (a `lsm.config.DecodeConfig`); ``full`` maps to None."""
  if not isinstance(names, (list, tuple)) or not names:
    raise ValueError(f"policies_named: names must be a non-empty list, got {names!r}")
  policies = {}
  for name in names:
    if name not in POLICY_NAMES:
      raise ValueError(f"policies_named: a policy must be one of {POLICY_NAMES}, got {name!r}")
    if name == "window":
      policies[name] = SinkWindowPolicy(sink_tokens=0, window=decode_config.sink_window.window)
    else:
      policies[name] = cache_policy_of(decode_config.model_copy(update={"cache_policy": name}))
  return policies


def token_streams(config, *, length: int, streams: int = 1, task: str | None = None,
                  seed: int = 0) -> np.ndarray:
  """``[streams, length + 1]`` int32 tokens of ``task`` (default the run's ``data.task``):
  ``text`` reads the end of ``data.files``; a synthetic task concatenates its examples at the
  training length (module docstring)."""
  length, streams = _positive("length", length), _positive("streams", streams)
  task = config.data.task if task is None else task
  needed = streams * (length + 1)
  if task == "text":
    d = config.data
    tokenizer = lsm_data.load_tokenizer(None if d.tokenizer == "byte" else d.tokenizer_path)
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    suffix = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    corpus = np.concatenate([prefix + tokenizer.encode(text) + suffix for text in
                             lsm_data.read_documents(d.files, jsonl_field=d.jsonl_field)])
    if corpus.size < needed:
      raise ValueError(f"token_streams: data.files hold {corpus.size} tokens, fewer than "
                       f"streams x (length + 1) = {needed}; give a shorter length or fewer "
                       f"streams")
    return corpus[corpus.size - needed:].reshape(streams, length + 1).astype(np.int32)
  row = config.data.seq_len + 1
  examples = -(-needed // row)
  batches = synthetic_eval_batches(task, seq_len=config.data.seq_len, seed=seed,
                                   examples=examples, batch_size=examples,
                                   task_options=task_options_for(config, task))
  tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
  return tokens[:needed].reshape(streams, length + 1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_chunk(graphdef, state, cache, inputs_BxC, targets_BxC, start):
  """Decodes ``inputs`` one token at a time from position ``start``: (cache, nll [B, C])."""

  def step(carry, xs):
    # The state rides in the carry: the model is merged at the scan body's trace level.
    state, cache = carry
    token_B, target_B, position = xs
    positions_Bx1 = jnp.broadcast_to(position, token_B.shape)[:, None]
    logits, cache = nnx.merge(graphdef, state).decode(token_B[:, None], positions=positions_Bx1,
                                                      cache=cache)
    logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
    return (state, cache), -jnp.take_along_axis(logp, target_B[:, None], axis=-1)[:, 0]

  positions = start + jnp.arange(inputs_BxC.shape[1], dtype=jnp.int32)
  (_, cache), nll_CxB = jax.lax.scan(step, (state, cache), (inputs_BxC.T, targets_BxC.T,
                                                            positions))
  return cache, nll_CxB.T


def stream_nll(model: nnx.Module, tokens, *, policy=None, chunk: int = 64, mesh=None,
               progress=print, label: str = "stream") -> np.ndarray:
  """``nll[s, i] = -log p(tokens[s, i + 1] | tokens[s, :i + 1])`` (float64 ``[S, L]``) for
  ``tokens [S, L + 1]``, decoded ``chunk`` tokens per call (``L`` a multiple of ``chunk``) with
  cache ``policy`` (None: each mixer's own cache). ``mesh``: decode with it set
  (``parallel.sequence`` shards a dense cache). Progress is reported about every 10%."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"stream_nll: tokens must be int [streams, length + 1] with length >= 1, "
                     f"got {tokens.dtype} {tokens.shape}")
  chunk = _positive("chunk", chunk)
  streams, length = tokens.shape[0], tokens.shape[1] - 1
  if length % chunk:
    raise ValueError(f"stream_nll: the stream length {length} must be a multiple of "
                     f"chunk={chunk}")
  if landmark_layout(model) is not None:
    raise ValueError("stream_nll: landmark models insert landmark tokens while decoding; "
                     "stream a model without landmark attention")
  graphdef, state = nnx.split(model)

  def run():
    cache = empty_cache(model, streams, length, policy)
    nll, reported, started = [], 0, time.perf_counter()
    for start in range(0, length, chunk):
      cache, part = _decode_chunk(graphdef, state, cache,
                                  jnp.asarray(tokens[:, start:start + chunk]),
                                  jnp.asarray(tokens[:, start + 1:start + chunk + 1]),
                                  jnp.int32(start))
      nll.append(np.asarray(part, np.float64))
      done = start + chunk
      if done == chunk:  # the first call compiles: rates count from its end
        compiled = time.perf_counter()
        speed = f"compiled and ran in {compiled - started:.1f}s"
      else:
        speed = f"{streams * (done - chunk) / (time.perf_counter() - compiled):,.0f} tokens/s"
      if done * 10 // length > reported or done == length:
        reported = done * 10 // length
        progress(f"{label}: {done}/{length} tokens, perplexity so far "
                 f"{np.exp(np.concatenate(nll, axis=1).mean()):.4g}, last {chunk}: "
                 f"{np.exp(nll[-1].mean()):.4g} ({speed})")
    return np.concatenate(nll, axis=1)

  if mesh is None:
    return run()
  with jax.set_mesh(mesh):
    return run()


def bucket_rows(nll, buckets: int) -> list[dict]:
  """Mean NLL and perplexity of ``nll [S, L]`` in ``buckets`` position ranges of (nearly) equal
  size; ``start``/``stop``: positions of the predicted tokens, ``[start, stop)``."""
  nll = np.asarray(nll, np.float64)
  buckets = _positive("buckets", buckets)
  if buckets > nll.shape[1]:
    raise ValueError(f"bucket_rows: buckets must be <= the {nll.shape[1]} predicted tokens, got "
                     f"{buckets}")
  edges = np.linspace(0, nll.shape[1], buckets + 1).round().astype(int)
  rows = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    mean = float(nll[:, lo:hi].mean())
    rows.append({"start": int(lo) + 1, "stop": int(hi) + 1, "tokens": int(nll[:, lo:hi].size),
                 "nll": mean, "perplexity": float(np.exp(mean))})
  return rows


def evaluate_streaming(model: nnx.Module, config, *, policies: dict, length: int,
                       streams: int = 1, chunk: int = 64, buckets: int = 16,
                       task: str | None = None, seed: int = 0, mesh=None,
                       progress=print) -> dict:
  """Streaming perplexity of ``model`` for each ``{name: policy}`` (`policies_named`) on the
  same ``[streams, length + 1]`` stream (`token_streams`): overall and per position bucket."""
  if not isinstance(policies, dict) or not policies:
    raise ValueError(f"evaluate_streaming: policies must be a non-empty dict of name: policy, "
                     f"got {policies!r}")
  _positive("buckets", buckets)
  tokens = token_streams(config, length=length, streams=streams, task=task, seed=seed)
  result = {"source": config.data.task if task is None else task, "length": length,
            "streams": streams, "chunk": chunk, "train_length": config.data.seq_len,
            "policies": []}
  for name, policy in policies.items():
    nll = stream_nll(model, tokens, policy=policy, chunk=chunk, mesh=mesh, progress=progress,
                     label=name)
    result["policies"].append({
        "name": name, "settings": None if policy is None else dataclasses.asdict(policy),
        "nll": float(nll.mean()), "perplexity": float(np.exp(nll.mean())),
        "buckets": bucket_rows(nll, buckets)})
  return result


def plot(result: dict, path, title: str):
  """Perplexity against position (bucket centres), one line per policy, log scale; the
  training length dotted."""
  def label(policy):
    settings = policy["settings"] or {}
    return policy["name"] + (" (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"
                             if settings else "")

  lines = [(label(p), [(b["start"] + b["stop"] - 1) / 2 for b in p["buckets"]],
            [b["perplexity"] for b in p["buckets"]]) for p in result["policies"]]
  return plots.line_plot(path, lines, xlabel="position in the stream",
                         ylabel="perplexity (log scale)", title=title, log_y=True,
                         vlines=[(result["train_length"], "training length")])
