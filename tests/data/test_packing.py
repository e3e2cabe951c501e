"""Packing: rows of exactly seq_len whose segments give back the documents, in order."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lsm.data import ROW_KEYS, PackedDocuments, single_example_row


def unpack(rows) -> list[np.ndarray]:
  """The segments of the rows, in order (segment ids 1, 2, ... within each row)."""
  pieces = []
  for row in rows:
    ids = row["segment_ids"]
    for segment in range(1, ids.max() + 1):
      pieces.append(row["tokens"][ids == segment])
  return pieces


def expected_pieces(documents, seq_len) -> list[np.ndarray]:
  return [np.asarray(doc[start:start + seq_len]) for doc in documents if len(doc)
          for start in range(0, len(doc), seq_len)]


def check_row(row, seq_len):
  assert set(row) == set(ROW_KEYS)
  for key in ROW_KEYS:
    assert row[key].shape == (seq_len,)
  ids, positions = row["segment_ids"], row["positions"]
  real = ids > 0
  used = int(real.sum())
  assert used > 0 and np.all(real[:used]), "padding only at the end of a row"
  assert np.all(np.diff(ids[:used]) >= 0) and np.all(np.diff(ids[:used]) <= 1)
  assert ids[0] == 1
  starts = np.concatenate([[True], np.diff(ids[:used]) != 0])
  for start in np.nonzero(starts)[0]:
    length = int((ids == ids[start]).sum())
    np.testing.assert_array_equal(positions[start:start + length], np.arange(length))
  np.testing.assert_array_equal(row["loss_mask"][:used], ~starts)
  for key in ROW_KEYS:
    assert np.all(row[key][used:] == 0), f"padding of {key} is not 0"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    documents=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=40), min_size=1, max_size=12)
    .filter(lambda docs: any(docs)),
    seq_len=st.integers(1, 32))
def test_unpacking_gives_back_the_documents_in_order(documents, seq_len):
  packed = PackedDocuments(documents, seq_len=seq_len)
  rows = [packed[i] for i in range(len(packed))]
  for row in rows:
    check_row(row, seq_len)
  pieces = unpack(rows)
  expected = expected_pieces(documents, seq_len)
  assert len(pieces) == len(expected)
  for piece, want in zip(pieces, expected):
    np.testing.assert_array_equal(piece, want)
  # Next fit: a row is closed only when the next piece does not fit in it.
  for row, following in zip(rows, rows[1:]):
    first_next = int((following["segment_ids"] == 1).sum())
    assert int((row["segment_ids"] > 0).sum()) + first_next > seq_len


def test_long_documents_are_split_and_short_ones_share_rows():
  packed = PackedDocuments([np.arange(10) + 1, [50, 51], [60, 61, 62]], seq_len=4)
  tokens = [packed[i]["tokens"].tolist() for i in range(len(packed))]
  assert tokens == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 50, 51], [60, 61, 62, 0]]
  assert packed[2]["segment_ids"].tolist() == [1, 1, 2, 2]
  assert packed[2]["positions"].tolist() == [0, 1, 0, 1]
  assert packed[2]["loss_mask"].tolist() == [0, 1, 0, 1]
  assert packed[3]["segment_ids"].tolist() == [1, 1, 1, 0]


def test_single_example_row():
  row = single_example_row([5, 6, 7], [0, 0, 1])
  assert row["tokens"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
  assert row["segment_ids"].tolist() == [1, 1, 1] and row["positions"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("documents, seq_len, error, pattern", [
    ([[1, 2]], 0, ValueError, r"seq_len must be a positive int, got 0"),
    ([[]], 4, ValueError, r"at least one non-empty document"),
    ([[1.5, 2.0]], 4, TypeError, r"documents\[0\] must be a 1-D sequence of integer"),
    ([[1], [[1, 2]]], 4, TypeError, r"documents\[1\] must be a 1-D"),
    ([[1, -2]], 4, ValueError, r"documents\[0\] has token ids outside"),
])
def test_bad_arguments(documents, seq_len, error, pattern):
  with pytest.raises(error, match=pattern):
    PackedDocuments(documents, seq_len=seq_len)


def test_out_of_range_index():
  packed = PackedDocuments([[1, 2, 3]], seq_len=2)
  with pytest.raises(IndexError, match=r"index 2 is outside \[0, 2\)"):
    packed[2]
