"""Long-context evaluation: a synthetic task at several lengths, with a RoPE scaling beyond the
training length. Accuracy is exact match of the whole answer (teacher-forced argmax, which is what
greedy decoding produces when the answer is right) and per answer token."""

from __future__ import annotations

import jax
import numpy as np

from lsm.parallel import in_mesh
from lsm.train.data import landmark_block_size, synthetic_eval_batches
from lsm.train.step import Functional, loss_sums


def evaluate_lengths(load, config, *, task: str, lengths: list[int], examples: int,
                     batch_size: int, rope_scaling: str, seed: int = 0,
                     progress=print, mesh=None) -> list[dict]:
  """One row per length: ``load(overrides) -> model`` builds the model with a config override
  (the RoPE scaling for lengths past training); lengths <= training length use it unchanged.
  ``mesh``: evaluated with it set (context parallelism when it has a ``sequence`` axis)."""
  train_len = config.data.seq_len
  rows = []
  for length in lengths:
    overrides = []
    if length > train_len and rope_scaling != "none":
      overrides = [f"model.rope.scaling={rope_scaling}", f"model.rope.factor={length / train_len}",
                   f"model.rope.original_length={train_len}"]
    model = load(overrides)
    fn, params = Functional.of(model)

    @jax.jit
    def sums(params, batch):
      return loss_sums(fn.module(params), batch)

    if mesh is not None:
      sums = in_mesh(mesh, sums)

    totals = np.zeros(4)
    for batch in synthetic_eval_batches(task, seq_len=length, seed=seed, examples=examples,
                                        batch_size=batch_size,
                                        task_options=dict(config.data.task_options),
                                        landmark_block=landmark_block_size(config)):
      loss_sum, count, correct, exact = jax.device_get(sums(params, batch))
      totals += [loss_sum, count, correct, exact.sum()]
    row = {"length": length, "multiple": length / train_len, "examples": examples,
           "rope_scaling": rope_scaling if overrides else "none",
           "exact_match": totals[3] / examples, "token_accuracy": totals[2] / max(totals[1], 1),
           "loss": totals[0] / max(totals[1], 1)}
    progress(f"{task} at {length} tokens ({row['multiple']:g}x, rope {row['rope_scaling']}): "
             f"exact match {row['exact_match']:.1%}, token accuracy {row['token_accuracy']:.1%}")
    rows.append(row)
  return rows
