"""The synthetic long-context tasks: passkey, associative recall, key-value needle, selective copy,
ListOps, variable tracking.

A task is a frozen dataclass of its difficulty knobs. ``task.sample(rng, seq_len)`` returns
``(tokens int32 [seq_len], loss_mask float32 [seq_len])``: the sequence, written in the vocabulary
of `lsm.data.synthetic_vocab`, and 1.0 exactly on the answer tokens (``task.answer_length`` of
them). Content is placed at random among filler tokens, so asking for a longer ``seq_len`` makes
the same task longer-range (length generalisation) without changing what is asked.

Layouts (``...`` is filler; ``[...]`` marks the answer, the loss positions):

- ``PasskeyTask``:           ``BOS ... PASSKEY d1..dk ... QUERY [d1..dk]``
- ``AssociativeRecallTask``: ``BOS ..k v.. ..k v.. ... QUERY k [v] k [v] ...`` (MQAR)
- ``KeyValueNeedleTask``:    ``BOS .. KEY k1..kL VALUE v1..vD .. (many similar keys) ..
  QUERY k1..kL VALUE [v1..vD]``
- ``SelectiveCopyTask``:     ``BOS noise x1 noise noise x2 ... xn noise COPY [x1..xn]``
- ``ListOpsTask``:           ``BOS ... [MAX 2 9 [MIN 4 7 ] 0 ] QUERY [9]``
- ``VariableTrackingTask``:  ``BOS .. KEY a VALUE d1..dD .. KEY b VALUE a .. KEY c VALUE b ..
  (other chains, interleaved) .. QUERY c VALUE [d1..dD]``
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np

from lsm.data import synthetic_vocab as vocab


def _check_int(task: str, name: str, value, low: int, high: int | None = None) -> None:
  allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
      high is not None and value > high):
    raise ValueError(f"{task}: {name} must be {allowed}, got {value!r}")


def _check_depth(task: str, depth) -> None:
  if depth is not None and (isinstance(depth, bool) or not isinstance(
      depth, (int, float, np.integer, np.floating)) or not 0.0 <= depth <= 1.0):
    raise ValueError(f"{task}: depth must be a number in [0, 1] or None, got {depth!r}")


def _check_symbols(task: str, sizes: dict[str, int]) -> None:
  """The task's symbol ranges are disjoint slices of `vocab.SYMBOLS`: they must fit together."""
  if sum(sizes.values()) > vocab.NUM_SYMBOLS:
    spelled = " + ".join(f"{name}={size}" for name, size in sizes.items())
    raise ValueError(f"{task}: {spelled} = {sum(sizes.values())} symbols, but the synthetic "
                     f"vocabulary has {vocab.NUM_SYMBOLS}")


def _symbol_ranges(sizes: dict[str, int]) -> dict[str, np.ndarray]:
  ranges, start = {}, 0
  for name, size in sizes.items():
    ranges[name] = vocab.SYMBOLS[start:start + size]
    start += size
  return ranges


def _scatter(rng: np.random.Generator, blocks: list[np.ndarray], filler: np.ndarray,
             cuts: np.ndarray | None = None) -> np.ndarray:
  """``blocks`` in their order, each kept whole, at random places among ``filler`` tokens."""
  if cuts is None:
    cuts = np.sort(rng.integers(0, filler.size + 1, size=len(blocks)))
  pieces, previous = [], 0
  for cut, block in zip(cuts, blocks):
    pieces += [filler[previous:cut], block]
    previous = cut
  pieces.append(filler[previous:])
  return np.concatenate(pieces).astype(np.int32)


def _assemble(seq_len: int, context: np.ndarray, answer: list[tuple[np.ndarray, bool]]):
  """``BOS``, the context, then (tokens, is_answer) parts: the sequence and its loss mask."""
  tokens = np.concatenate([[vocab.BOS], context, *(part for part, _ in answer)]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros(1 + context.size, np.float32)] + [
      np.full(part.size, float(is_answer), np.float32) for part, is_answer in answer])
  assert tokens.size == seq_len, (tokens.size, seq_len)
  return tokens, loss_mask


