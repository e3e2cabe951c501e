"""``python -m lsm.evaluate --run runs/<name> [--task passkey] [--lengths 256,512,1024]``.

Evaluates a trained run on a synthetic task at several lengths (default: the config's
``eval.length_multipliers`` of the training length), with ``eval.rope_scaling`` past the training
length; prints a table and writes ``eval-<task>.json`` in the run directory.

``--kv-budgets 16,32,64`` instead decodes the task's answers with each fixed-budget cache policy
(``--policies``, default all of `lsm.eval.kv_budget.POLICIES`) at each budget, at one length
(``--lengths``, default the training length), next to the full cache; writes
``eval-kv-budget-<task>.json`` and a PNG of exact match against budget.
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
  parser.add_argument("--kv-budgets", type=_lengths,
                      help="accuracy against KV budget instead, e.g. 16,32,64")
  parser.add_argument("--policies", help="with --kv-budgets: comma-separated cache policies")
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
    if args.kv_budgets:
      return _kv_budgets(args, model, config, step, task, lengths, examples)
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


def _kv_budgets(args, model, config, step, task, lengths, examples) -> int:
  from lsm.eval import kv_budget  # noqa: PLC0415
  policies = kv_budget.POLICIES if not args.policies else tuple(
      p.strip() for p in args.policies.split(",") if p.strip())
  unknown = [p for p in policies if p not in kv_budget.POLICIES]
  if unknown:
    raise ConfigError(f"--policies: {unknown[0]!r} is not one of {kv_budget.POLICIES}")
  length = (args.lengths or [config.data.seq_len])[0]
  if args.lengths and len(args.lengths) > 1:
    raise ConfigError(f"--lengths: give one length with --kv-budgets, got {args.lengths}")
  for name in policies:
    for budget in args.kv_budgets:
      try:
        kv_budget.policy_for(name, budget)
      except ValueError as error:
        raise ConfigError(f"--kv-budgets: {error}") from None
  print(f"# {args.run} (step {step}): {task} at {length} tokens, {examples} examples, KV budgets "
        f"{args.kv_budgets} for {', '.join(policies)}")
  rows = kv_budget.evaluate_budgets(model, config, task=task, length=length,
                                    budgets=args.kv_budgets, policies=policies, examples=examples,
                                    batch_size=config.eval.batch_size, seed=config.data.seed)
  out = pathlib.Path(args.run) / f"eval-kv-budget-{task}.json"
  out.write_text(json.dumps({"run": str(args.run), "step": step, "task": task, "length": length,
                             "rows": rows}, indent=1) + "\n")
  png = kv_budget.plot(rows, out.with_suffix(".png"),
                       f"{task} at {length} tokens: exact match vs KV budget")
  print("| policy | budget | exact match | token accuracy |\n|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['policy']} | {r['budget']} | {r['exact_match']:.1%} | "
          f"{r['token_accuracy']:.1%} |")
  print(f"# wrote {out} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
