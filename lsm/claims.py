"""``python -m lsm.claims configs/claims/<name>.yaml``: reproduce one paper claim at small scale.

A claim file names the paper's claim, the runs that test it (each a training config plus
overrides) and how to evaluate them. The command trains every run that is not finished yet
(rerunning resumes; finished runs are only evaluated), evaluates them, prints a table and writes
``<out>/<name>.json`` and ``<out>/<name>.png`` (``--out``, default ``benchmarks/results/claims``).

Claim file::

  name: selective_copy
  claim: "Mamba (selective) solves selective copying; S4D (time-invariant) does not."
  source: "Gu & Dao 2023, Mamba, section 4.1.1"
  runs:
    s4d: {config: configs/claims/selective_copy_base.yaml, overrides: ["model.layer_pattern=[s4d]"]}
    mamba: {config: configs/claims/selective_copy_base.yaml, overrides: [...]}
  evaluation:
    kind: lengths            # or: mqar_pairs, streaming
    lengths: [256]
    examples: 256

A run may add ``eval_overrides`` (config changes when evaluating, e.g. ``model.landmark.top_k=2``)
and its own ``rope_scalings``. ``corpus: {source: python_stdlib, megabytes: 4}`` writes a text
corpus every machine has (the running Python's standard-library sources) to
``<runs-dir>/<name>/corpus.txt`` and trains every run on it (``data.files``).

Evaluation kinds:

- ``lengths``: exact match and answer-token accuracy of each run's task at each length, once per
  RoPE scaling in ``rope_scalings`` (``none``, ``linear``, ``ntk``, ``yarn``; lengths up to the
  training length are always evaluated unscaled), and once per entry of ``sweep`` (task options
  merged over the run's, e.g. ``{num_pairs: 4, num_queries: 4}``; ``x`` names the option the plot
  puts on its x axis).
- ``streaming``: perplexity against position on one held-out stream of ``lengths[0]`` tokens
  (`lsm.eval.streaming`), once per entry of ``policies``: ``label: [policy, overrides...]`` with
  a policy of `lsm.eval.streaming.POLICY_NAMES` (``full``, ``window``, ``sink_window``, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shlex
import sys
import sysconfig
import time
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lsm.config import ConfigError, load_config

SCALINGS = ("none", "linear", "ntk", "yarn")


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


class RunSpec(_Strict):
  config: str
  overrides: list[str] = []
  rope_scalings: list[Literal["none", "linear", "ntk", "yarn"]] | None = None
  label: str | None = None  # how plots and tables name the run (default: its key)
  eval_overrides: list[str] = []  # config changes when evaluating, e.g. model.landmark.top_k=2


class Evaluation(_Strict):
  kind: Literal["lengths", "streaming"]
  task: str | None = None
  lengths: list[int] = Field(min_length=1)
  rope_scalings: list[Literal["none", "linear", "ntk", "yarn"]] = ["none"]
  examples: int = Field(128, ge=1)
  batch_size: int = Field(32, ge=1)
  metric: Literal["exact_match", "token_accuracy"] = "exact_match"
  # Task options to sweep (each a mapping merged over the run's data.task_options) and the
  # option the plot puts on its x axis (default: the length).
  sweep: list[dict[str, int | float]] = []
  x: str = "length"
  # streaming: {label: [policy name (lsm.eval.streaming.POLICY_NAMES), config overrides...]}
  policies: dict[str, list[str]] = {}
  streams: int = Field(4, ge=1)
  chunk: int = Field(64, ge=1)
  buckets: int = Field(16, ge=1)


class Corpus(_Strict):
  """A text corpus every machine has: the running Python's standard library sources, joined into
  one ``.txt`` file (``megabytes`` of them, files in sorted order) that every run trains on."""
  source: Literal["python_stdlib"]
  megabytes: float = Field(4.0, gt=0)


class Claim(_Strict):
  name: str
  claim: str
  source: str
  notes: str = ""
  corpus: Corpus | None = None
  runs: dict[str, RunSpec] = Field(min_length=1)
  evaluation: Evaluation


def load_claim(path) -> Claim:
  """The claim in YAML file ``path``; `ConfigError` naming the file and field when it is wrong."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"claim file {str(path)!r}: no such file (see configs/claims/)")
  tree = yaml.safe_load(path.read_text())
  try:
    claim = Claim.model_validate(tree)
  except ValidationError as error:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    raise ConfigError(f"claim file {str(path)!r}: {where}: {first['msg']} "
                      f"(got {first.get('input')!r})") from None
  for key, run in claim.runs.items():
    if not pathlib.Path(run.config).is_file():
      raise ConfigError(f"claim file {str(path)!r}: runs.{key}.config: no such file "
                        f"{run.config!r}")
  return claim