class SyntheticTask(abc.ABC):
  """What every task offers: a name, its answer length, the shortest sequence it fits in."""

  name: ClassVar[str]

  @property
  @abc.abstractmethod
  def answer_length(self) -> int:
    """Answer tokens per example (the loss positions)."""

  @property
  @abc.abstractmethod
  def min_seq_len(self) -> int:
    """BOS, content, question and answer with no filler at all."""

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One example: tokens int32 [seq_len] and loss_mask float32 [seq_len]."""

  def check_seq_len(self, seq_len) -> int:
    """``seq_len`` as an int, or a ValueError if it is not one or cannot hold this task."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)):
      raise ValueError(f"{self.name}: seq_len must be an int, got {seq_len!r}")
    if seq_len < self.min_seq_len:
      raise ValueError(f"{self.name}: seq_len={seq_len} is too short for {self}; it needs at "
                       f"least {self.min_seq_len} tokens")
    return int(seq_len)

  def _filler(self, rng: np.random.Generator, symbols: np.ndarray, count: int) -> np.ndarray:
    return symbols[rng.integers(0, symbols.size, size=count)]


@dataclasses.dataclass(frozen=True)
class PasskeyTask(SyntheticTask):
  """Find the ``num_digits``-digit passkey hidden at a random depth in filler; repeat it at the end.

  Args:
    num_digits: length of the passkey (digits 0-9, one token each).
    filler_vocab_size: how many distinct filler symbols (1: a single repeated filler token).
    depth: where the passkey sits, as a fraction of the filler before it (0: right after BOS,
      1: just before the query); None draws it uniformly per example.
    unique_digits: draw the digits without repetition (``num_digits <= 10``), so "the digit after
      this one" is unambiguous and a two-layer attention model copies the key quickly; False
      allows repeated digits (harder).
  """

  name: ClassVar[str] = "passkey"
  num_digits: int = 5
  filler_vocab_size: int = 1
  depth: float | None = None
  unique_digits: bool = True

  def __post_init__(self):
    if not isinstance(self.unique_digits, bool):
      raise TypeError(f"passkey: unique_digits must be a bool, got {self.unique_digits!r}")
    _check_int(self.name, "num_digits", self.num_digits, 1,
               vocab.NUM_DIGITS if self.unique_digits else None)
    _check_int(self.name, "filler_vocab_size", self.filler_vocab_size, 1, vocab.NUM_SYMBOLS)
    _check_depth(self.name, self.depth)

  @property
  def answer_length(self) -> int:
    return self.num_digits

  @property
  def min_seq_len(self) -> int:
    return 3 + 2 * self.num_digits

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    if self.unique_digits:
      digits = vocab.DIGITS[rng.permutation(vocab.NUM_DIGITS)[:self.num_digits]]
    else:
      digits = vocab.DIGITS[rng.integers(0, vocab.NUM_DIGITS, size=self.num_digits)]
    filler = self._filler(rng, vocab.SYMBOLS[:self.filler_vocab_size],
                          seq_len - self.min_seq_len)
    cuts = None if self.depth is None else np.asarray([round(self.depth * filler.size)])
    context = _scatter(rng, [np.concatenate([[vocab.PASSKEY], digits])], filler, cuts)
    return _assemble(seq_len, context, [(np.asarray([vocab.QUERY]), False), (digits, True)])


