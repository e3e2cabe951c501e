"""Long-context evaluation: a synthetic task at several lengths, with a RoPE scaling beyond the
training length. Accuracy is exact match of the whole answer and per answer token, teacher-forced
(`lsm.eval.scoring`): in one forward pass, or decoded with the config's cache policy."""

from __future__ import annotations

from lsm.eval.scoring import Scoring
from lsm.train.data import landmark_block_size, synthetic_eval_batches


def rope_overrides(config, length: int, rope_scaling: str) -> list[str]:
  """The config overrides that scale RoPE from the training length to ``length`` (none up to
  the training length, or for ``rope_scaling="none"``)."""
  train_len = config.data.seq_len
  if length <= train_len or rope_scaling == "none":
    return []
  return [f"model.rope.scaling={rope_scaling}", f"model.rope.factor={length / train_len}",
          f"model.rope.original_length={train_len}"]


def task_options_for(config, task: str) -> dict:
  """The knobs of ``task``: the config's ``data.task_options`` when it is the run's task, else
  the task's defaults (another task's knobs would not fit it)."""
  return dict(config.data.task_options) if task == config.data.task else {}


def evaluate_lengths(load, config, *, task: str, lengths: list[int], examples: int,
                     batch_size: int, rope_scaling: str, seed: int = 0, progress=print,
                     mesh=None, task_options: dict | None = None,
                     scoring: Scoring = Scoring()) -> list[dict]:
  """One row per length: ``load(overrides) -> model`` builds the model with a config override
  (the RoPE scaling for lengths past training); lengths <= training length use it unchanged.
  ``mesh``: evaluated with it set (context parallelism when it has a ``sequence`` axis).
  ``task_options``: the task's knobs (default `task_options_for`); ``scoring``: the forward
  pass or decoding with a cache policy."""
  train_len = config.data.seq_len
  options = task_options_for(config, task) if task_options is None else task_options
  rows = []
  for length in lengths:
    overrides = rope_overrides(config, length, rope_scaling)
    model = load(overrides)
    batches = synthetic_eval_batches(task, seq_len=length, seed=seed, examples=examples,
                                     batch_size=batch_size, task_options=options,
                                     landmark_block=landmark_block_size(config))
    row = {"length": length, "multiple": length / train_len,
           "rope_scaling": rope_scaling if overrides else "none", "scoring": scoring.name,
           **scoring(model, batches, mesh=mesh).row()}
    progress(f"{task} at {length} tokens ({row['multiple']:g}x, rope {row['rope_scaling']}): "
             f"exact match {row['exact_match']:.1%}, token accuracy {row['token_accuracy']:.1%}")
    rows.append(row)
  return rows
