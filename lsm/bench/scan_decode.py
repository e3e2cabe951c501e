"""Decode-step cost of the state-space layers against the context their cache has seen.

A layer's cache is its recurrence (conv window and scan state), so one decoding step costs the
same after 1k or 1M tokens. Measured as: for each context n, prefill n random-input tokens
through the layer in chunks, each a call with the cache (the layer's own prefill path: the chunked
scan op for Mamba and Mamba2, an FFT convolution for S4D, the cache carried between calls), then
time one jitted single-token step with that cache. The step is compiled once and the same
executable is called with every context's cache (it would refuse a cache of another shape), and
the steps are timed interleaved across contexts so that machine drift hits all of them alike.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.layers.mamba import Mamba, Mamba2
from lsm.layers.s4 import S4D
from lsm.train.step import Functional

D_MODEL = 128
LAYERS = {
    "Mamba2": (Mamba2, dict(state_size=64, expand=2, head_dim=32, num_groups=1, chunk_size=64)),
    "Mamba": (Mamba, dict(state_size=16, expand=2, chunk_size=64)),
    "S4D": (S4D, dict(state_size=64)),
}
NOTE = ("one jitted single-token step with a cache that has seen the context, compiled once and "
        "called with each context's cache; each cache got its context by prefilling that many "
        "random-input tokens through the layer in chunks, each a call with the cache (the layer's "
        "own prefill path); step times are medians of steps interleaved across contexts")


def _layer(name: str):
  cls, kwargs = LAYERS[name]
  return cls(D_MODEL, rngs=nnx.Rngs(0), **kwargs)


def _sizes(name: str) -> dict:
  return dict(d_model=D_MODEL, **LAYERS[name][1])


def prefill(fn, params, cache, *, context: int, chunk: int, limit_s: float) -> dict:
  """Feed ``context`` tokens in chunks of ``min(chunk, context)``; stops early past ``limit_s``
  seconds. Returns the cache, the tokens it saw and the time (compile excluded)."""
  size = min(chunk, context)
  key = jax.random.key(1)

  def fill(params, cache, start):
    x_BTD = jax.random.normal(jax.random.fold_in(key, start), (1, size, D_MODEL), jnp.float32)
    positions = (start + jnp.arange(size, dtype=jnp.int32))[None]
    return fn.module(params)(x_BTD, positions=positions, cache=cache)[1]

  compiled = jax.jit(fill).lower(params, cache, jnp.int32(0)).compile()
  seen, started = 0, time.perf_counter()
  while seen < context:
    cache = jax.block_until_ready(compiled(params, cache, jnp.int32(seen)))
    seen += size
    if time.perf_counter() - started > limit_s and seen < context:
      break
  seconds = time.perf_counter() - started
  return {"cache": cache, "seen": seen, "seconds": seconds, "chunk": size,
          "stopped_early": seen < context}


def decode_rows(layers, contexts, *, chunk: int, prefill_limit: float, rounds: int,
                progress) -> list[dict]:
  out = []
  for name in layers:
    layer = _layer(name)
    fn, params = Functional.of(layer)
    filled = []
    for n in contexts:
      f = prefill(fn, params, layer.init_cache(1, n), context=n, chunk=chunk,
                  limit_s=prefill_limit)
      finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(f["cache"])
                   if jnp.issubdtype(leaf.dtype, jnp.inexact))
      filled.append(dict(f, context=n, finite=finite))
      progress(f"{name}: prefilled {f['seen']} of {n} tokens in {f['seconds']:.1f} s "
               f"({f['seen'] / f['seconds']:,.0f} tokens/s, chunks of {f['chunk']})"
               + (" - stopped at the time limit" if f["stopped_early"] else ""))

    def step(params, cache, x_BTD, position):
      return fn.module(params)(x_BTD, positions=position[None, None], cache=cache)

    x_BTD = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, D_MODEL)), jnp.float32)
    positions = [jnp.int32(f["seen"]) for f in filled]
    compiled = jax.jit(step).lower(params, filled[0]["cache"], x_BTD, positions[0]).compile()
    times = [[] for _ in filled]
    for _ in range(rounds + 1):  # the first round warms up
      for f, position, runs in zip(filled, positions, times):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, f["cache"], x_BTD, position))
        runs.append(time.perf_counter() - start)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(filled[0]["cache"]))
    rows = []
    for f, runs in zip(filled, times):
      rows.append({"context": f["context"], "context_reached": f["seen"],
                   "prefill_s": f["seconds"], "prefill_chunk": f["chunk"],
                   "prefill_tokens_per_s": f["seen"] / f["seconds"],
                   "stopped_early": f["stopped_early"], "state_finite": f["finite"],
                   "step": {"median_s": statistics.median(runs[1:]), "runs_s": runs[1:],
                            "warmup": 1}})
      progress(f"{name}: decode step after {f['seen']} tokens: "
               f"{rows[-1]['step']['median_s'] * 1e6:.0f} us (median of {rounds})")
    out.append({"layer": name, "sizes": _sizes(name), "state_bytes": state_bytes,
                "contexts": rows})
  return out


def markdown(layers: list[dict], note: str) -> str:
  lines = [f"**Decoding** ({note}):", "",
           "| layer | sizes | cache bytes | context | prefilled tokens | prefill s | "
           "prefill tokens/s | decode step µs | vs first context |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for layer in layers:
    sizes = ", ".join(f"{k}={v}" for k, v in layer["sizes"].items())
    first = layer["contexts"][0]["step"]["median_s"]
    for r in layer["contexts"]:
      reached = f"{r['context_reached']}" + (" (time limit)" if r["stopped_early"] else "")
      lines.append(f"| {layer['layer']} | {sizes} | {layer['state_bytes']:,} | "
                   f"{r['context']} | {reached} | {r['prefill_s']:.1f} | "
                   f"{r['prefill_tokens_per_s']:,.0f} | {r['step']['median_s'] * 1e6:.0f} | "
                   f"{r['step']['median_s'] / first:.3f}x |")
  return "\n".join(lines)
