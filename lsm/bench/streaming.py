"""``python -m lsm.bench streaming``: decode a very long stream (1M tokens by default) with a
fixed-budget sink + window cache and show that memory stays flat.

A small LM decodes greedily from its own output, ``--chunk`` tokens per jitted call (a
`lax.scan` over single-token `decode` steps with the cache in the carry, donated between calls so
it is updated in place). After every call the script records the process's resident memory
(``VmRSS``), the bytes of the cache, the tokens decoded so far and the rate; a PNG plots memory
and rate against tokens decoded. The model is untrained: the benchmark measures the cache's
memory and speed, not text quality.

By default the cache is the ``sink_window`` policy (`lsm.layers.SinkWindowPolicy`) on a model
with plain attention, as a user would decode any attention model; ``--layer-window`` instead uses
a model whose attention layers have the window themselves (a ring cache).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm import models
from lsm.bench import common
from lsm.config import Config

D_MODEL, HEADS, LAYERS, VOCAB = 64, 4, 2, 256


def resident_bytes() -> int:
  """The process's resident memory now (VmRSS), in bytes."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("cannot read VmRSS from /proc/self/status")


def build(window: int, sink_tokens: int, layer_window: bool):
  """(model, init_cache) for the stream."""
  attention = dict(window=window, sink_tokens=sink_tokens) if layer_window else {}
  config = Config.model_validate({"model": dict(
      d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
      vocab_size=VOCAB, attention=attention)})
  with nnx.use_eager_sharding(False):
    model = models.build_model(config.model, vocab_size=VOCAB, rngs=nnx.Rngs(0))
  if layer_window:
    return model, lambda: model.init_cache(1, window + sink_tokens, jnp.float32)
  from lsm.layers import SinkWindowPolicy  # noqa: PLC0415 — optional until the policy exists
  policy = SinkWindowPolicy(sink_tokens=sink_tokens, window=window)
  return model, lambda: model.init_cache(1, window + sink_tokens, jnp.float32, policy=policy)


def decoder(model, chunk: int):
  """A jitted ``(params, cache, token, position) -> (cache, token, position, tokens[chunk])``
  that decodes ``chunk`` tokens greedily from ``token`` at ``position``, donating the cache."""
  graphdef, params = nnx.split(model)

  def run(params, cache, token, position):
    def step(carry, _):
      # The parameters ride in the carry: the model is merged at the scan body's trace level.
      params, cache, token, position = carry
      lm = nnx.merge(graphdef, params)
      logits, cache = lm.decode(token[:, None], positions=position[:, None], cache=cache)
      token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
      return (params, cache, token, position + 1), token

    (_, cache, token, position), tokens = jax.lax.scan(
        step, (params, cache, token, position), None, length=chunk)
    return cache, token, position, tokens[:, 0]

  return params, jax.jit(run, donate_argnums=1)


