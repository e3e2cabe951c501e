"""The data of a training run, from the ``data`` section of the config.

Rows hold ``data.seq_len + 1`` tokens, so the model reads exactly ``seq_len`` inputs. Synthetic
tasks draw held-out examples from another seed; text holds out the last rows of the packed corpus.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lsm import data as lsm_data
from lsm.config import Config, ConfigError

_EVAL_SEED_OFFSET = 1_000_003


def landmark_block_size(config: Config) -> int | None:
  """The landmark block size when ``model.layer_pattern`` has landmark attention, else None: the
  rows then get a landmark token (id = the data's vocabulary size) after every block."""
  return config.model.landmark.block_size if "landmark" in config.model.layer_pattern else None


def with_landmarks(dataset, *, block_size: int | None, vocab_size: int, rows: int):
  """``dataset`` with landmarks inserted into every row (unchanged for ``block_size`` None)."""
  if block_size is None:
    return dataset
  length = lsm_data.landmark_length(rows, block_size)
  return dataset.map(functools.partial(lsm_data.insert_landmarks, block_size=block_size,
                                       landmark_id=vocab_size, length=length))


@dataclasses.dataclass
class TrainingData:
  iterator: object  # grain iterator with get_state / set_state
  eval_batches: list[dict]
  vocab_size: int


def build(config: Config, *, shard_index: int = 0, shard_count: int = 1) -> TrainingData:
  d = config.data
  if d.batch_size % (shard_count * config.train.grad_accum):
    raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by the number of "
                      f"processes ({shard_count}) times train.grad_accum "
                      f"({config.train.grad_accum})")
  per_process = d.batch_size // shard_count
  eval_rows = config.train.eval_batches * per_process * shard_count
  rows = d.seq_len + 1
  try:
    if d.task == "text":
      tokenizer = lsm_data.load_tokenizer(None if d.tokenizer == "byte" else d.tokenizer_path)
      corpus = lsm_data.text_dataset(d.files, seq_len=rows, tokenizer=tokenizer,
                                     jsonl_field=d.jsonl_field)
      held_out = min(eval_rows, len(corpus) // 10)
      if len(corpus) - held_out < per_process:
        raise ConfigError(f"data.files: the corpus packs into {len(corpus)} rows of "
                          f"{rows} tokens, fewer than one batch of {per_process} plus held-out "
                          f"rows; add text or lower data.seq_len / data.batch_size")
      train_source, eval_source = corpus[:len(corpus) - held_out], corpus[len(corpus) - held_out:]
      vocab_size = tokenizer.vocab_size
    else:
      options = dict(d.task_options)
      train_source = lsm_data.synthetic_dataset(d.task, seq_len=rows, seed=d.seed, **options)
      eval_source = lsm_data.synthetic_dataset(d.task, seq_len=rows,
                                               seed=d.seed + _EVAL_SEED_OFFSET,
                                               num_examples=eval_rows, **options)
      vocab_size = lsm_data.SYNTHETIC_VOCAB_SIZE
  except (TypeError, ValueError) as error:
    if isinstance(error, ConfigError):
      raise
    raise ConfigError(f"data (task={d.task!r}, task_options={dict(d.task_options)}): "
                      f"{error}") from None
  block = landmark_block_size(config)
  train_source, eval_source = (with_landmarks(source, block_size=block, vocab_size=vocab_size,
                                              rows=rows) for source in (train_source, eval_source))
  if block is not None:
    vocab_size += 1  # the landmark token
  iterator = iter(lsm_data.make_dataset(train_source, batch_size=per_process, seed=d.seed,
                                        shard_index=shard_index, shard_count=shard_count))
  eval_batches = []
  if len(eval_source) >= per_process * shard_count:
    eval_batches = list(iter(lsm_data.make_dataset(
        eval_source, batch_size=per_process, seed=d.seed, shuffle=False, repeat=False,
        shard_index=shard_index, shard_count=shard_count)))
  return TrainingData(iterator=iterator, eval_batches=eval_batches, vocab_size=int(vocab_size))


def synthetic_eval_batches(task: str, *, seq_len: int, seed: int, examples: int,
                           batch_size: int, task_options: dict,
                           landmark_block: int | None = None) -> list[dict]:
  """Held-out batches of a synthetic task at any length (the evaluator's input); with
  ``landmark_block``, landmarks inserted as in training (``seq_len`` counts the task's tokens)."""
  source = lsm_data.synthetic_dataset(task, seq_len=seq_len + 1, seed=seed + _EVAL_SEED_OFFSET,
                                      num_examples=examples, **task_options)
  source = with_landmarks(source, block_size=landmark_block,
                          vocab_size=lsm_data.SYNTHETIC_VOCAB_SIZE, rows=seq_len + 1)
  batches = list(iter(lsm_data.make_dataset(source, batch_size=min(batch_size, examples),
                                            seed=seed, shuffle=False, repeat=False)))
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]
