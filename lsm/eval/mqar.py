"""Multi-query associative recall (MQAR) sweeps: accuracy against the number of key-value pairs
for one run, and across runs (e.g. Mamba-2 at several state sizes) one line per run.

Every sweep point is the run's ``mqar`` task (its ``data.task_options`` when it trained on mqar)
with ``num_pairs`` changed; the number of queries stays, so each point asks the same number of
questions of a fuller context. The headline number is the query accuracy (the fraction of
queried values recalled; ``token_accuracy``), as in Zoology (Arora et al. 2023); exact match
(every query of an example right) is kept too.
"""

from __future__ import annotations

from flax import nnx

from lsm.data import synthetic_task
from lsm.eval import plots
from lsm.eval.length import rope_overrides, task_options_for
from lsm.eval.scoring import Scoring
from lsm.models import count_params
from lsm.train import restore
from lsm.train.data import landmark_block_size, synthetic_eval_batches

SSM_MIXERS = ("s4", "s4d", "mamba", "mamba2")


def _check_pairs(pairs, options: dict, length: int) -> list[int]:
  if not isinstance(pairs, (list, tuple)) or not pairs or any(
      isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pairs):
    raise ValueError(f"evaluate_pairs: pairs must be a non-empty list of positive ints, got "
                     f"{pairs!r}")
  for n in pairs:
    try:
      synthetic_task("mqar", **{**options, "num_pairs": n}).check_seq_len(length)
    except (TypeError, ValueError) as error:
      raise ValueError(f"evaluate_pairs: {n} pairs do not fit the mqar task (options "
                       f"{options}) at {length} tokens: {error}") from None
  return list(pairs)


def evaluate_pairs(model: nnx.Module, config, *, pairs: list[int], length: int | None = None,
                   examples: int, batch_size: int, seed: int = 0,
                   task_options: dict | None = None, scoring: Scoring = Scoring(), mesh=None,
                   progress=print) -> list[dict]:
  """One row per number of pairs: MQAR at ``length`` tokens (default the training length; past
  it, give a model loaded with `rope_overrides`)."""
  length = config.data.seq_len if length is None else length
  options = task_options_for(config, "mqar") if task_options is None else dict(task_options)
  pairs = _check_pairs(pairs, options, length)
  rows = []
  for n in pairs:
    batches = synthetic_eval_batches("mqar", seq_len=length, seed=seed, examples=examples,
                                     batch_size=batch_size,
                                     task_options={**options, "num_pairs": n},
                                     landmark_block=landmark_block_size(config))
    row = {"num_pairs": n, "length": length, "scoring": scoring.name,
           **scoring(model, batches, mesh=mesh).row()}
    progress(f"mqar at {length} tokens, {n} pairs: query accuracy {row['token_accuracy']:.1%}, "
             f"exact match {row['exact_match']:.1%}")
    rows.append(row)
  return rows


def describe(config, model: nnx.Module | None = None) -> dict:
  """What a run's line is labelled with: its mixers, width, state size (SSM runs) and size."""
  pattern = list(config.model.layer_pattern)
  ssm = any(name in SSM_MIXERS for name in pattern)
  state = config.model.ssm.state_size if ssm else None
  label = "+".join(dict.fromkeys(pattern)) + f" d={config.model.d_model}"
  if ssm:
    label += f" N={state}"
  return {"label": label, "layer_pattern": pattern, "d_model": config.model.d_model,
          "state_size": state, "params": None if model is None else int(count_params(model))}


def evaluate_runs(run_dirs: list, *, pairs: list[int], length: int | None = None,
                  examples: int | None = None, rope_scaling: str | None = None,
                  overrides: list[str] = (), progress=print) -> list[dict]:
  """`evaluate_pairs` for each run directory (loaded with `lsm.train.restore.load_run` and the
  config ``overrides``): one result per run, its `describe` fields and its ``rows``. ``examples``
  and ``rope_scaling`` default to each run's ``eval.*``; its ``decode.cache_policy`` decides the
  scoring (`Scoring.of_config`) and its ``parallel.*`` the mesh."""
  if not isinstance(run_dirs, (list, tuple)) or not run_dirs:
    raise ValueError(f"evaluate_runs: run_dirs must be a non-empty list, got {run_dirs!r}")
  results = []
  for run in run_dirs:
    model, config, step = restore.load_run(run, list(overrides))
    at = config.data.seq_len if length is None else length
    extra = rope_overrides(config, at, rope_scaling or config.eval.rope_scaling)
    if extra:
      model = restore.load_run(run, [*overrides, *extra])[0]
    progress(f"# {run} (step {step}): {describe(config)['label']}")
    rows = evaluate_pairs(model, config, pairs=pairs, length=at,
                          examples=examples or config.eval.examples,
                          batch_size=config.eval.batch_size, seed=config.data.seed,
                          scoring=Scoring.of_config(config), mesh=restore.mesh_of(config),
                          progress=progress)
    results.append({"run": str(run), "step": step, **describe(config, model), "rows": rows})
  return results


def plot_pairs(results: list[dict], path, title: str):
  """Query accuracy against the number of pairs, one line per run."""
  lines = [(r["label"], [row["num_pairs"] for row in r["rows"]],
            [100 * row["token_accuracy"] for row in r["rows"]]) for r in results]
  return plots.line_plot(path, lines, xlabel="key-value pairs", ylabel="query accuracy (%)",
                         title=title, log2_x=True, ylim=(0, 102))


def plot_state_sizes(results: list[dict], path, title: str):
  """Query accuracy against state size, one line per number of pairs, over the runs with a state
  size (SSM mixers); None when fewer than two state sizes are there to compare."""
  with_state = sorted((r for r in results if r["state_size"] is not None),
                      key=lambda r: r["state_size"])
  if len({r["state_size"] for r in with_state}) < 2:
    return None
  pairs = sorted({row["num_pairs"] for r in with_state for row in r["rows"]})
  lines = []
  for n in pairs:
    points = [(r["state_size"], 100 * row["token_accuracy"]) for r in with_state
              for row in r["rows"] if row["num_pairs"] == n]
    lines.append((f"{n} pairs", [x for x, _ in points], [y for _, y in points]))
  return plots.line_plot(path, lines, xlabel="state size N (model.ssm.state_size)",
                         ylabel="query accuracy (%)", title=title, log2_x=True, ylim=(0, 102))
