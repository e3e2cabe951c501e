"""Landmark insertion: a landmark after every block of each packed document, positions counting
landmarks and restarting per document, loss 0 on landmarks, padding untouched, errors."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lsm.data import (ROW_KEYS, PackedDocuments, insert_landmarks, insert_landmarks_batch,
                      landmark_length)

LANDMARK = 999


def expected_row(documents, block_size, length):
  """Built token by token: each document's tokens with a landmark after every block_size of
  them; ``documents`` are (tokens, loss_mask) pairs with segment ids 1, 2, ...; then padding."""
  out = {key: [] for key in ROW_KEYS}
  for segment, (tokens, loss) in enumerate(documents, start=1):
    position = 0
    for n, (token, weight) in enumerate(zip(tokens, loss), start=1):
      for key, value in zip(ROW_KEYS, (token, weight, segment, position)):
        out[key].append(value)
      position += 1
      if n % block_size == 0:
        for key, value in zip(ROW_KEYS, (LANDMARK, 0.0, segment, position)):
          out[key].append(value)
        position += 1
  for key in ROW_KEYS:
    out[key] += [0] * (length - len(out[key]))
  return {key: np.asarray(value) for key, value in out.items()}


def row_of(documents, padding=0):
  tokens = np.concatenate([t for t, _ in documents] + [np.zeros(padding, np.int64)])
  loss = np.concatenate([w for _, w in documents] + [np.zeros(padding)])
  lengths = [len(t) for t, _ in documents]
  segments = np.concatenate([np.repeat(np.arange(1, len(lengths) + 1), lengths),
                             np.zeros(padding, np.int64)])
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(padding, np.int64)])
  return {"tokens": tokens.astype(np.int32), "loss_mask": loss.astype(np.float32),
          "segment_ids": segments.astype(np.int32), "positions": positions.astype(np.int32)}


def documents_of(lengths, seed):
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, 500, n), (rng.random(n) < 0.7).astype(np.float32)) for n in lengths]


def assert_rows_equal(got, want):
  assert set(got) == set(ROW_KEYS)
  for key, dtype in zip(ROW_KEYS, (np.int32, np.float32, np.int32, np.int32)):
    assert got[key].dtype == dtype, (key, got[key].dtype)
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# A block exactly filling (6 = 2 blocks of 3), partial blocks, a one-token document, padding.
@pytest.mark.parametrize("lengths, padding", [([6, 4, 1, 8], 3), ([7], 0), ([2, 3], 5)])
def test_packed_rows_match_the_token_by_token_construction(lengths, padding):
  documents = documents_of(lengths, seed=sum(lengths))
  row = row_of(documents, padding)
  n = len(row["tokens"])
  got = insert_landmarks(row, block_size=3, landmark_id=LANDMARK)
  assert len(got["tokens"]) == landmark_length(n, 3) == n + n // 3
  assert_rows_equal(got, expected_row(documents, 3, n + n // 3))


def test_layout_convention_and_loss_mask():
  """Landmark iff position % (block_size + 1) == block_size; they carry no loss, every regular
  token keeps its loss weight, and removing the landmarks gives back the row."""
  documents = documents_of([9, 13, 4, 8], seed=1)
  row = row_of(documents, padding=2)
  got = insert_landmarks(row, block_size=4, landmark_id=LANDMARK, length=60)
  real = got["segment_ids"] > 0
  is_mark = got["tokens"] == LANDMARK
  np.testing.assert_array_equal(is_mark, real & (got["positions"] % 5 == 4))
  assert np.all(got["loss_mask"][is_mark] == 0)
  assert is_mark.sum() == 9 // 4 + 13 // 4 + 4 // 4 + 8 // 4
  for key in ("tokens", "loss_mask", "segment_ids"):
    np.testing.assert_array_equal(got[key][~is_mark & real], row[key][row["segment_ids"] > 0])
  assert np.all(got["tokens"][~real] == 0) and np.all(got["positions"][~real] == 0)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
                  block_size=st.integers(1, 5), seed=st.integers(0, 100))
def test_packed_documents_from_the_pipeline(lengths, block_size, seed):
  """Rows of `PackedDocuments` (loss 0 on each document's first token) in batch form equal the
  row-by-row results and the token-by-token construction."""
  rng = np.random.default_rng(seed)
  packed = PackedDocuments([rng.integers(1, 500, n) for n in lengths], seq_len=16)
  rows = [packed[i] for i in range(len(packed))]
  batch = {key: np.stack([r[key] for r in rows]) for key in ROW_KEYS}
  length = landmark_length(16, block_size)
  got = insert_landmarks_batch(batch, block_size=block_size, landmark_id=LANDMARK)
  for i, row in enumerate(rows):
    ids = row["segment_ids"]
    documents = [(row["tokens"][ids == s], row["loss_mask"][ids == s])
                 for s in range(1, ids.max() + 1)]
    want = expected_row(documents, block_size, length)
    assert_rows_equal({key: got[key][i] for key in ROW_KEYS}, want)
    assert_rows_equal(insert_landmarks(row, block_size=block_size, landmark_id=LANDMARK), want)


def test_length_too_short_is_an_error_naming_length():
  row = row_of(documents_of([6, 6], seed=2))  # 12 tokens + 4 landmarks
  assert len(insert_landmarks(row, block_size=3, landmark_id=LANDMARK, length=16)["tokens"]) == 16
  with pytest.raises(ValueError, match=r"length=15 is too short .* length >= 16"):
    insert_landmarks(row, block_size=3, landmark_id=LANDMARK, length=15)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (dict(landmark_id=-1), ValueError, "landmark_id must be a token id"),
    (dict(length=0), ValueError, "length must be a positive int, got 0"),
    (dict(row="tokens"), TypeError, "row must be a dict"),
    (dict(row={"tokens": np.zeros(4)}), ValueError, "missing"),
    (dict(row={**row_of(documents_of([4], 0)), "positions": np.zeros(3, np.int32)}), ValueError,
     r"row\['positions'\] must have rank 1 and the shape"),
])
def test_argument_errors(kwargs, error, message):
  call = {**dict(row=row_of(documents_of([4], 0)), block_size=2, landmark_id=LANDMARK), **kwargs}
  with pytest.raises(error, match=message):
    insert_landmarks(call.pop("row"), **call)


def test_batch_errors_and_helper_errors():
  with pytest.raises(ValueError, match=r"batch\['tokens'\] must have rank 2"):
    insert_landmarks_batch(row_of(documents_of([4], 0)), block_size=2, landmark_id=LANDMARK)
  with pytest.raises(ValueError, match="n must be a non-negative int"):
    landmark_length(-1, 2)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    landmark_length(4, 0)
