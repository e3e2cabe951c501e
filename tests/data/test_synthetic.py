"""Synthetic tasks: exact lengths, vocabulary bounds, determinism, answers recoverable (ListOps
expressions evaluated and variable chains followed independently), needle depths, errors."""

import sys

import grain
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lsm.config import load_config
from lsm.data import (ROW_KEYS, SYNTHETIC_TASKS, SYNTHETIC_VOCAB_SIZE, ListOpsTask, PasskeyTask,
                      SyntheticSource, answer_accuracy, synthetic_dataset, synthetic_task)
from lsm.data import synthetic_vocab as vocab
from lsm.train import data as train_data
from tests.data.solvers import (SOLVERS, evaluate_listops, listops_shape, parse_listops,
                                solve_mqar)

TASKS = sorted(SYNTHETIC_TASKS)


def _assert_example_is_right(task, row, seq_len):
  assert set(row) == set(ROW_KEYS)
  for key, dtype in (("tokens", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)):
    assert row[key].dtype == dtype and row[key].shape == (seq_len,), key
  tokens = row["tokens"]
  assert tokens.min() > vocab.PAD and tokens.max() < SYNTHETIC_VOCAB_SIZE
  np.testing.assert_array_equal(row["segment_ids"], 1)
  np.testing.assert_array_equal(row["positions"], np.arange(seq_len))
  expected, answer_positions = SOLVERS[task.name](tokens, task)
  np.testing.assert_array_equal(tokens[answer_positions], expected, vocab.render(tokens))
  mask = np.zeros(seq_len, np.float32)
  mask[answer_positions] = 1.0
  np.testing.assert_array_equal(row["loss_mask"], mask)
  assert answer_positions.size == task.answer_length


def test_vocabulary_layout():
  assert SYNTHETIC_VOCAB_SIZE <= 64
  ids = [vocab.PAD, vocab.BOS, vocab.PASSKEY, vocab.QUERY, vocab.KEY, vocab.VALUE, vocab.COPY,
         *vocab.DIGITS, *vocab.SYMBOLS]
  assert sorted(ids) == list(range(SYNTHETIC_VOCAB_SIZE))
  assert vocab.render([vocab.QUERY, vocab.DIGITS[3], vocab.SYMBOLS[12]]) == "<query> 3 s12"


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("seq_len", [None, 256, 1024])
def test_answers_are_recoverable_from_the_sequence(task_name, seq_len):
  task = synthetic_task(task_name)
  seq_len = seq_len or task.min_seq_len
  dataset = synthetic_dataset(task, seq_len=seq_len, seed=3, num_examples=20)
  assert len(dataset) == 20
  for row in dataset:
    _assert_example_is_right(task, row, seq_len)


