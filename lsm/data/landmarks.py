"""Landmark tokens for landmark attention (`lsm.layers.LandmarkAttention`).

Layout convention, relied on by the kernel and the layer: a landmark token closes every block of
``block_size`` regular tokens of a document, and positions count the landmarks and restart at 0
in every document. So with ``S = block_size + 1`` the token at position ``p`` is a landmark iff
``p % S == block_size``, and it belongs to block ``p // S``. A document of n regular tokens
becomes ``n + n // block_size`` tokens (a block that fills exactly ends with its landmark; a last
partial block has none yet).

`insert_landmarks` rewrites an lsm row (`lsm.data.packing.ROW_KEYS`) into that layout. A document
is a maximal run of one non-zero segment id; padding (segment 0) is copied unchanged. Landmarks
get ``loss_mask`` 0 (the model is never asked to predict one) and the document's segment id; the
input positions are replaced by the renumbered ones.
"""

from __future__ import annotations

import numpy as np

from lsm.data.packing import ROW_KEYS

_DTYPES = {"tokens": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
           "positions": np.int32}


def _positive_int(owner: str, name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
  return int(value)


def _check_options(owner: str, block_size, landmark_id) -> tuple[int, int]:
  block_size = _positive_int(owner, "block_size", block_size)
  if isinstance(landmark_id, bool) or not isinstance(landmark_id, (int, np.integer)) or not (
      0 <= landmark_id < 2**31):
    raise ValueError(f"{owner}: landmark_id must be a token id, an int in [0, 2**31), got "
                     f"{landmark_id!r}")
  return block_size, int(landmark_id)


def _check_arrays(owner: str, name: str, arrays, rank: int) -> dict[str, np.ndarray]:
  if not isinstance(arrays, dict):
    raise TypeError(f"{owner}: {name} must be a dict of arrays with keys {ROW_KEYS}, got "
                    f"{type(arrays).__name__}")
  missing = [key for key in ROW_KEYS if key not in arrays]
  if missing:
    raise ValueError(f"{owner}: {name} must have the keys {ROW_KEYS}, missing {missing}")
  out = {key: np.asarray(arrays[key]) for key in ROW_KEYS}
  shape = out["tokens"].shape
  for key, array in out.items():
    if array.ndim != rank or array.shape != shape:
      raise ValueError(f"{owner}: {name}[{key!r}] must have rank {rank} and the shape of "
                       f"{name}['tokens'] {shape}, got shape {array.shape}")
  return out


def landmark_length(n: int, block_size: int) -> int:
  """The length ``n + n // block_size`` that `insert_landmarks` makes of ``n`` tokens: room for
  every landmark however the row is packed."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"landmark_length: n must be a non-negative int, got {n!r}")
  block_size = _positive_int("landmark_length", "block_size", block_size)
  return int(n) + int(n) // block_size


def _insert(row: dict[str, np.ndarray], block_size: int, landmark_id: int, length: int,
            owner: str) -> dict[str, np.ndarray]:
  segments = row["segment_ids"].astype(np.int64)
  n = segments.shape[0]
  index = np.arange(n)
  real = segments != 0
  starts = real & np.concatenate([[True], segments[1:] != segments[:-1]])
  # Index of each token within its document (a run of one non-zero segment id).
  run_start = np.maximum.accumulate(np.where(starts, index, 0))
  within = index - run_start
  closes_block = real & (within % block_size == block_size - 1)
  landmarks_before = np.cumsum(closes_block) - closes_block
  target = index + landmarks_before
  needed = n + int(closes_block.sum())
  if needed > length:
    raise ValueError(f"{owner}: length={length} is too short for the row with its landmarks: "
                     f"{n} tokens + {int(closes_block.sum())} landmarks = {needed}; give "
                     f"length >= {needed} (landmark_length({n}, {block_size}) = "
                     f"{landmark_length(n, block_size)} always fits)")
  out = {key: np.zeros(length, dtype) for key, dtype in _DTYPES.items()}
  for key in ("tokens", "loss_mask", "segment_ids"):
    out[key][target] = row[key]
  out["positions"][target] = np.where(real, within + within // block_size, row["positions"])
  marks = target[closes_block] + 1
  out["tokens"][marks] = landmark_id
  out["segment_ids"][marks] = row["segment_ids"][closes_block]
  closing = within[closes_block]
  out["positions"][marks] = closing + closing // block_size + 1
  return out


def insert_landmarks(row: dict, *, block_size: int, landmark_id: int,
                     length: int | None = None) -> dict[str, np.ndarray]:
  """The row with a landmark token after every ``block_size`` regular tokens of each document.

  Args:
    row: dict of 1-D arrays ``tokens``, ``loss_mask``, ``segment_ids``, ``positions``.
    block_size: regular tokens per block.
    landmark_id: the token id of landmarks.
    length: the output length (default ``landmark_length(len(row), block_size)``); the tail is
      padding (token 0, segment 0, loss 0, position 0). ValueError if the result does not fit.

  Returns the new row (same keys and dtypes as `lsm.data.packing` rows); positions restart at 0
  in every document and count the landmarks.
  """
  owner = "insert_landmarks"
  block_size, landmark_id = _check_options(owner, block_size, landmark_id)
  row = _check_arrays(owner, "row", row, rank=1)
  n = row["tokens"].shape[0]
  length = landmark_length(n, block_size) if length is None else _positive_int(
      owner, "length", length)
  return _insert(row, block_size, landmark_id, length, owner)


def insert_landmarks_batch(batch: dict, *, block_size: int, landmark_id: int,
                           length: int | None = None) -> dict[str, np.ndarray]:
  """`insert_landmarks` on every row of a batch of [B, L] arrays; returns [B, length] arrays."""
  owner = "insert_landmarks_batch"
  block_size, landmark_id = _check_options(owner, block_size, landmark_id)
  batch = _check_arrays(owner, "batch", batch, rank=2)
  b, n = batch["tokens"].shape
  length = landmark_length(n, block_size) if length is None else _positive_int(
      owner, "length", length)
  rows = [_insert({key: batch[key][i] for key in ROW_KEYS}, block_size, landmark_id, length,
                  owner) for i in range(b)]
  return {key: np.stack([r[key] for r in rows]) if rows else np.zeros((0, length), dtype)
          for key, dtype in _DTYPES.items()}
