"""``python -m lsm.bench memory``: per-token decode time and cache memory against context length
for the memory methods (landmark attention, recurrent memory, block memory) and full attention.

Each method is a small LM (the same widths for all) decoding with its own cache. For every context
n the cache is prefilled with n random tokens (chunks through ``model.decode``, the same path
generation uses), then one jitted single-token step is timed; steps are timed interleaved across
methods and contexts so machine drift hits all alike; the cache is donated and each step decodes
from the cache the previous one returned, as in generation. Compile time is excluded. The baseline is
full attention with a dense cache at the same context, measured in the same run. Also reported:
the bytes of each cache and how many keys one decoded token attends per layer (the method's
budget; full attention: the whole context).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm import layers, models
from lsm.bench import common
from lsm.config import Config

D_MODEL, HEADS, LAYERS, VOCAB = 128, 4, 2, 64
BLOCK_MEMORY = dict(sink_tokens=4, window=512, block_size=64, top_k=4, representatives=4)
LANDMARK = dict(block_size=64, top_k=4)
RMT = dict(slots=8, segment_length=256)


def _config(method: str) -> Config:
  model = dict(d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
               vocab_size=VOCAB)
  if method == "landmark":
    model.update(layer_pattern=["landmark"], landmark=LANDMARK)
  if method == "recurrent_memory":
    model.update(recurrent_memory=RMT)
  return Config.model_validate({"model": model})


def methods() -> dict[str, dict]:
  """name -> what it keeps per layer and how many keys a decoded token attends."""
  bm = layers.BlockMemoryPolicy(**BLOCK_MEMORY)
  return {
      "full attention": dict(policy=None, attended=lambda n: n),
      "block memory": dict(policy=bm, attended=lambda n: min(n, bm.budget(1))),
      # Own block, plus top_k retrieved blocks (each block_size tokens and its landmark), after
      # scoring every landmark (n / (block_size + 1) of them).
      "landmark": dict(policy=None, attended=lambda n: min(
          n, (LANDMARK["top_k"] + 1) * (LANDMARK["block_size"] + 1))),
      "recurrent_memory": dict(policy=None, attended=lambda n: min(
          n, 2 * RMT["slots"] + RMT["segment_length"])),
  }


def _model(method: str):
  config = _config(method)
  with nnx.use_eager_sharding(False):
    return models.build_model(config.model, vocab_size=VOCAB, rngs=nnx.Rngs(0))


def _prefill(model, cache, context: int, chunk: int, limit_s: float):
  graphdef, params = nnx.split(model)

  @jax.jit
  def fill(params, cache, tokens, start):
    positions = (start + jnp.arange(tokens.shape[1], dtype=jnp.int32))[None]
    return nnx.merge(graphdef, params).decode(tokens, positions=positions, cache=cache)[1]

  rng = np.random.default_rng(0)
  size = min(chunk, context)
  seen, started = 0, time.perf_counter()
  while seen < context:
    tokens = jnp.asarray(rng.integers(1, VOCAB, (1, size)), jnp.int32)
    cache = jax.block_until_ready(fill(params, cache, tokens, jnp.int32(seen)))
    seen += size
    if time.perf_counter() - started > limit_s and seen < context:
      break
  return cache, seen, time.perf_counter() - started


def run(args, progress=print) -> dict:
  table = methods()
  chosen = {name: table[name] for name in args.methods}
  cases = []
  for name, spec in chosen.items():
    model = _model(name)
    graphdef, params = nnx.split(model)

    def step(params, cache, token, position, graphdef=graphdef):
      return nnx.merge(graphdef, params).decode(token, positions=position, cache=cache)

    weights = models.count_params(model) - VOCAB * D_MODEL  # the embedding lookup is no matmul
    for n in args.contexts:
      cache = model.init_cache(1, n + args.rounds + 2, jnp.float32,
                               **({} if spec["policy"] is None else {"policy": spec["policy"]}))
      cache, seen, seconds = _prefill(model, cache, n, args.prefill_chunk, args.prefill_limit)
      progress(f"{name}: prefilled {seen} of {n} tokens in {seconds:.1f} s")
      token = jnp.ones((1, 1), jnp.int32)
      position = jnp.full((1, 1), seen, jnp.int32)
      # The cache is donated, as `lsm.decode.generate` does: each step updates it in place
      # instead of copying it, and the next round decodes from the cache the step returned.
      compiled = jax.jit(step, donate_argnums=1).lower(params, cache, token, position).compile()
      cases.append(dict(method=name, context=n, seen=seen, prefill_s=seconds, compiled=compiled,
                        args=(params, cache, token, position), runs=[],
                        cache_bytes=sum(x.nbytes for x in jax.tree.leaves(cache)),
                        attended=spec["attended"](seen),
                        # Matmul FLOPs of one token: the weights (unembedding included) and, per
                        # layer, q.k and p.v over the attended keys.
                        flops=2 * (weights + VOCAB * D_MODEL)
                        + LAYERS * 4 * spec["attended"](seen) * D_MODEL))
  for round_ in range(args.rounds + 1):  # round 0 warms up
    for case in cases:
      started = time.perf_counter()
      _, cache = jax.block_until_ready(case["compiled"](*case["args"]))
      case["args"] = (case["args"][0], cache, *case["args"][2:])
      if round_:
        case["runs"].append(time.perf_counter() - started)
  rows = []
  peak = common.matmul_peak(jnp.float32, n=args.matmul_n)
  for case in cases:
    base = next(c for c in cases if c["method"] == "full attention" and
                c["context"] == case["context"]) if "full attention" in chosen else None
    median = statistics.median(case["runs"])
    row = {k: case[k] for k in ("method", "context", "seen", "prefill_s", "cache_bytes",
                                "attended")}
    row.update(step_median_s=median, step_runs_s=case["runs"], flops=case["flops"],
               fraction_of_peak=case["flops"] / median / peak["flops_per_s"],
               vs_full_attention=(None if base is None else
                                  median / statistics.median(base["runs"])))
    rows.append(row)
    progress(f"{row['method']} at {row['seen']} tokens: {median * 1e3:.2f} ms per token, cache "
             f"{common.fmt_bytes(row['cache_bytes'])}, attends {row['attended']} keys")
  return {"benchmark": "memory", "machine": common.machine(), "argv": args.argv,
          "model": dict(d_model=D_MODEL, heads=HEADS, layers=LAYERS, vocab=VOCAB),
          "block_memory": BLOCK_MEMORY, "landmark": LANDMARK, "recurrent_memory": RMT,
          "matmul_peak": peak, "note": __doc__.split("\n\n", 1)[1].strip(), "rows": rows}


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"### Memory methods: decode step vs context ({m['cpu']}, {m['cpu_cores']} cores, "
           f"jax {m['jax']})", "",
           f"Command: `python -m lsm.bench {' '.join(result['argv'])}`. {LAYERS}-layer LMs, "
           f"d_model {D_MODEL}, {HEADS} heads, float32, batch 1. Block memory "
           f"{result['block_memory']}; landmark {result['landmark']}; recurrent memory "
           f"{result['recurrent_memory']}. Matmul peak measured in the same run: "
           f"{result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s.", "",
           "| method | context | step ms | vs full attention | % of matmul peak | cache | "
           "keys attended per token |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    ratio = "-" if r["vs_full_attention"] is None else f"{r['vs_full_attention']:.2f}x"
    lines.append(f"| {r['method']} | {r['seen']} | {r['step_median_s'] * 1e3:.2f} | {ratio} | "
                 f"{r['fraction_of_peak']:.2%} | {common.fmt_bytes(r['cache_bytes'])} | "
                 f"{r['attended']} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench memory", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run at tiny sizes (not for the README)")
  parser.add_argument("--methods", nargs="+", choices=sorted(methods()), default=list(methods()))
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--prefill-chunk", type=int, default=1024)
  parser.add_argument("--prefill-limit", type=float, default=300.0,
                      help="seconds of prefill per method and context; past it the prefill stops "
                           "and the row says how many tokens the cache saw")
  parser.add_argument("--rounds", type=int, default=30, help="timed steps per case")
  parser.add_argument("--matmul-n", type=int, default=2048, help="size of the peak matmul")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"))
  args = parser.parse_args(argv)
  args.argv = ["memory", *argv]
  if args.quick:
    args.contexts, args.prefill_chunk, args.rounds, args.matmul_n = [256, 1024], 256, 3, 256
  bad = [n for n in args.contexts if n < 1]
  if bad:
    parser.error(f"--contexts must be positive, got {bad}")
  result = run(args)
  path = common.write_json(args.out, "memory-quick" if args.quick else "memory-cpu", result)
  print(f"# wrote {path}")
  if not args.quick:
    common.replace_section(args.readme, f"memory-{result['machine']['backend']}",
                           markdown(result))
    print(f"# updated {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
