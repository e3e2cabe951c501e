"""`make_dataset`: shard, shuffle, repeat and batch rows into a checkpointable grain iterator."""

from __future__ import annotations

import sys

import grain
import numpy as np

from lsm.data.packing import ROW_KEYS

_DEFAULT_THREADS = 2
_DEFAULT_PREFETCH_BATCHES = 4


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"make_dataset: {name} must be an int >= {low}, got {value!r}")
  return int(value)


def _check_bool(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"make_dataset: {name} must be a bool, got {value!r}")


def _check_row(row) -> None:
  """The first row has the lsm row format, so a wrong source fails here and not in the loop."""
  if not isinstance(row, dict) or set(row) != set(ROW_KEYS):
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(f"make_dataset: source rows must be dicts with keys {list(ROW_KEYS)}, got "
                     f"{keys}")
  shapes = {key: np.shape(value) for key, value in row.items()}
  if len(set(shapes.values())) != 1 or len(shapes["tokens"]) != 1:
    raise ValueError(f"make_dataset: source rows must hold 1-D arrays of one length, got shapes "
                     f"{shapes}")


def make_dataset(source: grain.MapDataset, *, batch_size: int, seed: int, shuffle: bool = True,
                 repeat: bool = True, shard_index: int = 0, shard_count: int = 1,
                 drop_remainder: bool = True,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Batches of rows for a training or evaluation loop.

  The rows of ``source`` are sharded (this process keeps rows ``shard_index::shard_count``),
  shuffled with ``seed`` (a new order every epoch), repeated and batched. An endless source
  (``len == sys.maxsize``, e.g. ``synthetic_dataset(..., num_examples=None)``) is a stream of
  independent examples: it is sharded and batched but neither shuffled nor repeated.

  Args:
    source: a `MapDataset` of rows (`lsm.data.ROW_KEYS`, each ``[seq_len]``), e.g. from
      `synthetic_dataset` or `text_dataset`.
    batch_size: rows per batch (per process).
    seed: the shuffle seed, an int in [0, 2**32).
    shuffle: shuffle the rows (finite sources only).
    repeat: repeat epochs forever (finite sources only); False: one pass.
    shard_index, shard_count: this process's shard, e.g. ``jax.process_index()`` and
      ``jax.process_count()``.
    drop_remainder: drop a last batch smaller than ``batch_size`` (only reached without repeat).
    read_options: grain threads and prefetch buffer (in batches); default 2 threads, 4 batches.

  Returns:
    An `IterDataset`; ``iter(dataset)`` yields dicts of ``[batch_size, seq_len]`` numpy arrays
    (``tokens`` int32, ``loss_mask`` float32, ``segment_ids`` int32, ``positions`` int32), and
    the iterator's ``get_state()`` / ``set_state(state)`` checkpoint and restore its position.
  """
  if not isinstance(source, grain.MapDataset):
    raise TypeError(f"make_dataset: source must be a grain MapDataset, got "
                    f"{type(source).__name__}")
  batch_size = _check_int("batch_size", batch_size, 1)
  seed = _check_int("seed", seed, 0)
  if seed >= 2**32:
    raise ValueError(f"make_dataset: seed must be an int in [0, 2**32), got {seed}")
  shard_count = _check_int("shard_count", shard_count, 1)
  shard_index = _check_int("shard_index", shard_index, 0)
  if shard_index >= shard_count:
    raise ValueError(f"make_dataset: shard_index must be in [0, shard_count={shard_count}), got "
                     f"{shard_index}")
  for name, value in (("shuffle", shuffle), ("repeat", repeat),
                      ("drop_remainder", drop_remainder)):
    _check_bool(name, value)
  if read_options is not None and not isinstance(read_options, grain.ReadOptions):
    raise TypeError(f"make_dataset: read_options must be a grain.ReadOptions or None, got "
                    f"{type(read_options).__name__}")
  endless = len(source) >= sys.maxsize
  if not endless and len(source) < shard_count:
    raise ValueError(f"make_dataset: shard_count={shard_count} is more than the {len(source)} "
                     f"rows of source; every shard needs at least one row")
  _check_row(source[0])

  dataset = source[shard_index::shard_count]
  if not endless:
    if not repeat and drop_remainder and len(dataset) < batch_size:
      raise ValueError(f"make_dataset: batch_size={batch_size} is more than the {len(dataset)} "
                       f"rows of shard {shard_index}, so one pass with drop_remainder=True "
                       f"yields no batch")
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    if repeat:
      dataset = dataset.repeat()
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  return dataset.to_iter_dataset(read_options or grain.ReadOptions(
      num_threads=_DEFAULT_THREADS, prefetch_buffer_size=_DEFAULT_PREFETCH_BATCHES))
