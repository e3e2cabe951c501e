"""Needle in a haystack over a grid: the needle at each depth (fraction of the context before it)
in sequences of each length, exact match per (depth, length) cell, drawn as a heatmap.

The task is one with a ``depth`` knob: ``kv_needle`` (the needle among distractor entries whose
keys differ from it in one symbol; a fraction ``depth`` of the filler and of the distractors
come before it) or ``passkey`` (no distractors). Lengths past the training length get the RoPE
scaling (`lsm.eval.length.rope_overrides`); answers are scored as in `lsm.eval.scoring`.
"""

from __future__ import annotations

import dataclasses
import numbers

from lsm.data import SYNTHETIC_TASKS
from lsm.eval import plots
from lsm.eval.length import rope_overrides, task_options_for
from lsm.eval.scoring import Scoring
from lsm.train.data import landmark_block_size, synthetic_eval_batches

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def depth_tasks() -> list[str]:
  """The synthetic tasks that can place their needle at a given depth."""
  return sorted(name for name, task in SYNTHETIC_TASKS.items()
                if "depth" in {field.name for field in dataclasses.fields(task)})


def check_depths(depths) -> list[float]:
  """``depths`` as floats, or a ValueError naming what is allowed."""
  if not isinstance(depths, (list, tuple)) or not depths or any(
      isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1 for d in depths):
    raise ValueError(f"evaluate_niah: depths must be a non-empty list of numbers in [0, 1], got "
                     f"{depths!r}")
  return [float(d) for d in depths]


def evaluate_niah(load, config, *, task: str, lengths: list[int], depths=DEPTHS, examples: int,
                  batch_size: int, rope_scaling: str, seed: int = 0,
                  task_options: dict | None = None, scoring: Scoring = Scoring(), mesh=None,
                  progress=print) -> list[dict]:
  """One row per (length, depth): ``load(overrides) -> model`` as in `evaluate_lengths`;
  ``task_options``: the task's other knobs (default `task_options_for`; ``depth`` is set per
  cell)."""
  if task not in depth_tasks():
    raise ValueError(f"evaluate_niah: task must be one with a depth knob ({depth_tasks()}), got "
                     f"{task!r}")
  depths = check_depths(depths)
  if not isinstance(lengths, (list, tuple)) or not lengths:
    raise ValueError(f"evaluate_niah: lengths must be a non-empty list of ints, got {lengths!r}")
  options = task_options_for(config, task) if task_options is None else dict(task_options)
  train_len = config.data.seq_len
  rows = []
  for length in lengths:
    overrides = rope_overrides(config, length, rope_scaling)
    model = load(overrides)
    for depth in depths:
      batches = synthetic_eval_batches(task, seq_len=length, seed=seed, examples=examples,
                                       batch_size=batch_size,
                                       task_options={**options, "depth": depth},
                                       landmark_block=landmark_block_size(config))
      row = {"length": length, "depth": depth, "multiple": length / train_len,
             "rope_scaling": rope_scaling if overrides else "none", "scoring": scoring.name,
             **scoring(model, batches, mesh=mesh).row()}
      progress(f"{task} at {length} tokens, depth {depth:g}: exact match "
               f"{row['exact_match']:.1%}, token accuracy {row['token_accuracy']:.1%}")
      rows.append(row)
  return rows


def plot(rows: list[dict], path, title: str):
  """Exact match (%) per cell: depths down, lengths across."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  cell = {(r["depth"], r["length"]): 100 * r["exact_match"] for r in rows}
  values = [[cell[d, n] for n in lengths] for d in depths]
  return plots.heatmap(path, values, rows=[f"{d:g}" for d in depths], columns=lengths,
                       xlabel="length (tokens)", ylabel="needle depth", title=title,
                       value_label="exact match (%)")