def corpus_path(claim: Claim, runs_dir: pathlib.Path) -> pathlib.Path:
  return runs_dir / claim.name / "corpus.txt"


def write_corpus(claim: Claim, runs_dir: pathlib.Path) -> pathlib.Path | None:
  """Writes the claim's corpus (if it has one and it is not written yet); returns its path."""
  if claim.corpus is None:
    return None
  path = corpus_path(claim, runs_dir)
  if path.is_file():
    return path
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  limit, parts, size = int(claim.corpus.megabytes * 2**20), [], 0
  for source in sorted(stdlib.glob("*.py")):
    text = source.read_text(encoding="utf-8", errors="replace")
    parts.append(text[:limit - size])
    size += len(parts[-1])
    if size >= limit:
      break
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text("\n\n".join(parts), encoding="utf-8")
  tmp.replace(path)
  return path


def run_overrides(claim: Claim, key: str, runs_dir: pathlib.Path, extra: list[str] = ()):
  """Run ``key``'s overrides, then the claim's corpus as ``data.files``, its name and run
  directory, then ``extra``."""
  corpus = [f"data.files=[{corpus_path(claim, runs_dir)}]"] if claim.corpus else []
  return [*claim.runs[key].overrides, *corpus, f"name={claim.name}-{key}",
          f"train.output_dir={runs_dir / claim.name / key}", *extra]


def run_config(claim: Claim, key: str, runs_dir: pathlib.Path, extra: list[str] = ()):
  """The training config of run ``key`` (its file with `run_overrides`)."""
  return load_config(claim.runs[key].config, run_overrides(claim, key, runs_dir, extra))


def train_runs(claim: Claim, runs_dir: pathlib.Path, extra: list[str] = (),
               progress=print) -> dict:
  """Trains (or resumes, or just finds finished) every run; {key: {step, seconds, eval}}."""
  from lsm.train.loop import train  # noqa: PLC0415 — jax only once the claim file is read
  out = {}
  for key in claim.runs:
    config = run_config(claim, key, runs_dir, extra)
    progress(f"[{claim.name}] run {key}: {config.train.steps} steps into {config.output_dir}")
    start = time.perf_counter()
    result = train(config)
    out[key] = {"step": result.step, "seconds": round(time.perf_counter() - start, 1),
                "final_eval": result.final_eval, "run_dir": str(config.output_dir)}
  return out


