"""``python -m lsm.generate --run runs/<name> --prompt "..." [--prompt ...] [key=value ...]``.

Loads the newest checkpoint of a run and continues each prompt (text runs: the prompt is text;
synthetic runs: space-separated token ids). Overrides set ``decode.*`` (and other) config keys,
e.g. ``decode.temperature=0.8 decode.top_p=0.9 decode.max_new_tokens=100``;
``decode.cache_policy=block_memory`` (with ``decode.block_memory.*``) decodes the attention
layers with a training-free block memory; ``sink_window``, ``heavy_hitter`` and ``snapkv`` (with
``decode.<policy>.*``) with a fixed-budget cache (docs/sparse.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lsm.config import ConfigError


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, help="the run directory (train.output_dir)")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="# %(message)s")
  from lsm import data as lsm_data  # noqa: PLC0415 — jax after argument parsing
  from lsm.decode import cache_policy_of, generate  # noqa: PLC0415
  from lsm.train.restore import load_run, mesh_of  # noqa: PLC0415
  import jax  # noqa: PLC0415
  try:
    model, config, step = load_run(args.run, args.overrides)
    text = config.data.task == "text"
    tokenizer = None
    if text:
      tokenizer = lsm_data.load_tokenizer(
          None if config.data.tokenizer == "byte" else config.data.tokenizer_path)
      prompts = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) +
                 tokenizer.encode(p) for p in args.prompt]
    else:
      try:
        prompts = [[int(t) for t in p.split()] for p in args.prompt]
      except ValueError:
        raise ConfigError("--prompt: a synthetic-task run takes space-separated token ids")
    d = config.decode
    stops = list(d.stop_tokens) or ([tokenizer.eos_id] if text and tokenizer.eos_id else [])
    with jax.set_mesh(mesh_of(config)):  # parallel.sequence=N shards the KV caches
      result = generate(model, prompts, max_new_tokens=d.max_new_tokens,
                        temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
                        stop_tokens=stops, prefill_chunk=d.prefill_chunk,
                        max_length=d.max_length, seed=args.seed,
                        cache_policy=cache_policy_of(d))
  except (ConfigError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  for prompt, new in zip(args.prompt, result.tokens):
    shown = tokenizer.decode(new) if text else " ".join(map(str, new))
    print(f"--- {prompt!r} ->\n{shown}")
  print(f"# step {step}; prefill {result.prefill_s:.2f}s; decode {result.decode_steps} steps, "
        f"{result.tokens_per_s:,.0f} tokens/s (batch {result.batch_size})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
