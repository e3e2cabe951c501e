"""Synthetic tasks as grain datasets: example ``i`` is a pure function of ``(seed, i)``."""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from lsm.data.packing import single_example_row
from lsm.data.synthetic_tasks import SYNTHETIC_TASKS, SyntheticTask


def synthetic_task(name: str, **difficulty) -> SyntheticTask:
  """The task called ``name`` (a key of `SYNTHETIC_TASKS`) with its difficulty knobs set."""
  if name not in SYNTHETIC_TASKS:
    raise ValueError(f"synthetic_task: task must be one of {sorted(SYNTHETIC_TASKS)}, "
                     f"got {name!r}")
  task_class = SYNTHETIC_TASKS[name]
  knobs = [field.name for field in dataclasses.fields(task_class)]
  unknown = sorted(set(difficulty) - set(knobs))
  if unknown:
    raise TypeError(f"synthetic_task: {name!r} has no difficulty argument {unknown[0]!r}; "
                    f"it takes {', '.join(knobs)}")
  return task_class(**difficulty)


class SyntheticSource:
  """A grain random-access source: ``source[i]`` is the row of example ``i`` of ``task``.

  ``len`` is ``num_examples``, or ``sys.maxsize`` (an endless stream of fresh examples) for None.
  """

  def __init__(self, task: SyntheticTask, *, seq_len: int, seed: int,
               num_examples: int | None = None):
    self.task = task
    self.seq_len = task.check_seq_len(seq_len)
    self.seed = seed
    self.num_examples = num_examples

  def __len__(self) -> int:
    return sys.maxsize if self.num_examples is None else self.num_examples

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
        0 <= index < len(self)):
      raise IndexError(f"SyntheticSource: index must be an int in [0, {len(self)}), got {index!r}")
    rng = np.random.default_rng([self.seed, int(index)])
    return single_example_row(*self.task.sample(rng, self.seq_len))

  def __repr__(self) -> str:
    return (f"SyntheticSource({self.task}, seq_len={self.seq_len}, seed={self.seed}, "
            f"num_examples={self.num_examples})")


def synthetic_dataset(task: str | SyntheticTask, *, seq_len: int, seed: int,
                      num_examples: int | None = None, **difficulty) -> grain.MapDataset:
  """A grain `MapDataset` of synthetic examples, each a row dict of ``[seq_len]`` arrays.

  Args:
    task: a task name (``"passkey"``, ``"mqar"``, ``"kv_needle"``, ``"selective_copy"``,
      ``"listops"``, ``"variable_tracking"``) or a task object (then no ``difficulty``
      arguments).
    seq_len: tokens per example (exactly); ask for 2x or 4x the training length to evaluate
      length generalisation.
    seed: a non-negative int; example ``i`` depends only on ``(seed, i)`` (and the task and
      ``seq_len``). Use different seeds for training and evaluation sets.
    num_examples: the dataset length; None: endless (``len`` is ``sys.maxsize``, every index a
      fresh example).
    **difficulty: the task's knobs, e.g. ``num_digits=5`` for passkey (see each task class).

  Returns:
    A `MapDataset` whose elements have ``tokens``, ``loss_mask`` (1.0 on the answer tokens),
    ``segment_ids`` (all 1) and ``positions`` (``arange``).
  """
  if isinstance(task, str):
    task = synthetic_task(task, **difficulty)
  elif isinstance(task, SyntheticTask):
    if difficulty:
      raise TypeError(f"synthetic_dataset: difficulty arguments {sorted(difficulty)} can only "
                      f"go with a task name; task is already the object {task}")
  else:
    raise TypeError(f"synthetic_dataset: task must be a task name or a SyntheticTask, got "
                    f"{type(task).__name__}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"synthetic_dataset: seed must be a non-negative int, got {seed!r}")
  if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(
      num_examples, (int, np.integer)) or num_examples < 1):
    raise ValueError(f"synthetic_dataset: num_examples must be a positive int or None, got "
                     f"{num_examples!r}")
  return grain.MapDataset.source(SyntheticSource(task, seq_len=seq_len, seed=int(seed),
                                                 num_examples=num_examples))