def evaluate_lengths_claim(claim: Claim, runs_dir: pathlib.Path, progress=print) -> list[dict]:
  """The ``lengths`` evaluation: one row per run, RoPE scaling and length."""
  from lsm.eval import evaluate_lengths  # noqa: PLC0415
  from lsm.train.restore import load_run, mesh_of  # noqa: PLC0415
  spec = claim.evaluation
  rows = []
  for key, run in claim.runs.items():
    run_dir = runs_dir / claim.name / key
    for options in spec.sweep or [{}]:
      sweep = [f"data.task_options.{k}={v}" for k, v in options.items()]
      _, config, _ = load_run(run_dir, [*run.eval_overrides, *sweep])
      task = spec.task or config.data.task
      for scaling in run.rope_scalings or spec.rope_scalings:
        lengths = spec.lengths if scaling == "none" else [
            n for n in spec.lengths if n > config.data.seq_len]
        if not lengths:
          continue
        found = evaluate_lengths(
            lambda overrides, run_dir=run_dir, run=run: load_run(
                run_dir, [*run.eval_overrides, *overrides])[0], config,
            task=task, lengths=lengths, examples=spec.examples, batch_size=spec.batch_size,
            rope_scaling=scaling, seed=config.data.seed + 1, mesh=mesh_of(config),
            progress=lambda line, key=key, o=options: progress(
                f"[{claim.name}] {key} {o or ''}: {line}"))
        for row in found:
          rows.append({"run": key, "label": run.label or key, "task": task,
                       "train_length": config.data.seq_len, "scaling": scaling,
                       "task_options": dict(config.data.task_options), **row})
  return rows


def _x(row: dict, name: str):
  return row["length"] if name == "length" else row["task_options"][name]


def plot_lengths(claim: Claim, rows: list[dict], path: pathlib.Path) -> pathlib.Path:
  """The metric against length (or the swept option), one line per run (and RoPE scaling)."""
  from lsm.eval import plots  # noqa: PLC0415
  metric, x = claim.evaluation.metric, claim.evaluation.x
  series = list(dict.fromkeys((r["label"], r["scaling"]) for r in rows))
  lines = []
  for label, scaling in series:
    mine = [r for r in rows if (r["label"], r["scaling"]) == (label, scaling)]
    if scaling != "none":  # a scaled line starts from the unscaled point at the training length
      mine = [r for r in rows if r["label"] == label and r["scaling"] == "none"
              and r["length"] <= r["train_length"]] + mine
    mine.sort(key=lambda r: _x(r, x))
    name = label if len({s for _, s in series}) == 1 else f"{label}, RoPE {scaling}"
    lines.append((name, [_x(r, x) for r in mine], [100 * r[metric] for r in mine]))
  vlines = [(n, "training length") for n in sorted({r["train_length"] for r in rows})]
  return plots.line_plot(
      path, lines, xlabel="sequence length (tokens)" if x == "length" else x.replace("_", " "),
      ylabel=f"{metric.replace('_', ' ')} (%)", title=claim.name.replace("_", " "),
      log2_x=len({_x(r, x) for r in rows}) > 1, ylim=(0, 102),
      vlines=vlines if x == "length" else ())


def table_lengths(claim: Claim, rows: list[dict]) -> str:
  swept = sorted({k for options in claim.evaluation.sweep for k in options})
  lines = ["| run | RoPE scaling | length | " + "".join(f"{k} | " for k in swept)
           + "exact match | answer-token accuracy |",
           "|---|---|---:|" + "---:|" * len(swept) + "---:|---:|"]
  for r in rows:
    lines.append(f"| {r['label']} | {r['scaling']} | {r['length']} | "
                 + "".join(f"{r['task_options'][k]} | " for k in swept)
                 + f"{r['exact_match']:.1%} | {r['token_accuracy']:.1%} |")
  return "\n".join(lines)


def evaluate_streaming_claim(claim: Claim, runs_dir: pathlib.Path, progress=print) -> list[dict]:
  """The ``streaming`` evaluation: per run, perplexity against position for each labelled cache
  policy (`lsm.eval.streaming`), all on the same held-out stream."""
  from lsm.eval import streaming  # noqa: PLC0415
  from lsm.train.restore import load_run, mesh_of  # noqa: PLC0415
  spec = claim.evaluation
  if not spec.policies:
    raise ConfigError(f"claim {claim.name}: evaluation.policies must name at least one policy")
  rows = []
  for key, run in claim.runs.items():
    model, _, _ = load_run(runs_dir / claim.name / key, run.eval_overrides)
    for label, (name, *overrides) in spec.policies.items():
      _, config, _ = load_run(runs_dir / claim.name / key, [*run.eval_overrides, *overrides])
      try:
        policy = streaming.policies_named([name], config.decode)[name]
      except ValueError as error:
        raise ConfigError(f"claim {claim.name}: evaluation.policies.{label}: {error}") from None
      result = streaming.evaluate_streaming(
          model, config, policies={label: policy}, length=spec.lengths[0], streams=spec.streams,
          chunk=spec.chunk, buckets=spec.buckets, mesh=mesh_of(config),
          progress=lambda line, key=key: progress(f"[{claim.name}] {key}: {line}"))
      rows.append({"run": key, "label": run.label or key, "policy": label, "name": name,
                   "train_length": config.data.seq_len, "length": spec.lengths[0],
                   **result["policies"][0]})
  return rows


