"""answer_accuracy: exact match and token accuracy over the loss-mask positions."""

import numpy as np
import pytest

from lsm.data import answer_accuracy, make_dataset, synthetic_dataset


def test_scores_only_the_answer_positions():
  tokens = np.asarray([[1, 5, 6, 7, 8],
                       [1, 5, 6, 7, 8],
                       [1, 5, 6, 7, 8]])
  loss_mask = np.asarray([[0, 0, 0, 1, 1],
                          [0, 0, 0, 1, 1],
                          [0, 0, 0, 0, 0]], np.float32)
  predictions = np.asarray([[0, 0, 7, 8],    # answers right, the rest wrong: exact
                            [5, 6, 7, 0],    # last answer token wrong
                            [5, 6, 7, 8]])   # no answer to score
  scores = answer_accuracy(predictions, tokens, loss_mask)
  np.testing.assert_array_equal(scores["exact_match"], [1.0, 0.0, np.nan])
  np.testing.assert_array_equal(scores["token_accuracy"], [1.0, 0.5, np.nan])
  np.testing.assert_array_equal(scores["answer_tokens"], [2, 2, 0])


def test_perfect_and_shifted_predictions_on_a_task():
  batch = next(iter(make_dataset(synthetic_dataset("kv_needle", seq_len=256, seed=0),
                                 batch_size=8, seed=0)))
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  perfect = answer_accuracy(tokens[:, 1:], tokens, loss_mask)
  np.testing.assert_array_equal(perfect["exact_match"], 1.0)
  np.testing.assert_array_equal(perfect["answer_tokens"], 4)
  unshifted = answer_accuracy(tokens[:, :-1], tokens, loss_mask)  # a classic off-by-one
  assert unshifted["exact_match"].mean() < 0.5


@pytest.mark.parametrize("predictions, tokens, loss_mask, error, pattern", [
    (np.zeros((2, 4), int), np.zeros((2, 4), int), np.zeros((2, 4)), ValueError,
     r"predictions must have shape \[B, T-1\] = \(2, 3\) .* got \(2, 4\)"),
    (np.zeros((2, 3), int), np.zeros((2, 4), int), np.zeros((2, 5)), ValueError,
     r"loss_mask must have the shape of tokens \(2, 4\), got \(2, 5\)"),
    (np.zeros(3, int), np.zeros(4, int), np.zeros(4), ValueError,
     r"tokens must have shape \[B, T\] with T >= 2, got \(4,\)"),
    (np.zeros((2, 3)), np.zeros((2, 4), int), np.zeros((2, 4)), TypeError,
     r"predictions must hold integer token ids, got float64"),
])
def test_bad_arguments(predictions, tokens, loss_mask, error, pattern):
  with pytest.raises(error, match=pattern):
    answer_accuracy(predictions, tokens, loss_mask)