def run(args, progress=print) -> dict:
  model, init_cache = build(args.window, args.sink_tokens, args.layer_window)
  params, step = decoder(model, args.chunk)
  cache = init_cache()
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  token = jnp.ones((1,), jnp.int32)
  position = jnp.zeros((1,), jnp.int32)
  started = time.perf_counter()
  compiled = step.lower(params, cache, token, position).compile()
  compile_s = time.perf_counter() - started
  rows, done = [], 0
  before = resident_bytes()
  while done < args.tokens:
    started = time.perf_counter()
    cache, token, position, tokens = jax.block_until_ready(
        compiled(params, cache, token, position))
    seconds = time.perf_counter() - started
    done += args.chunk
    rows.append(dict(tokens=done, seconds=seconds, tokens_per_s=args.chunk / seconds,
                     resident_bytes=resident_bytes(),
                     cache_bytes=sum(x.nbytes for x in jax.tree.leaves(cache)),
                     position=int(position[0]), checksum=int(np.sum(np.asarray(tokens, np.int64)))))
    progress(f"{done:>9} tokens: {args.chunk / seconds:8.0f} tokens/s, resident "
             f"{common.fmt_bytes(rows[-1]['resident_bytes'])}, cache "
             f"{common.fmt_bytes(rows[-1]['cache_bytes'])}")
  resident = [r["resident_bytes"] for r in rows]
  # Flat memory: after the first call (allocator warm-up) resident memory grows by less than
  # one cache's worth over the rest of the stream.
  later = resident[1:] or resident
  growth = max(later) - min(later)
  return {"benchmark": "streaming", "machine": common.machine(), "argv": args.argv,
          "cache": "layer window (ring cache)" if args.layer_window else "sink_window policy",
          "window": args.window, "sink_tokens": args.sink_tokens, "chunk": args.chunk,
          "model": dict(d_model=D_MODEL, heads=HEADS, layers=LAYERS, vocab=VOCAB),
          "compile_s": compile_s, "resident_before_bytes": before, "cache_bytes": cache_bytes,
          "resident_growth_after_first_call_bytes": growth,
          # What a dense cache of every decoded token would hold (keys and values, float32).
          "dense_cache_bytes_at_end": LAYERS * 2 * done * HEADS * (D_MODEL // HEADS) * 4,
          "flat": growth < max(cache_bytes, 16 * 2**20), "rows": rows}


def plot(result: dict, path: pathlib.Path) -> pathlib.Path:
  import matplotlib  # noqa: PLC0415 — optional dependency (the `plot` extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = result["rows"]
  tokens = np.array([r["tokens"] for r in rows]) / 1e3
  fig, (mem, rate) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  mem.plot(tokens, [r["resident_bytes"] / 2**20 for r in rows], label="process resident")
  mem.plot(tokens, [r["cache_bytes"] / 2**20 for r in rows], label="KV cache")
  mem.set_ylabel("MiB")
  mem.set_ylim(bottom=0)
  mem.legend()
  mem.set_title(f"Streaming decode, {result['cache']} (window {result['window']}, "
                f"{result['sink_tokens']} sinks)")
  rate.plot(tokens, [r["tokens_per_s"] for r in rows])
  rate.set_ylabel("tokens / s")
  rate.set_ylim(bottom=0)
  rate.set_xlabel("tokens decoded (thousands)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def markdown(result: dict) -> str:
  m, rows = result["machine"], result["rows"]
  rates = [r["tokens_per_s"] for r in rows]
  resident = [r["resident_bytes"] for r in rows]
  return "\n".join([
      f"### {m['cpu']} ({m['cpu_cores']} cores, {m['backend']}), jax {m['jax']}",
      "",
      f"Command: `python -m lsm.bench streaming {' '.join(result['argv'])}`. A "
      f"{result['model']['layers']}-layer LM (d_model {result['model']['d_model']}) decodes "
      f"{rows[-1]['tokens']:,} tokens greedily with the {result['cache']} (window "
      f"{result['window']}, {result['sink_tokens']} sinks), {result['chunk']:,} tokens per "
      f"jitted call.",
      "",
      "| tokens decoded | cache | dense cache would hold | process resident (first → last "
      "call) | growth after the first call | tokens/s (median, min–max) |",
      "|---:|---:|---:|---:|---:|---:|",
      f"| {rows[-1]['tokens']:,} | {common.fmt_bytes(result['cache_bytes'])} | "
      f"{common.fmt_bytes(result['dense_cache_bytes_at_end'])} | "
      f"{common.fmt_bytes(resident[0])} → {common.fmt_bytes(resident[-1])} | "
      f"{common.fmt_bytes(result['resident_growth_after_first_call_bytes'])} | "
      f"{sorted(rates)[len(rates) // 2]:,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) |",
      "",
      f"Memory {'stays flat' if result['flat'] else 'does NOT stay flat'} "
      f"(plot: `{result.get('png', 'the PNG next to the JSON')}`).",
  ])


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench streaming", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens to decode")
  parser.add_argument("--chunk", type=int, default=50_000, help="tokens per jitted call")
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--sink-tokens", type=int, default=4)
  parser.add_argument("--layer-window", action="store_true",
                      help="a model with windowed attention layers instead of the policy")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"),
                      help="where the table goes (runs of at least 1M tokens only)")
  args = parser.parse_args(argv)
  for name in ("tokens", "chunk", "window"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
  if args.sink_tokens < 0:
    parser.error(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
  args.argv = argv
  result = run(args)
  path = common.write_json(args.out, f"streaming-{jax.default_backend()}", result)
  png = plot(result, path.with_suffix(".png"))
  if args.tokens >= 1_000_000:
    result["png"] = str(png)
    common.replace_section(args.readme, "streaming", markdown(result))
  print(f"# resident memory grew by {common.fmt_bytes(result['resident_growth_after_first_call_bytes'])}"
        f" after the first call ({'flat' if result['flat'] else 'NOT flat'}); wrote {path} "
        f"and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
