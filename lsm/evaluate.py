"""``python -m lsm.evaluate --run runs/<name> [--task passkey] [--lengths 256,512,1024]``.

Evaluates a trained run on a synthetic task at several lengths (default: the config's
``eval.length_multipliers`` of the training length), with ``eval.rope_scaling`` past the training
length; prints a table and writes ``eval-<task>.json`` in the run directory (``--out``). Answers
are scored teacher-forced in one forward pass, or, with ``decode.cache_policy=<policy>``, decoded
with that cache. One mode instead of the length table:

``--niah-grid [--depths 0,0.25,0.5,0.75,1]``: needle in a haystack (``kv_needle`` or ``passkey``)
at each depth x length; ``eval-niah-<task>.json`` and a heatmap PNG.

``--mqar-pairs 4,8,16,32``: MQAR accuracy against the number of key-value pairs (at one length,
default the training length); ``--run`` may repeat (e.g. Mamba-2 at several state sizes): one
line per run in ``eval-mqar-pairs.png``, and ``eval-mqar-state.png`` against state size.

``--streaming-ppl [--policies full,window,sink_window]``: perplexity against position on a stream
of ``--lengths`` tokens (default the longest length multiple), decoded token by token with each
cache policy (default the run's ``decode.cache_policy``); ``eval-streaming-<data>.json`` and PNG.

``--kv-budgets 16,32,64``: the task's answers decoded with each fixed-budget cache policy
(``--policies``, default all of `lsm.eval.kv_budget.POLICIES`) at each budget, at one length
(``--lengths``, default the training length), next to the full cache; writes
``eval-kv-budget-<task>.json`` and a PNG of exact match against budget.

Overrides (``key=value``) change the run's config: ``parallel.data=1 parallel.sequence=8`` for
context parallelism, ``decode.cache_policy=sink_window decode.sink_window.window=256``, task knobs
with ``data.task_options.<knob>=...`` (for the run's own task). docs/evaluation.md has examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from lsm.config import ConfigError


def _ints(text: str, low: int = 1) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be comma-separated ints, got {text!r}")
  if not values or min(values) < low:
    raise argparse.ArgumentTypeError(f"must be ints >= {low}, got {text!r}")
  return values


def _lengths(text: str) -> list[int]:
  return _ints(text, low=2)


def _depths(text: str) -> list[float]:
  try:
    values = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}")
  if not values or not all(0 <= v <= 1 for v in values):
    raise argparse.ArgumentTypeError(f"must be numbers in [0, 1], got {text!r}")
  return values


def _names(text: str | None) -> list[str] | None:
  return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m lsm.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, action="append",
                      help="the run directory (train.output_dir); repeat with --mqar-pairs")
  parser.add_argument("--task", help="synthetic task (default: the run's data.task)")
  parser.add_argument("--lengths", type=_lengths, help="e.g. 256,512,1024")
  parser.add_argument("--examples", type=int, help="examples per length / cell / point "
                      "(default eval.examples)")
  parser.add_argument("--rope-scaling", choices=["none", "linear", "ntk", "yarn"],
                      help="RoPE scaling past the training length (default eval.rope_scaling; "
                      "with --streaming-ppl none unless given)")
  parser.add_argument("--out", help="directory for the JSON and PNG (default: the (first) run)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--kv-budgets", type=_ints,
                    help="accuracy against KV budget instead, e.g. 16,32,64")
  mode.add_argument("--niah-grid", action="store_true",
                    help="needle in a haystack over --depths x --lengths")
  mode.add_argument("--mqar-pairs", type=_ints, help="MQAR accuracy against pairs, e.g. 4,8,16")
  mode.add_argument("--streaming-ppl", action="store_true",
                    help="perplexity against position on a stream decoded with --policies")
  parser.add_argument("--depths", type=_depths, help="with --niah-grid (default 0,0.25,0.5,0.75,1)")
  parser.add_argument("--policies", help="with --kv-budgets or --streaming-ppl: comma-separated "
                      "cache policies")
  parser.add_argument("--streams", type=int, help="with --streaming-ppl: streams decoded side "
                      "by side, a batch (default 1)")
  parser.add_argument("--chunk", type=int,
                      help="with --streaming-ppl: tokens per jitted decoding call (default 64)")
  parser.add_argument("--buckets", type=int,
                      help="with --streaming-ppl: position buckets (default 16)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config changes, e.g. parallel.sequence=8 (context parallelism)")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="# %(message)s")
  try:
    if len(args.run) > 1 and not args.mqar_pairs:
      raise ConfigError(f"--run: give one run (several only with --mqar-pairs), got {args.run}")
    if args.depths and not args.niah_grid:
      raise ConfigError("--depths: only with --niah-grid")
    if args.policies and not (args.kv_budgets or args.streaming_ppl):
      raise ConfigError("--policies: only with --kv-budgets or --streaming-ppl")
    for flag in ("streams", "chunk", "buckets"):
      if getattr(args, flag) is not None and not args.streaming_ppl:
        raise ConfigError(f"--{flag}: only with --streaming-ppl")
    out = pathlib.Path(args.out or args.run[0])
    if args.mqar_pairs:
      return _mqar(args, out)
    from lsm.train.restore import load_run  # noqa: PLC0415 — jax after argument parsing
    model, config, step = load_run(args.run[0], args.overrides)
    if args.streaming_ppl:
      return _streaming(args, out, model, config, step)
    task = args.task or config.data.task
    from lsm.data import SYNTHETIC_TASKS  # noqa: PLC0415
    if task == "text":
      raise ConfigError("--task: the run trained on text; give a synthetic --task to evaluate")
    if task not in SYNTHETIC_TASKS:
      raise ConfigError(f"--task: must be one of {sorted(SYNTHETIC_TASKS)}, got {task!r}")
    lengths = args.lengths or [int(round(m * config.data.seq_len))
                               for m in config.eval.length_multipliers]
    examples = args.examples or config.eval.examples
    if args.kv_budgets:
      return _kv_budgets(args, out, model, config, step, task, examples)
    if args.niah_grid:
      return _niah(args, out, config, step, task, lengths, examples)
    return _length_table(args, out, config, step, task, lengths, examples)
  except ValueError as error:  # ConfigError, and arguments an evaluation rejects
    print(f"error: {error}", file=sys.stderr)
    return 2


def _load(args):
  from lsm.train.restore import load_run  # noqa: PLC0415
  return lambda overrides: load_run(args.run[0], [*args.overrides, *overrides])[0]


def _write(path: pathlib.Path, result: dict) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  return path


def _length_table(args, out, config, step, task, lengths, examples) -> int:
  from lsm.eval import Scoring, evaluate_lengths  # noqa: PLC0415
  from lsm.train.restore import mesh_of  # noqa: PLC0415
  scoring = Scoring.of_config(config)
  print(f"# evaluating {args.run[0]} (step {step}) on {task}, {examples} examples per length, "
        f"scored by {scoring.name}")
  rows = evaluate_lengths(_load(args), config, task=task, lengths=lengths, examples=examples,
                          batch_size=config.eval.batch_size,
                          rope_scaling=args.rope_scaling or config.eval.rope_scaling,
                          seed=config.data.seed, mesh=mesh_of(config), scoring=scoring)
  path = _write(out / f"eval-{task}.json",
                {"run": str(args.run[0]), "step": step, "task": task, "rows": rows})
  print("| length | x train | RoPE | exact match | token accuracy |\n|---:|---:|---|---:|---:|")
  for r in rows:
    print(f"| {r['length']} | {r['multiple']:g} | {r['rope_scaling']} | "
          f"{r['exact_match']:.1%} | {r['token_accuracy']:.1%} |")
  run = pathlib.Path(args.run[0])
  print(f"# wrote {path}\n# checkpoints: {run / 'checkpoints'}\n# logs: {run / 'metrics.jsonl'} "
        f"and {run / 'tensorboard'} (tensorboard --logdir {run / 'tensorboard'})")
  return 0


def _niah(args, out, config, step, task, lengths, examples) -> int:
  from lsm.eval import Scoring, niah  # noqa: PLC0415
  from lsm.train.restore import mesh_of  # noqa: PLC0415
  if task not in niah.depth_tasks():
    raise ConfigError(f"--niah-grid: the task {task!r} has no needle depth; give --task, one "
                      f"of {niah.depth_tasks()}")
  depths = args.depths or list(niah.DEPTHS)
  scoring = Scoring.of_config(config)
  print(f"# {args.run[0]} (step {step}): {task} needle at depths {depths} x lengths {lengths}, "
        f"{examples} examples per cell, scored by {scoring.name}")
  rows = niah.evaluate_niah(_load(args), config, task=task, lengths=lengths, depths=depths,
                            examples=examples, batch_size=config.eval.batch_size,
                            rope_scaling=args.rope_scaling or config.eval.rope_scaling,
                            seed=config.data.seed, scoring=scoring, mesh=mesh_of(config))
  path = _write(out / f"eval-niah-{task}.json",
                {"run": str(args.run[0]), "step": step, "task": task, "lengths": lengths,
                 "depths": depths, "rows": rows})
  png = niah.plot(rows, path.with_suffix(".png"),
                  f"{task}: exact match by needle depth and length (step {step})")
  print("| depth | " + " | ".join(str(n) for n in lengths) + " |\n|---:|"
        + "---:|" * len(lengths))
  for depth in depths:
    cells = {r["length"]: r["exact_match"] for r in rows if r["depth"] == depth}
    print(f"| {depth:g} | " + " | ".join(f"{cells[n]:.1%}" for n in lengths) + " |")
  print(f"# wrote {path} and {png}")
  return 0


def _mqar(args, out) -> int:
  from lsm.eval import mqar  # noqa: PLC0415
  if args.task not in (None, "mqar"):
    raise ConfigError(f"--mqar-pairs: evaluates the mqar task, got --task {args.task}")
  if args.lengths and len(args.lengths) > 1:
    raise ConfigError(f"--lengths: give one length with --mqar-pairs, got {args.lengths}")
  length = args.lengths[0] if args.lengths else None
  try:
    results = mqar.evaluate_runs(args.run, pairs=args.mqar_pairs, length=length,
                                 examples=args.examples, rope_scaling=args.rope_scaling,
                                 overrides=args.overrides)
  except ConfigError:
    raise
  except ValueError as error:  # pairs that do not fit the task
    raise ConfigError(f"--mqar-pairs: {error}") from None
  path = _write(out / "eval-mqar-pairs.json", {"pairs": args.mqar_pairs, "runs": results})
  png = mqar.plot_pairs(results, path.with_suffix(".png"), "MQAR: query accuracy vs pairs")
  state_png = mqar.plot_state_sizes(results, out / "eval-mqar-state.png",
                                    "MQAR: query accuracy vs state size")
  print("| run | " + " | ".join(f"{n} pairs" for n in args.mqar_pairs) + " |\n|---|"
        + "---:|" * len(args.mqar_pairs))
  for r in results:
    print(f"| {r['label']} | " + " | ".join(f"{row['token_accuracy']:.1%}" for row in r["rows"])
          + " |")
  print(f"# wrote {path}, {png}" + (f" and {state_png}" if state_png else ""))
  return 0


def _streaming(args, out, model, config, step) -> int:
  from lsm.eval import streaming  # noqa: PLC0415
  from lsm.eval.length import rope_overrides  # noqa: PLC0415
  from lsm.train.restore import load_run, mesh_of  # noqa: PLC0415
  if args.lengths and len(args.lengths) > 1:
    raise ConfigError(f"--lengths: give one stream length with --streaming-ppl, got "
                      f"{args.lengths}")
  length = args.lengths[0] if args.lengths else int(
      round(max(config.eval.length_multipliers) * config.data.seq_len))
  names = _names(args.policies) or [config.decode.cache_policy]
  try:
    policies = streaming.policies_named(names, config.decode)
  except ValueError as error:
    raise ConfigError(f"--policies: {error}") from None
  if args.rope_scaling:
    model = load_run(args.run[0], [*args.overrides,
                                   *rope_overrides(config, length, args.rope_scaling)])[0]
  streams, chunk = args.streams or 1, args.chunk or 64
  print(f"# {args.run[0]} (step {step}): streaming perplexity over {streams} x {length} tokens "
        f"of {args.task or config.data.task} (trained at {config.data.seq_len}), {chunk} tokens "
        f"per call, cache policies {', '.join(names)}")
  result = streaming.evaluate_streaming(model, config, policies=policies, length=length,
                                        streams=streams, chunk=chunk, buckets=args.buckets or 16,
                                        task=args.task, seed=config.data.seed,
                                        mesh=mesh_of(config))
  path = _write(out / f"eval-streaming-{result['source']}.json",
                {"run": str(args.run[0]), "step": step, **result})
  png = streaming.plot(result, path.with_suffix(".png"),
                       f"perplexity along a {length}-token stream (trained at "
                       f"{config.data.seq_len})")
  print("| positions | " + " | ".join(p["name"] for p in result["policies"]) + " |\n|---|"
        + "---:|" * len(result["policies"]))
  for i, b in enumerate(result["policies"][0]["buckets"]):
    print(f"| {b['start']}-{b['stop'] - 1} | "
          + " | ".join(f"{p['buckets'][i]['perplexity']:.4g}" for p in result["policies"]) + " |")
  print(f"# wrote {path} and {png}")
  return 0


def _kv_budgets(args, out, model, config, step, task, examples) -> int:
  from lsm.eval import kv_budget  # noqa: PLC0415
  from lsm.eval.length import task_options_for  # noqa: PLC0415
  policies = tuple(_names(args.policies) or kv_budget.POLICIES)
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
  print(f"# {args.run[0]} (step {step}): {task} at {length} tokens, {examples} examples, KV "
        f"budgets {args.kv_budgets} for {', '.join(policies)}")
  rows = kv_budget.evaluate_budgets(model, config, task=task, length=length,
                                    budgets=args.kv_budgets, policies=policies, examples=examples,
                                    batch_size=config.eval.batch_size, seed=config.data.seed,
                                    task_options=task_options_for(config, task))
  path = _write(out / f"eval-kv-budget-{task}.json",
                {"run": str(args.run[0]), "step": step, "task": task, "length": length,
                 "rows": rows})
  png = kv_budget.plot(rows, path.with_suffix(".png"),
                       f"{task} at {length} tokens: exact match vs KV budget")
  print("| policy | budget | exact match | token accuracy |\n|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['policy']} | {r['budget']} | {r['exact_match']:.1%} | "
          f"{r['token_accuracy']:.1%} |")
  print(f"# wrote {path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
