"""Rows of exactly ``seq_len`` tokens: one example per row, or documents packed greedily.

Every row lsm feeds a model is a dict of four ``[seq_len]`` numpy arrays (`ROW_KEYS`):

- ``tokens`` int32: the sequence (the training loop predicts ``tokens[1:]`` from ``tokens[:-1]``);
- ``loss_mask`` float32, aligned with ``tokens``: 1.0 where the token is a prediction target;
- ``segment_ids`` int32: 1, 2, 3, ... per document in the row, 0 on padding;
- ``positions`` int32: the position inside the document, restarting at 0 where one starts.

`PackedDocuments` packs token documents by *next fit*: documents longer than ``seq_len`` are cut
into pieces of ``seq_len`` tokens (the last piece shorter); pieces go, in order, into the current
row while they fit, and a piece that does not fit closes the row (its tail is padding) and opens
the next one. Every row is a contiguous stretch of the documents, so unpacking the rows by segment
id gives back the pieces, and joining those gives back the documents, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def _check_seq_len(seq_len, caller: str) -> int:
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"{caller}: seq_len must be a positive int, got {seq_len!r}")
  return int(seq_len)


def single_example_row(tokens, loss_mask) -> dict[str, np.ndarray]:
  """The row of one example that fills it exactly: segment ids all 1, positions ``arange``."""
  tokens = np.asarray(tokens, np.int32)
  loss_mask = np.asarray(loss_mask, np.float32)
  if tokens.ndim != 1 or tokens.shape != loss_mask.shape:
    raise ValueError(f"single_example_row: tokens and loss_mask must be 1-D of one length, got "
                     f"shapes {tokens.shape} and {loss_mask.shape}")
  return {"tokens": tokens, "loss_mask": loss_mask,
          "segment_ids": np.ones(tokens.shape, np.int32),
          "positions": np.arange(tokens.shape[0], dtype=np.int32)}


def _as_document(document, index: int) -> np.ndarray:
  array = np.asarray(document)
  if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"PackedDocuments: documents[{index}] must be a 1-D sequence of integer "
                    f"token ids, got dtype {array.dtype} and shape {array.shape}")
  if array.size and (array.min() < 0 or array.max() >= 2**31):
    raise ValueError(f"PackedDocuments: documents[{index}] has token ids outside [0, 2**31): "
                     f"min {array.min()}, max {array.max()}")
  return array.astype(np.int32)


class PackedDocuments(Sequence):
  """A random-access source of packed rows (see the module docstring for the packing rule).

  Args:
    documents: a sequence of 1-D integer token-id sequences; empty ones are skipped.
    seq_len: the row length.

  ``loss_mask`` is 1.0 on every real token except the first of each segment: that token would be
  predicted from the previous document (or from nothing), which the model is not shown.
  """

  def __init__(self, documents: Sequence, *, seq_len: int):
    self.seq_len = _check_seq_len(seq_len, "PackedDocuments")
    arrays = [_as_document(d, i) for i, d in enumerate(documents)]
    arrays = [a for a in arrays if a.size]
    if not arrays:
      raise ValueError("PackedDocuments: documents must hold at least one non-empty document, "
                       f"got {len(documents)} documents and no tokens")
    self._tokens = np.concatenate(arrays)
    piece_lengths = []
    for array in arrays:
      full, rest = divmod(array.size, self.seq_len)
      piece_lengths += [self.seq_len] * full + ([rest] if rest else [])
    self._piece_lengths = np.asarray(piece_lengths, np.int64)
    self._piece_starts = np.concatenate([[0], np.cumsum(self._piece_lengths)[:-1]])
    self._row_first_piece = self._next_fit(piece_lengths)

  def _next_fit(self, piece_lengths: list[int]) -> np.ndarray:
    """Index of each row's first piece, plus the number of pieces at the end."""
    firsts, used = [0], 0
    for index, length in enumerate(piece_lengths):
      if used + length > self.seq_len:
        firsts.append(index)
        used = 0
      used += length
    firsts.append(len(piece_lengths))
    return np.asarray(firsts, np.int64)

  def __len__(self) -> int:
    return len(self._row_first_piece) - 1

  def __repr__(self) -> str:
    return (f"PackedDocuments({len(self)} rows of {self.seq_len} tokens, "
            f"{self._tokens.size} tokens in {self._piece_lengths.size} pieces)")

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    if isinstance(index, slice) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"PackedDocuments: index must be an int, got {type(index).__name__}")
    if not 0 <= index < len(self):
      raise IndexError(f"PackedDocuments: index {index} is outside [0, {len(self)})")
    first, stop = self._row_first_piece[index], self._row_first_piece[index + 1]
    lengths = self._piece_lengths[first:stop]
    start = self._piece_starts[first]
    used = int(lengths.sum())
    row = {key: np.zeros(self.seq_len, np.float32 if key == "loss_mask" else np.int32)
           for key in ROW_KEYS}
    row["tokens"][:used] = self._tokens[start:start + used]
    row["segment_ids"][:used] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    segment_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    row["positions"][:used] = np.arange(used) - segment_starts
    row["loss_mask"][:used] = row["positions"][:used] > 0
    return row