def plot_streaming(claim: Claim, rows: list[dict], path: pathlib.Path) -> pathlib.Path:
  from lsm.eval import plots  # noqa: PLC0415
  several = len({r["run"] for r in rows}) > 1
  lines = [((f"{r['label']}: " if several else "") + r["policy"],
            [(b["start"] + b["stop"] - 1) / 2 for b in r["buckets"]],
            [b["perplexity"] for b in r["buckets"]]) for r in rows]
  return plots.line_plot(path, lines, xlabel="position in the stream",
                         ylabel="perplexity (log scale)", title=claim.name.replace("_", " "),
                         log_y=True, vlines=[(rows[0]["train_length"], "training length")])


def table_streaming(claim: Claim, rows: list[dict]) -> str:
  buckets = rows[0]["buckets"]
  lines = ["| positions | " + " | ".join(r["policy"] for r in rows) + " |",
           "|---|" + "---:|" * len(rows)]
  for i, b in enumerate(buckets):
    lines.append(f"| {b['start']}-{b['stop'] - 1} | "
                 + " | ".join(f"{r['buckets'][i]['perplexity']:.3g}" for r in rows) + " |")
  lines.append("| all | " + " | ".join(f"{r['perplexity']:.3g}" for r in rows) + " |")
  return "\n".join(lines)


EVALUATIONS = {"lengths": (evaluate_lengths_claim, plot_lengths, table_lengths),
               "streaming": (evaluate_streaming_claim, plot_streaming, table_streaming)}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.claims", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("claim", help="a claim file, e.g. configs/claims/selective_copy.yaml")
  parser.add_argument("--out", default="benchmarks/results/claims",
                      help="where the JSON and PNG go (default: benchmarks/results/claims)")
  parser.add_argument("--runs-dir", default="runs/claims",
                      help="where the runs train (default: runs/claims/<name>/<run>)")
  parser.add_argument("--dry-run", action="store_true",
                      help="check the claim file and print the training commands; train nothing")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config changes for every run, e.g. train.steps=50 (a quick check)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="# %(message)s")
  runs_dir = pathlib.Path(args.runs_dir)
  try:
    claim = load_claim(args.claim)
    for key in claim.runs:
      run_config(claim, key, runs_dir, args.overrides)
    print(f"# claim {claim.name}: {claim.claim}\n# source: {claim.source}")
    if args.dry_run:
      for key, run in claim.runs.items():
        print(shlex.join(["python", "-m", "lsm.train", "--config", run.config,
                          *run_overrides(claim, key, runs_dir, args.overrides)]))
      return 0
    write_corpus(claim, runs_dir)
    trained = train_runs(claim, runs_dir, args.overrides)
    evaluate, plot, table = EVALUATIONS[claim.evaluation.kind]
    rows = evaluate(claim, runs_dir)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / f"{claim.name}.json"
  json_path.write_text(json.dumps({
      "claim": claim.model_dump(), "command": f"python -m lsm.claims {args.claim}",
      "overrides": args.overrides, "runs": trained, "rows": rows}, indent=1) + "\n")
  png = plot(claim, rows, out / f"{claim.name}.png")
  print(table(claim, rows))
  print(f"# wrote {json_path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
