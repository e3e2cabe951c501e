"""make_dataset: batch format, seeded shuffle, repeat, sharding, checkpointable iterators."""

import itertools
import os

import grain
import numpy as np
import pytest

from lsm.data import ROW_KEYS, make_dataset, synthetic_dataset, text_dataset

SAMPLE = os.path.join(os.path.dirname(__file__), "sample.txt")


def _finite(num_examples=24, seq_len=32):
  return synthetic_dataset("passkey", seq_len=seq_len, seed=1, num_examples=num_examples,
                           num_digits=3)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in ROW_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def _row_ids(batches):
  """Rows are told apart by their tokens (distinct with overwhelming probability)."""
  return [row.tobytes() for batch in batches for row in batch["tokens"]]


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_batch_format(source):
  seq_len = 48
  rows = (synthetic_dataset("mqar", seq_len=seq_len, seed=0) if source == "synthetic"
          else text_dataset(SAMPLE, seq_len=seq_len))
  dataset = make_dataset(rows, batch_size=4, seed=0)
  assert isinstance(dataset, grain.IterDataset)
  batch = next(iter(dataset))
  assert set(batch) == set(ROW_KEYS)
  for key, dtype in (("tokens", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)):
    assert isinstance(batch[key], np.ndarray)
    assert batch[key].shape == (4, seq_len) and batch[key].dtype == dtype, key


@pytest.mark.parametrize("source", ["finite", "endless", "text"])
def test_restored_iterator_continues_with_the_same_batches(source):
  rows = {"finite": _finite(10), "endless": synthetic_dataset("passkey", seq_len=32, seed=2),
          "text": text_dataset(SAMPLE, seq_len=64)}[source]
  uninterrupted = iter(make_dataset(rows, batch_size=4, seed=5))
  expected = _take(uninterrupted, 9)  # crosses epoch boundaries for the finite sources

  interrupted = iter(make_dataset(rows, batch_size=4, seed=5))
  _take(interrupted, 4)
  state = interrupted.get_state()
  _take(interrupted, 2)  # progress after the checkpoint is thrown away

  restored = iter(make_dataset(rows, batch_size=4, seed=5))
  restored.set_state(state)
  _assert_same_batches(_take(restored, 5), expected[4:])
  interrupted.set_state(state)
  _assert_same_batches(_take(interrupted, 5), expected[4:])


def test_shuffle_is_seeded_and_changes_every_epoch():
  rows = _finite(24)
  epochs = _take(iter(make_dataset(rows, batch_size=4, seed=3)), 12)
  first, second = _row_ids(epochs[:6]), _row_ids(epochs[6:])
  assert sorted(first) == sorted(second) == sorted(_row_ids([{"tokens": r["tokens"][None]}
                                                             for r in rows]))
  assert first != second, "each epoch is shuffled anew"
  again = _take(iter(make_dataset(rows, batch_size=4, seed=3)), 12)
  _assert_same_batches(epochs, again)
  other = _take(iter(make_dataset(rows, batch_size=4, seed=4)), 6)
  assert _row_ids(other) != first
  ordered = _take(iter(make_dataset(rows, batch_size=4, seed=3, shuffle=False)), 6)
  assert _row_ids(ordered) == [rows[i]["tokens"].tobytes() for i in range(24)]


def test_one_pass_without_repeat():
  rows = _finite(10)
  batches = list(make_dataset(rows, batch_size=4, seed=0, repeat=False))
  assert len(batches) == 2
  batches = list(make_dataset(rows, batch_size=4, seed=0, repeat=False, drop_remainder=False))
  assert [b["tokens"].shape[0] for b in batches] == [4, 4, 2]
  assert len(set(_row_ids(batches))) == 10


@pytest.mark.parametrize("endless", [False, True])
def test_shards_are_disjoint_and_cover_the_rows(endless):
  rows = synthetic_dataset("passkey", seq_len=32, seed=1,
                           num_examples=None if endless else 24)
  shards = [_row_ids(_take(iter(make_dataset(rows, batch_size=3, seed=0, repeat=False,
                                             shard_index=i, shard_count=3)), 2))
            for i in range(3)]
  assert all(len(shard) == 6 for shard in shards)
  assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
  if endless:
    assert shards[1][:3] == [rows[i]["tokens"].tobytes() for i in (1, 4, 7)]
  else:
    every = set(itertools.chain(*[_row_ids(list(make_dataset(
        rows, batch_size=8, seed=0, repeat=False, shard_index=i, shard_count=3)))
        for i in range(3)]))
    assert every == {rows[i]["tokens"].tobytes() for i in range(24)}


def test_endless_source_is_a_stream():
  rows = synthetic_dataset("passkey", seq_len=32, seed=1)
  batches = _take(iter(make_dataset(rows, batch_size=2, seed=0)), 2)
  assert _row_ids(batches) == [rows[i]["tokens"].tobytes() for i in range(4)]


@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(source=[1, 2, 3]), TypeError, r"source must be a grain MapDataset, got list"),
    (dict(batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    (dict(seed=-3), ValueError, r"seed must be an int >= 0, got -3"),
    (dict(seed=2**32), ValueError, r"seed must be an int in \[0, 2\*\*32\)"),
    (dict(shard_index=2, shard_count=2), ValueError,
     r"shard_index must be in \[0, shard_count=2\), got 2"),
    (dict(shard_count=0), ValueError, r"shard_count must be an int >= 1, got 0"),
    (dict(shard_count=30), ValueError, r"shard_count=30 is more than the 10 rows"),
    (dict(shuffle="yes"), TypeError, r"shuffle must be a bool, got 'yes'"),
    (dict(batch_size=11, repeat=False), ValueError,
     r"batch_size=11 is more than the 10 rows of shard 0"),
    (dict(read_options={"num_threads": 1}), TypeError, r"read_options must be a grain"),
    (dict(source=grain.MapDataset.source([{"tokens": np.zeros(4)}])), ValueError,
     r"source rows must be dicts with keys \['tokens', 'loss_mask', 'segment_ids', "
     r"'positions'\], got \['tokens'\]"),
])
def test_bad_arguments_name_the_argument(overrides, error, pattern):
  arguments = dict(source=_finite(10), batch_size=2, seed=0) | overrides
  source = arguments.pop("source")
  with pytest.raises(error, match=pattern):
    make_dataset(source, **arguments)