@dataclasses.dataclass(frozen=True)
class AssociativeRecallTask(SyntheticTask):
  """Multi-query associative recall (MQAR): key-value pairs scattered in filler, then queries.

  Each pair is two tokens ``k v``; after ``QUERY`` come ``num_queries`` distinct keys of the
  context, each followed by its value (the answer). Keys, values and filler are disjoint symbol
  ranges, keys are distinct, values may repeat.

  Args:
    num_pairs: key-value pairs in the context (at most ``key_vocab_size``).
    num_queries: keys asked about (at most ``num_pairs``).
    key_vocab_size, value_vocab_size, filler_vocab_size: symbols for each role.
    context_repeats: the context (pairs and filler) appears this many times in a row before
      the queries ("Just read twice", Arora et al. 2024); the filler is split between the
      copies, any remainder goes first.
    min_pairs: when set, each example holds a number of pairs drawn uniformly from
      ``[min_pairs, num_pairs]`` (training on a mix of pair counts, as Zoology does; the rest is
      filler); ``num_queries`` must then be at most ``min_pairs``.
  """

  name: ClassVar[str] = "mqar"
  num_pairs: int = 8
  num_queries: int = 4
  key_vocab_size: int = 16
  value_vocab_size: int = 16
  filler_vocab_size: int = 1
  context_repeats: int = 1
  min_pairs: int | None = None

  def __post_init__(self):
    for field in ("key_vocab_size", "value_vocab_size", "filler_vocab_size"):
      _check_int(self.name, field, getattr(self, field), 1)
    _check_symbols(self.name, self._sizes())
    _check_int(self.name, "num_pairs", self.num_pairs, 1, self.key_vocab_size)
    if self.min_pairs is not None:
      _check_int(self.name, "min_pairs", self.min_pairs, 1, self.num_pairs)
    _check_int(self.name, "num_queries", self.num_queries, 1,
               self.num_pairs if self.min_pairs is None else self.min_pairs)
    _check_int(self.name, "context_repeats", self.context_repeats, 1)

  def _sizes(self) -> dict[str, int]:
    return {"key_vocab_size": self.key_vocab_size, "value_vocab_size": self.value_vocab_size,
            "filler_vocab_size": self.filler_vocab_size}

  @property
  def answer_length(self) -> int:
    return self.num_queries

  @property
  def min_seq_len(self) -> int:
    return 2 + 2 * self.num_pairs * self.context_repeats + 2 * self.num_queries

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    keys, values, fillers = _symbol_ranges(self._sizes()).values()
    pairs = self.num_pairs if self.min_pairs is None else int(
        rng.integers(self.min_pairs, self.num_pairs + 1))
    pair_keys = rng.choice(keys, size=pairs, replace=False)
    pair_values = values[rng.integers(0, values.size, size=pairs)]
    repeats = self.context_repeats
    spare = seq_len - self.min_seq_len + 2 * (self.num_pairs - pairs) * repeats
    filler = self._filler(rng, fillers, spare // repeats)
    context = _scatter(rng, [np.asarray(pair) for pair in zip(pair_keys, pair_values)], filler)
    if repeats > 1:
      context = np.concatenate([self._filler(rng, fillers, spare % repeats).astype(np.int32),
                                *[context] * repeats])
    asked = rng.choice(pairs, size=self.num_queries, replace=False)
    answer = [(np.asarray([vocab.QUERY]), False)]
    for pair in asked:
      answer += [(pair_keys[pair:pair + 1], False), (pair_values[pair:pair + 1], True)]
    return _assemble(seq_len, context, answer)


@dataclasses.dataclass(frozen=True)
class KeyValueNeedleTask(SyntheticTask):
  """One key-value needle among similar distractors: recall the value of the queried key.

  Each entry is ``KEY k1..kL VALUE v1..vD`` (key symbols, value digits). The distractor keys
  each differ from the needle's key in exactly one position, so no single token identifies the
  needle; the question repeats the needle's key and the answer is its value.

  Args:
    num_distractors: entries besides the needle (at most ``key_length * (key_vocab_size - 1)``,
      the number of keys one substitution away).
    key_length: symbols per key.
    value_length: digits per value.
    key_vocab_size, filler_vocab_size: symbols for keys and for filler.
    depth: where the needle sits (needle-in-a-haystack grids): that fraction of the filler and
      of the distractors (rounded) come before it, so it starts within half an entry of
      ``depth`` times the context around it (0: right after BOS, 1: just before the question);
      None places every entry at random.
  """

  name: ClassVar[str] = "kv_needle"
  num_distractors: int = 15
  key_length: int = 4
  value_length: int = 4
  key_vocab_size: int = 8
  filler_vocab_size: int = 1
  depth: float | None = None

  def __post_init__(self):
    _check_int(self.name, "key_length", self.key_length, 1)
    _check_int(self.name, "value_length", self.value_length, 1)
    _check_int(self.name, "key_vocab_size", self.key_vocab_size, 2)
    _check_int(self.name, "filler_vocab_size", self.filler_vocab_size, 1)
    _check_symbols(self.name, self._sizes())
    _check_int(self.name, "num_distractors", self.num_distractors, 0,
               self.key_length * (self.key_vocab_size - 1))
    _check_depth(self.name, self.depth)

  def _sizes(self) -> dict[str, int]:
    return {"key_vocab_size": self.key_vocab_size, "filler_vocab_size": self.filler_vocab_size}

  @property
  def answer_length(self) -> int:
    return self.value_length

  @property
  def _entry_length(self) -> int:
    return 2 + self.key_length + self.value_length

  @property
  def min_seq_len(self) -> int:
    return 1 + (self.num_distractors + 2) * self._entry_length

  def _distractor_keys(self, rng: np.random.Generator, needle: np.ndarray) -> np.ndarray:
    """``num_distractors`` distinct keys, each one substitution away from ``needle``."""
    # Substitution (position p, shift s in 1..V-1) replaces needle[p] by (needle[p] + s) mod V.
    chosen = rng.choice(self.key_length * (self.key_vocab_size - 1), size=self.num_distractors,
                        replace=False)
    places, shifts = np.divmod(chosen, self.key_vocab_size - 1)
    keys = np.repeat(needle[None], self.num_distractors, axis=0)
    keys[np.arange(self.num_distractors), places] = (
        needle[places] + shifts + 1) % self.key_vocab_size
    return keys

  def _at_depth(self, rng: np.random.Generator, entries: list[np.ndarray],
                distractors: np.ndarray, filler: np.ndarray) -> np.ndarray:
    """The needle (``entries[0]``) after ``depth`` of the filler and of the distractors."""
    cut = round(self.depth * filler.size)
    before = round(self.depth * distractors.size)
    cuts = np.concatenate([np.sort(rng.integers(0, cut + 1, size=before)), [cut],
                           np.sort(rng.integers(cut, filler.size + 1,
                                                size=distractors.size - before))])
    blocks = [entries[i] for i in distractors[:before]] + [entries[0]] + [
        entries[i] for i in distractors[before:]]
    return _scatter(rng, blocks, filler, cuts)

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    key_symbols, fillers = _symbol_ranges(self._sizes()).values()
    needle = rng.integers(0, self.key_vocab_size, size=self.key_length)
    keys = np.concatenate([needle[None], self._distractor_keys(rng, needle)])
    values = vocab.DIGITS[rng.integers(0, vocab.NUM_DIGITS, size=(len(keys), self.value_length))]
    entries = [np.concatenate([[vocab.KEY], key_symbols[key], [vocab.VALUE], value])
               for key, value in zip(keys, values)]
    order = rng.permutation(len(entries))
    filler = self._filler(rng, fillers, seq_len - self.min_seq_len)
    if self.depth is None:
      context = _scatter(rng, [entries[i] for i in order], filler)
    else:
      context = self._at_depth(rng, entries, order[order != 0], filler)
    question = np.concatenate([[vocab.QUERY], key_symbols[needle], [vocab.VALUE]])
    return _assemble(seq_len, context, [(question, False), (values[0], True)])


@dataclasses.dataclass(frozen=True)
class SelectiveCopyTask(SyntheticTask):
  """Copy the data tokens scattered among noise, in order, after the ``COPY`` marker.

  Args:
    num_data_tokens: data tokens to copy (they may repeat).
    data_vocab_size, noise_vocab_size: symbols for data and for noise (disjoint).
  """

  name: ClassVar[str] = "selective_copy"
  num_data_tokens: int = 8
  data_vocab_size: int = 16
  noise_vocab_size: int = 1

  def __post_init__(self):
    _check_int(self.name, "num_data_tokens", self.num_data_tokens, 1)
    _check_int(self.name, "data_vocab_size", self.data_vocab_size, 1)
    _check_int(self.name, "noise_vocab_size", self.noise_vocab_size, 1)
    _check_symbols(self.name, self._sizes())

  def _sizes(self) -> dict[str, int]:
    return {"data_vocab_size": self.data_vocab_size, "noise_vocab_size": self.noise_vocab_size}

  @property
  def answer_length(self) -> int:
    return self.num_data_tokens

  @property
  def min_seq_len(self) -> int:
    return 2 + 2 * self.num_data_tokens

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    data_symbols, noise_symbols = _symbol_ranges(self._sizes()).values()
    data = data_symbols[rng.integers(0, data_symbols.size, size=self.num_data_tokens)]
    noise = self._filler(rng, noise_symbols, seq_len - self.min_seq_len)
    context = _scatter(rng, [data[i:i + 1] for i in range(data.size)], noise)
    return _assemble(seq_len, context, [(np.asarray([vocab.COPY]), False), (data, True)])


LISTOPS_OPERATORS = ("MAX", "MIN", "MED", "SM")
"""ListOps operators in the order of their opening tokens ``SYMBOLS[0..3]``."""


def _listops_value(operator: int, values: list[int]) -> int:
  name = LISTOPS_OPERATORS[operator]
  if name == "MAX":
    return max(values)
  if name == "MIN":
    return min(values)
  if name == "MED":
    return sorted(values)[(len(values) - 1) // 2]
  return sum(values) % 10


@dataclasses.dataclass(frozen=True)
class ListOpsTask(SyntheticTask):
  """Evaluate a nested prefix expression over the digits 0-9 (ListOps); the answer is one digit.

  An operator token opens a list and names its operation, ``]`` closes it: ``[MAX``, ``[MIN``,
  ``[MED`` (median; the lower middle value of an even count), ``[SM`` (sum mod 10). Each takes 2
  to ``max_args`` arguments, digits or nested lists: ``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9. Tokens:
  the four operators are ``SYMBOLS[0..3]`` (in `LISTOPS_OPERATORS` order), ``]`` is
  ``SYMBOLS[4]``, filler the next ``filler_vocab_size`` symbols, digits are ``DIGITS``.

  The expression grows to a target length, so a longer ``seq_len`` asks for a longer (wider and
  deeper) expression; the tokens it leaves unused (its depth and width limits cap its size, and
  a random tree rarely hits the target exactly) are filler between ``BOS`` and the expression.

  Args:
    max_depth: deepest list nesting (1: one flat list of digits).
    max_args: most arguments of one operator (at least 2).
    min_fill: the target length is drawn uniformly from ``[min_fill, 1]`` times the room the
      sequence leaves (``seq_len - 3``); 1.0 aims to fill the whole sequence.
    filler_vocab_size: symbols for filler.
  """

  name: ClassVar[str] = "listops"
  max_depth: int = 10
  max_args: int = 10
  min_fill: float = 1.0
  filler_vocab_size: int = 1

  _NUM_OPERATOR_SYMBOLS: ClassVar[int] = len(LISTOPS_OPERATORS) + 1

  def __post_init__(self):
    _check_int(self.name, "max_depth", self.max_depth, 1, 100)
    _check_int(self.name, "max_args", self.max_args, 2)
    _check_int(self.name, "filler_vocab_size", self.filler_vocab_size, 1,
               vocab.NUM_SYMBOLS - self._NUM_OPERATOR_SYMBOLS)
    if isinstance(self.min_fill, bool) or not isinstance(
        self.min_fill, (int, float, np.integer, np.floating)) or not 0.0 < self.min_fill <= 1.0:
      raise ValueError(f"listops: min_fill must be a number in (0, 1], got {self.min_fill!r}")

  @property
  def answer_length(self) -> int:
    return 1

  @property
  def min_seq_len(self) -> int:
    return 7  # BOS [OP d d ] QUERY answer

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    room = seq_len - 3
    target = room if self.min_fill == 1.0 else int(
        rng.integers(max(4, int(np.ceil(self.min_fill * room))), room + 1))
    expression, value = self._expression(rng, target, self.max_depth)
    fillers = vocab.SYMBOLS[self._NUM_OPERATOR_SYMBOLS:
                            self._NUM_OPERATOR_SYMBOLS + self.filler_vocab_size]
    filler = self._filler(rng, fillers, room - len(expression))
    context = np.concatenate([filler, np.asarray(expression, np.int32)])
    return _assemble(seq_len, context, [(np.asarray([vocab.QUERY]), False),
                                        (vocab.DIGITS[value:value + 1], True)])

  def _expression(self, rng: np.random.Generator, budget: int,
                  depth: int) -> tuple[list[int], int]:
    """A list of at most ``budget`` (>= 4) tokens nested at most ``depth`` deep, and its value."""
    room = budget - 2
    count = int(rng.integers(2, min(self.max_args, room) + 1))
    tokens, values = [], []
    for i in range(count):
      later = count - 1 - i
      available = room - len(tokens) - later  # each later argument needs a token
      share = available
      if later:  # on average a fair part of what is left, but spread: wide and narrow subtrees
        fair = (room - len(tokens)) / (count - i)
        share = min(available, max(1, round(rng.random() * 2 * fair)))
      if depth > 1 and share >= 4:
        argument, value = self._expression(rng, share, depth - 1)
      else:
        value = int(rng.integers(0, vocab.NUM_DIGITS))
        argument = [int(vocab.DIGITS[value])]
      tokens += argument
      values.append(value)
    operator = int(rng.integers(0, len(LISTOPS_OPERATORS)))
    closer = int(vocab.SYMBOLS[len(LISTOPS_OPERATORS)])
    return [int(vocab.SYMBOLS[operator]), *tokens, closer], _listops_value(operator, values)


@dataclasses.dataclass(frozen=True)
class VariableTrackingTask(SyntheticTask):
  """Follow a chain of assignments from a variable back to its value (RULER's variable tracking).

  A chain binds a value (``value_length`` digits) to its first variable and each later variable
  to the one before: ``KEY a VALUE d1..dD``, ``KEY b VALUE a``, ``KEY c VALUE b`` (``KEY`` reads
  "variable", ``VALUE`` reads "="). ``num_chains`` chains, every variable name distinct, are
  interleaved (each keeping its own order) and scattered in filler; the question names the last
  variable of one chain, and the answer is that chain's value, ``hops`` assignments back.

  Args:
    hops: variable-to-variable assignments per chain (0: the queried variable holds the value).
    num_chains: chains in the context; all but the queried one are distractors.
    value_length: digits per value.
    name_vocab_size, filler_vocab_size: symbols for variable names and for filler; every chain
      needs ``hops + 1`` names, so ``num_chains * (hops + 1) <= name_vocab_size``.
  """

  name: ClassVar[str] = "variable_tracking"
  hops: int = 3
  num_chains: int = 2
  value_length: int = 4
  name_vocab_size: int = 16
  filler_vocab_size: int = 1

  def __post_init__(self):
    _check_int(self.name, "name_vocab_size", self.name_vocab_size, 1)
    _check_int(self.name, "filler_vocab_size", self.filler_vocab_size, 1)
    _check_symbols(self.name, self._sizes())
    _check_int(self.name, "value_length", self.value_length, 1)
    _check_int(self.name, "num_chains", self.num_chains, 1, self.name_vocab_size)
    _check_int(self.name, "hops", self.hops, 0, self.name_vocab_size // self.num_chains - 1)

  def _sizes(self) -> dict[str, int]:
    return {"name_vocab_size": self.name_vocab_size, "filler_vocab_size": self.filler_vocab_size}

  @property
  def answer_length(self) -> int:
    return self.value_length

  @property
  def min_seq_len(self) -> int:
    chain = 3 + self.value_length + 4 * self.hops
    return 1 + self.num_chains * chain + 3 + self.value_length

  def sample(self, rng: np.random.Generator, seq_len: int):
    seq_len = self.check_seq_len(seq_len)
    name_symbols, fillers = _symbol_ranges(self._sizes()).values()
    names = rng.choice(name_symbols, size=(self.num_chains, self.hops + 1), replace=False)
    values = vocab.DIGITS[rng.integers(0, vocab.NUM_DIGITS,
                                       size=(self.num_chains, self.value_length))]
    chains = [[np.concatenate([[vocab.KEY, names[c, 0], vocab.VALUE], values[c]])] + [
        np.asarray([vocab.KEY, names[c, hop], vocab.VALUE, names[c, hop - 1]])
        for hop in range(1, self.hops + 1)] for c in range(self.num_chains)]
    # A uniformly random interleaving: the chain each next statement comes from.
    turns = rng.permutation(np.repeat(np.arange(self.num_chains), self.hops + 1))
    statements = [chains[c].pop(0) for c in turns]
    filler = self._filler(rng, fillers, seq_len - self.min_seq_len)
    context = _scatter(rng, statements, filler)
    question = np.asarray([vocab.QUERY, names[0, -1], vocab.VALUE])
    return _assemble(seq_len, context, [(question, False), (values[0], True)])


SYNTHETIC_TASKS: dict[str, type[SyntheticTask]] = {
    task.name: task
    for task in (PasskeyTask, AssociativeRecallTask, KeyValueNeedleTask, SelectiveCopyTask,
                 ListOpsTask, VariableTrackingTask)}
