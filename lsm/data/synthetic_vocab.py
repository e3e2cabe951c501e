"""The one small vocabulary every synthetic task in lsm writes its sequences in.

========  ==========================  ===================================================
id        name                        role
========  ==========================  ===================================================
0         ``PAD``                     padding (never produced by a task; rows are full)
1         ``BOS``                     first token of every example
2         ``PASSKEY``                 "the pass key is": the hidden digits follow
3         ``QUERY``                   the question starts: what follows is the query
4         ``KEY``                     a key / variable starts (key-value needle, variable tracking)
5         ``VALUE``                   a value starts; "=" (key-value needle, variable tracking)
6         ``COPY``                    "copy the data tokens now" (selective copy)
7 .. 16   ``DIGITS[0] .. DIGITS[9]``  the digits 0-9 (passkeys, needle and variable values)
17 .. 63  ``SYMBOLS[0] .. [46]``      content symbols: fillers, keys, values, data, noise
========  ==========================  ===================================================

Each task carves disjoint ranges out of ``SYMBOLS`` (e.g. associative recall uses the first
``key_vocab_size`` symbols for keys, the next ``value_vocab_size`` for values and the next
``filler_vocab_size`` for filler), so a role is always readable from a token id alone.
"""

from __future__ import annotations

import numpy as np

PAD = 0
BOS = 1
PASSKEY = 2
QUERY = 3
KEY = 4
VALUE = 5
COPY = 6

NUM_DIGITS = 10
FIRST_DIGIT = 7
DIGITS = np.arange(FIRST_DIGIT, FIRST_DIGIT + NUM_DIGITS, dtype=np.int32)

SYNTHETIC_VOCAB_SIZE = 64
FIRST_SYMBOL = FIRST_DIGIT + NUM_DIGITS
NUM_SYMBOLS = SYNTHETIC_VOCAB_SIZE - FIRST_SYMBOL
SYMBOLS = np.arange(FIRST_SYMBOL, SYNTHETIC_VOCAB_SIZE, dtype=np.int32)

_MARKER_NAMES = {PAD: "<pad>", BOS: "<bos>", PASSKEY: "<passkey>", QUERY: "<query>",
                 KEY: "<key>", VALUE: "<value>", COPY: "<copy>"}


def token_name(token: int) -> str:
  """A readable name for one synthetic token id: ``<query>``, ``3`` (a digit), ``s12``."""
  token = int(token)
  if token in _MARKER_NAMES:
    return _MARKER_NAMES[token]
  if FIRST_DIGIT <= token < FIRST_SYMBOL:
    return str(token - FIRST_DIGIT)
  if FIRST_SYMBOL <= token < SYNTHETIC_VOCAB_SIZE:
    return f"s{token - FIRST_SYMBOL}"
  raise ValueError(f"token_name: token must be in [0, {SYNTHETIC_VOCAB_SIZE}), got {token}")


def render(tokens) -> str:
  """A synthetic sequence as space-separated token names (for logs and failing tests)."""
  return " ".join(token_name(t) for t in np.asarray(tokens).reshape(-1))
