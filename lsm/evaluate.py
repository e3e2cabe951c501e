"""``python -m lsm.evaluate --run runs/<name> [--task passkey] [--lengths 256,512,1024]``.

Evaluates a trained run on a synthetic task at several lengths (default: the config's
``eval.length_multipliers`` of the training length), with ``eval.rope_scaling`` past the training
length; prints a table and writes ``eval-<task>.json`` in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from lsm.config import ConfigError


def _lengths(text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--lengths must be comma-separated ints, got {text!r}")
  if not values or min(values) < 2:
    raise argparse.ArgumentTypeError(f"--lengths must be ints >= 2, got {text!r}")
  return values


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, help="the run directory (train.output_dir)")
  parser.add_argument("--task", help="synthetic task (default: the run's data.task)")
  parser.add_argument("--lengths", type=_lengths, help="e.g. 256,512,1024")
  parser.add_argument("--examples", type=int, help="examples per length (default eval.examples)")
  parser.add_argument("--rope-scaling", choices=["none", "linear", "ntk", "yarn"],
                      help="RoPE scaling past the training length (default eval.rope_scaling)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config changes, e.g. parallel.sequence=8 (context parallelism)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="# %(message)s")
  from lsm.eval import evaluate_lengths  # noqa: PLC0415 — jax after argument parsing
  from lsm.train.restore import load_run, mesh_of  # noqa: PLC0415
  try:
    model, config, step = load_run(args.run, args.overrides)
    task = args.task or config.data.task
    if task == "text":
      raise ConfigError("--task: the run trained on text; give a synthetic --task to evaluate")
    lengths = args.lengths or [int(round(m * config.data.seq_len))
                               for m in config.eval.length_multipliers]
    examples = args.examples or config.eval.examples
    rope = args.rope_scaling or config.eval.rope_scaling
    print(f"# evaluating {args.run} (step {step}) on {task}, {examples} examples per length")
    rows = evaluate_lengths(
        lambda overrides: load_run(args.run, [*args.overrides, *overrides])[0], config,
        task=task, lengths=lengths, examples=examples, batch_size=config.eval.batch_size,
        rope_scaling=rope, seed=config.data.seed, mesh=mesh_of(config))
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.run) / f"eval-{task}.json"
  out.write_text(json.dumps({"run": str(args.run), "step": step, "task": task, "rows": rows},
                            indent=1) + "\n")
  print("| length | x train | RoPE | exact match | token accuracy |\n|---:|---:|---|---:|---:|")
  for r in rows:
    print(f"| {r['length']} | {r['multiple']:g} | {r['rope_scaling']} | "
          f"{r['exact_match']:.1%} | {r['token_accuracy']:.1%} |")
  run = pathlib.Path(args.run)
  print(f"# wrote {out}\n# checkpoints: {run / 'checkpoints'}\n# logs: {run / 'metrics.jsonl'} "
        f"and {run / 'tensorboard'} (tensorboard --logdir {run / 'tensorboard'})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