@st.composite
def _tasks(draw):
  name = draw(st.sampled_from(TASKS))
  small = st.integers(1, 6)
  if name == "passkey":
    unique = draw(st.booleans())
    knobs = dict(num_digits=draw(st.integers(1, 10 if unique else 16)), unique_digits=unique,
                 filler_vocab_size=draw(small), depth=draw(st.none() | st.floats(0, 1)))
  elif name == "mqar":
    keys = draw(st.integers(1, 12))
    pairs = draw(st.integers(1, keys))
    low = draw(st.none() | st.integers(1, pairs))
    knobs = dict(key_vocab_size=keys, value_vocab_size=draw(small), filler_vocab_size=draw(small),
                 num_pairs=pairs, num_queries=draw(st.integers(1, low or pairs)),
                 context_repeats=draw(st.integers(1, 3)), min_pairs=low)
  elif name == "kv_needle":
    key_length, key_vocab = draw(small), draw(st.integers(2, 6))
    knobs = dict(key_length=key_length, key_vocab_size=key_vocab, value_length=draw(small),
                 filler_vocab_size=draw(small), depth=draw(st.none() | st.floats(0, 1)),
                 num_distractors=draw(st.integers(0, min(12, key_length * (key_vocab - 1)))))
  elif name == "variable_tracking":
    names, chains = draw(st.integers(1, 20)), draw(st.integers(1, 4))
    knobs = dict(name_vocab_size=names, num_chains=min(chains, names),
                 hops=draw(st.integers(0, names // min(chains, names) - 1)),
                 value_length=draw(small), filler_vocab_size=draw(small))
  elif name == "listops":
    knobs = dict(max_depth=draw(st.integers(1, 6)), max_args=draw(st.integers(2, 8)),
                 min_fill=draw(st.floats(0.01, 1)), filler_vocab_size=draw(small))
  else:
    knobs = dict(num_data_tokens=draw(st.integers(1, 12)), data_vocab_size=draw(small),
                 noise_vocab_size=draw(small))
  return synthetic_task(name, **knobs)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(task=_tasks(), extra=st.integers(0, 40), seed=st.integers(0, 2**32),
                  index=st.integers(0, 10**6))
def test_any_difficulty_gives_exact_length_and_a_recoverable_answer(task, extra, seed, index):
  seq_len = task.min_seq_len + extra
  row = synthetic_dataset(task, seq_len=seq_len, seed=seed)[index]
  _assert_example_is_right(task, row, seq_len)


@pytest.mark.parametrize("task_name", TASKS)
def test_examples_depend_only_on_seed_and_index(task_name):
  first = synthetic_dataset(task_name, seq_len=300, seed=7)
  again = synthetic_dataset(task_name, seq_len=300, seed=7)
  other_seed = synthetic_dataset(task_name, seq_len=300, seed=8)
  for index in (0, 5, 123456789):
    for key in ROW_KEYS:
      np.testing.assert_array_equal(first[index][key], again[index][key])
    assert not np.array_equal(first[index]["tokens"], other_seed[index]["tokens"])
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
  # Reading out of order (as a shuffled pipeline does) changes nothing.
  np.testing.assert_array_equal(first[3]["tokens"], again[:4][3]["tokens"])


def test_endless_by_default():
  dataset = synthetic_dataset("passkey", seq_len=64, seed=0)
  assert len(dataset) == sys.maxsize
  assert isinstance(dataset, grain.MapDataset)
  assert dataset[sys.maxsize - 1]["tokens"].shape == (64,)


def test_passkey_depth_places_the_key():
  def hidden_at(depth):
    return int(np.argmax(synthetic_dataset("passkey", seq_len=1000, seed=0, depth=depth)[0][
        "tokens"] == vocab.PASSKEY))

  filler = 1000 - PasskeyTask().min_seq_len
  assert hidden_at(0.0) == 1
  assert hidden_at(1.0) == 1 + filler
  assert hidden_at(0.5) == 1 + round(0.5 * filler)
  depths = [int(np.argmax(row["tokens"] == vocab.PASSKEY))
            for row in synthetic_dataset("passkey", seq_len=1000, seed=0, num_examples=30)]
  assert len(set(depths)) > 20, "random depths should spread over the sequence"


@pytest.mark.parametrize("seq_len", [300, 2000])
def test_kv_needle_depth_places_the_needle_among_the_distractors(seq_len):
  task = synthetic_task("kv_needle", num_distractors=10, depth=0.0)
  entry = task.min_seq_len // (task.num_distractors + 2)  # KEY k1..k4 VALUE v1..v4
  context = seq_len - 1 - entry - 4  # around the needle: the entries and the filler before QUERY
  for depth in (0.0, 0.3, 0.5, 1.0):
    task = synthetic_task("kv_needle", num_distractors=10, depth=depth)
    for row in synthetic_dataset(task, seq_len=seq_len, seed=1, num_examples=5):
      tokens = row["tokens"]
      expected, _ = SOLVERS["kv_needle"](tokens, task)
      query_at = int(np.argmax(tokens == vocab.QUERY))
      needle = tokens[query_at + 1:query_at + 5]
      starts = np.nonzero(tokens[:query_at] == vocab.KEY)[0]
      (at,) = [s for s in starts if np.array_equal(tokens[s + 1:s + 5], needle)]
      np.testing.assert_array_equal(tokens[at + 6:at + 10], expected)
      assert abs((at - 1) - depth * context) <= entry / 2 + 1, (depth, at)
      before = int(np.sum(starts < at))
      assert before == round(depth * 10)  # distractors on both sides, as the depth says
  # depth None keeps the random placement: the needle anywhere among the entries.
  places = set()
  for row in synthetic_dataset("kv_needle", seq_len=300, seed=2, num_examples=40,
                               num_distractors=10):
    tokens = row["tokens"]
    query_at = int(np.argmax(tokens == vocab.QUERY))
    starts = np.nonzero(tokens[:query_at] == vocab.KEY)[0]
    places.add([np.array_equal(tokens[s + 1:s + 5], tokens[query_at + 1:query_at + 5])
                for s in starts].index(True))
  assert len(places) > 6


def test_variable_tracking_hops_and_chains():
  """The queried chain has `hops` assignments; the other chains have values of their own."""
  for hops, chains in ((0, 1), (1, 3), (4, 2)):
    task = synthetic_task("variable_tracking", hops=hops, num_chains=chains)
    rows = synthetic_dataset(task, seq_len=task.min_seq_len + 30, seed=0, num_examples=20)
    values = set()
    for row in rows:
      tokens = row["tokens"]
      expected, _ = SOLVERS["variable_tracking"](tokens, task)  # checks hops and chains
      assert int(np.sum(tokens == vocab.KEY)) == chains * (hops + 1)
      values.add(tuple(expected.tolist()))
    assert len(values) == 20
  # The answer is not simply the first or last value in the context.
  task = synthetic_task("variable_tracking", hops=2, num_chains=3)
  first = 0
  for row in synthetic_dataset(task, seq_len=80, seed=4, num_examples=60):
    tokens = row["tokens"]
    value_at = int(np.argmax((tokens >= vocab.FIRST_DIGIT) & (tokens < vocab.FIRST_SYMBOL)))
    first += np.array_equal(tokens[value_at:value_at + 4], tokens[-4:])
  assert 5 < first < 45


def test_variable_tracking_from_a_config():
  config = load_config(None, ["data.task=variable_tracking", "data.seq_len=64",
                              "data.batch_size=4", "data.task_options.hops=1",
                              "data.task_options.num_chains=3"])
  batch = next(train_data.build(config).iterator)
  assert batch["tokens"].shape == (4, 65) and np.all(batch["loss_mask"].sum(axis=1) == 4)
  for tokens in batch["tokens"]:
    SOLVERS["variable_tracking"](tokens, synthetic_task("variable_tracking", hops=1,
                                                        num_chains=3))


def test_longer_sequences_keep_the_task():
  """Evaluating at 2x and 4x the training length is only a longer seq_len."""
  for seq_len in (256, 512, 1024):
    row = synthetic_dataset("passkey", seq_len=seq_len, seed=0, num_digits=5)[0]
    assert row["tokens"].shape == (seq_len,) and row["loss_mask"].sum() == 5


def test_listops_evaluator_on_the_documented_example():
  """``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9, read the way the solver reads generated sequences."""
  op, close, d = vocab.SYMBOLS[:4], vocab.SYMBOLS[4], vocab.DIGITS
  expression = [op[0], d[2], d[9], op[1], d[4], d[7], close, d[0], close]
  tokens = np.asarray([vocab.BOS, *expression, vocab.QUERY, d[9]])
  parsed, start = parse_listops(tokens, ListOpsTask())
  assert parsed == ("MAX", [2, 9, ("MIN", [4, 7]), 0]) and start == 1
  assert evaluate_listops(parsed) == 9
  assert evaluate_listops(("MED", [3, 8, 1, 5])) == 3  # the lower middle of an even count
  assert evaluate_listops(("SM", [9, 8, ("MED", [4, 1, 7])])) == 1


def test_listops_answers_cover_the_digits_and_use_every_operator():
  rows = synthetic_dataset("listops", seq_len=200, seed=0, num_examples=200)
  answers, operators = set(), set()
  for row in rows:
    answers.add(int(row["tokens"][-1]) - vocab.FIRST_DIGIT)
    operators.update(row["tokens"][np.isin(row["tokens"], vocab.SYMBOLS[:4])].tolist())
  assert answers == set(range(10)) and len(operators) == 4


def test_listops_expression_fills_the_sequence_within_its_limits():
  def expression_lengths(seq_len, **knobs):
    task = synthetic_task("listops", **knobs)
    rows = synthetic_dataset(task, seq_len=seq_len, seed=1, num_examples=20)
    return np.asarray([seq_len - 2 - parse_listops(row["tokens"], task)[1] for row in rows])

  assert expression_lengths(1024).min() >= 0.95 * 1021  # longer context, longer expression
  assert expression_lengths(4096).min() >= 0.95 * 4093
  filled = expression_lengths(2000, min_fill=0.25)
  assert filled.min() < 1000 and filled.max() > 1500  # a spread of lengths
  # Depth 2 and 3 arguments cap the expression at 2 + 3 * (2 + 3) = 17 tokens; filler does the rest.
  assert expression_lengths(500, max_depth=2, max_args=3).max() <= 17
  task = synthetic_task("listops", max_depth=2, max_args=3)
  depths = {listops_shape(parse_listops(row["tokens"], task)[0])[0]
            for row in synthetic_dataset(task, seq_len=500, seed=1, num_examples=20)}
  assert depths == {2}


def test_listops_from_a_config_and_scored_by_answer_accuracy():
  config = load_config(None, ["data.task=listops", "data.seq_len=128", "data.batch_size=4",
                              "data.task_options.max_depth=4", "data.task_options.max_args=5"])
  data = train_data.build(config)
  batch = next(data.iterator)
  assert batch["tokens"].shape == (4, 129) and np.all(batch["loss_mask"].sum(axis=1) == 1)
  for tokens in batch["tokens"]:
    expression, _ = parse_listops(tokens, ListOpsTask(max_depth=4, max_args=5))
    assert listops_shape(expression)[0] <= 4
  scores = answer_accuracy(batch["tokens"][:, 1:], batch["tokens"], batch["loss_mask"])
  np.testing.assert_array_equal(scores["exact_match"], 1.0)
  wrong = batch["tokens"][:, 1:].copy()
  wrong[:, -1] = vocab.FIRST_DIGIT + (wrong[:, -1] - vocab.FIRST_DIGIT + 1) % 10
  np.testing.assert_array_equal(answer_accuracy(wrong, batch["tokens"],
                                                batch["loss_mask"])["exact_match"], 0.0)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: synthetic_dataset("needle", seq_len=64, seed=0), ValueError,
     r"task must be one of .*'passkey'.*got 'needle'"),
    (lambda: synthetic_dataset("passkey", seq_len=12, seed=0), ValueError,
     r"seq_len=12 is too short .* at least 13"),
    (lambda: synthetic_dataset("kv_needle", seq_len=100, seed=0), ValueError,
     r"seq_len=100 is too short"),
    (lambda: synthetic_dataset("passkey", seq_len=64.0, seed=0), ValueError,
     r"seq_len must be an int, got 64.0"),
    (lambda: synthetic_dataset("passkey", seq_len=64, seed=-1), ValueError,
     r"seed must be a non-negative int, got -1"),
    (lambda: synthetic_dataset("passkey", seq_len=64, seed=0, num_examples=0), ValueError,
     r"num_examples must be a positive int or None, got 0"),
    (lambda: synthetic_dataset("passkey", seq_len=64, seed=0, num_pairs=3), TypeError,
     r"no difficulty argument 'num_pairs'; it takes num_digits"),
    (lambda: synthetic_dataset(PasskeyTask(), seq_len=64, seed=0, num_digits=3), TypeError,
     r"difficulty arguments \['num_digits'\] can only go with a task name"),
    (lambda: synthetic_dataset(3, seq_len=64, seed=0), TypeError, r"task must be a task name"),
    (lambda: synthetic_task("passkey", num_digits=11), ValueError,
     r"num_digits must be an int in \[1, 10\], got 11"),
    (lambda: synthetic_task("passkey", depth=1.5), ValueError, r"depth must be a number in"),
    (lambda: synthetic_task("passkey", filler_vocab_size=0), ValueError,
     r"filler_vocab_size must be an int in \[1, 47\], got 0"),
    (lambda: synthetic_task("mqar", num_pairs=20, key_vocab_size=16), ValueError,
     r"num_pairs must be an int in \[1, 16\], got 20"),
    (lambda: synthetic_task("mqar", num_queries=9, num_pairs=8), ValueError,
     r"num_queries must be an int in \[1, 8\], got 9"),
    (lambda: synthetic_task("mqar", num_pairs=8, min_pairs=9), ValueError,
     r"mqar: min_pairs must be an int in \[1, 8\], got 9"),
    (lambda: synthetic_task("mqar", num_pairs=8, min_pairs=2, num_queries=3), ValueError,
     r"mqar: num_queries must be an int in \[1, 2\], got 3"),
    (lambda: synthetic_task("mqar", context_repeats=0), ValueError,
     r"context_repeats must be an int >= 1, got 0"),
    (lambda: synthetic_task("mqar", key_vocab_size=30, value_vocab_size=30), ValueError,
     r"key_vocab_size=30 \+ value_vocab_size=30 \+ filler_vocab_size=1 = 61 symbols"),
    (lambda: synthetic_task("kv_needle", num_distractors=30, key_length=4, key_vocab_size=8),
     ValueError, r"num_distractors must be an int in \[0, 28\], got 30"),
    (lambda: synthetic_task("selective_copy", num_data_tokens=0), ValueError,
     r"num_data_tokens must be an int >= 1, got 0"),
    (lambda: synthetic_task("listops", max_depth=0), ValueError,
     r"listops: max_depth must be an int in \[1, 100\], got 0"),
    (lambda: synthetic_task("listops", max_args=1), ValueError,
     r"listops: max_args must be an int >= 2, got 1"),
    (lambda: synthetic_task("listops", min_fill=0.0), ValueError,
     r"listops: min_fill must be a number in \(0, 1\], got 0.0"),
    (lambda: synthetic_task("listops", filler_vocab_size=43), ValueError,
     r"listops: filler_vocab_size must be an int in \[1, 42\], got 43"),
    (lambda: synthetic_dataset("listops", seq_len=6, seed=0), ValueError,
     r"seq_len=6 is too short .* at least 7"),
    (lambda: synthetic_task("kv_needle", depth=-0.1), ValueError,
     r"kv_needle: depth must be a number in \[0, 1\] or None, got -0.1"),
    (lambda: synthetic_task("variable_tracking", hops=8, num_chains=2), ValueError,
     r"variable_tracking: hops must be an int in \[0, 7\], got 8"),
    (lambda: synthetic_task("variable_tracking", hops=-1), ValueError,
     r"hops must be an int in \[0, 7\], got -1"),
    (lambda: synthetic_task("variable_tracking", num_chains=0), ValueError,
     r"variable_tracking: num_chains must be an int in \[1, 16\], got 0"),
    (lambda: synthetic_task("variable_tracking", value_length=0), ValueError,
     r"variable_tracking: value_length must be an int >= 1, got 0"),
    (lambda: synthetic_task("variable_tracking", name_vocab_size=47), ValueError,
     r"name_vocab_size=47 \+ filler_vocab_size=1 = 48 symbols"),
    (lambda: synthetic_dataset("variable_tracking", seq_len=30, seed=0), ValueError,
     r"seq_len=30 is too short .* at least 46"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments_name_the_argument(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()


def test_source_rejects_indices_outside_the_dataset():
  source = SyntheticSource(PasskeyTask(), seq_len=64, seed=0, num_examples=4)
  with pytest.raises(IndexError, match=r"index must be an int in \[0, 4\), got 4"):
    source[4]


def test_mqar_min_pairs_mixes_pair_counts():
  task = synthetic_task("mqar", num_pairs=8, min_pairs=2, num_queries=2)
  rng = np.random.default_rng(0)
  counts = []
  for _ in range(200):
    tokens, mask = task.sample(rng, 40)
    expected, where = solve_mqar(tokens, task)
    np.testing.assert_array_equal(tokens[where], expected)
    assert tokens.size == 40 and mask.sum() == 2 and np.array_equal(np.flatnonzero(mask), where)
    query_at = int(np.flatnonzero(tokens == vocab.QUERY)[0])
    symbols = tokens[1:query_at] - vocab.FIRST_SYMBOL
    counts.append(int(np.sum(symbols < task.key_vocab_size)))
  assert set(counts) == set(range(2, 9))  # every count in [min_pairs, num_pairs] is drawn


def test_mqar_read_twice_repeats_the_whole_context():
  once = synthetic_task("mqar", num_pairs=6, num_queries=3)
  twice = synthetic_task("mqar", num_pairs=6, num_queries=3, context_repeats=2)
  assert twice.min_seq_len == once.min_seq_len + 12
  tokens, mask = twice.sample(np.random.default_rng(5), 61)
  query_at = int(np.flatnonzero(tokens == vocab.QUERY)[0])
  context = tokens[1:query_at]
  leftover = (61 - twice.min_seq_len) % 2
  first, second = np.split(context[leftover:], 2)
  np.testing.assert_array_equal(first, second)
  assert mask.sum() == 3 and tokens.size == 61
