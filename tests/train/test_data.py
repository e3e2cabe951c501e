"""The training data of a landmark model: a landmark token after every block, one more token id."""

import numpy as np

from lsm.config import Config
from lsm.data import SYNTHETIC_VOCAB_SIZE
from lsm.train import data as train_data
from lsm.train.restore import vocab_size_of


def _config(pattern):
  return Config.model_validate({
      "model": {"layer_pattern": pattern, "landmark": {"block_size": 8}},
      "data": {"task": "passkey", "seq_len": 40, "batch_size": 2},
      "train": {"eval_batches": 1}})


def test_landmark_rows_and_vocabulary():
  config = _config(["landmark"])
  data = train_data.build(config)
  batch = next(data.iterator)
  landmark = SYNTHETIC_VOCAB_SIZE
  assert data.vocab_size == vocab_size_of(config) == SYNTHETIC_VOCAB_SIZE + 1
  tokens, positions, mask = (np.asarray(batch[k]) for k in ("tokens", "positions", "loss_mask"))
  assert tokens.shape == (2, 41 + 41 // 8)
  is_landmark = positions % 9 == 8
  assert np.all((tokens == landmark) == is_landmark) and is_landmark.sum() == 2 * (41 // 8)
  assert np.all(mask[is_landmark] == 0)
  for eval_batch in data.eval_batches:
    assert np.all((np.asarray(eval_batch["tokens"]) == landmark) ==
                  (np.asarray(eval_batch["positions"]) % 9 == 8))
  evaluated = train_data.synthetic_eval_batches("passkey", seq_len=80, seed=0, examples=2,
                                                batch_size=2, task_options={}, landmark_block=8)
  assert evaluated[0]["tokens"].shape == (2, 81 + 81 // 8)


def test_other_patterns_keep_their_rows():
  config = _config(["attention"])
  data = train_data.build(config)
  assert data.vocab_size == vocab_size_of(config) == SYNTHETIC_VOCAB_SIZE
  assert np.asarray(next(data.iterator)["tokens"]).shape == (2, 41)
