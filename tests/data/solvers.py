"""Independent readers of synthetic sequences: each finds its task's content by the vocabulary
layout alone and returns (what the answer must be, the positions the loss mask must mark)."""

import numpy as np

from lsm.data import synthetic_vocab as vocab


def _only(tokens, marker) -> int:
  (where,) = np.nonzero(tokens == marker)
  assert where.size == 1, f"marker {marker} appears {where.size} times: {vocab.render(tokens)}"
  return int(where[0])


def _symbol(tokens) -> np.ndarray:
  return tokens - vocab.FIRST_SYMBOL


def solve_passkey(tokens, task):
  hidden_at, query_at = _only(tokens, vocab.PASSKEY), _only(tokens, vocab.QUERY)
  assert tokens[0] == vocab.BOS and hidden_at < query_at
  hidden = tokens[hidden_at + 1:hidden_at + 1 + task.num_digits]
  assert np.all((hidden >= vocab.FIRST_DIGIT) & (hidden < vocab.FIRST_SYMBOL))
  if task.unique_digits:
    assert len(set(hidden.tolist())) == task.num_digits
  filler = np.delete(tokens[1:query_at], np.arange(hidden_at - 1, hidden_at + task.num_digits))
  assert np.all((_symbol(filler) >= 0) & (_symbol(filler) < task.filler_vocab_size))
  assert query_at + 1 + task.num_digits == tokens.size
  return hidden, np.arange(query_at + 1, tokens.size)


def solve_mqar(tokens, task):
  query_at = _only(tokens, vocab.QUERY)
  symbols = _symbol(tokens[1:query_at])
  content = symbols[symbols < task.key_vocab_size + task.value_vocab_size]
  copies = np.split(content, task.context_repeats)  # "read twice": identical copies in a row
  assert all(np.array_equal(copy, copies[0]) for copy in copies)
  keys, values = copies[0][0::2], copies[0][1::2]
  assert np.all(keys < task.key_vocab_size) and np.all(values >= task.key_vocab_size)
  low = task.num_pairs if task.min_pairs is None else task.min_pairs
  assert low <= keys.size <= task.num_pairs and len(set(keys.tolist())) == keys.size
  value_of = dict(zip(keys.tolist(), values.tolist()))
  asked = _symbol(tokens[query_at + 1::2])
  assert asked.size == task.num_queries and len(set(asked.tolist())) == task.num_queries
  expected = np.asarray([value_of[k] for k in asked.tolist()]) + vocab.FIRST_SYMBOL
  return expected, np.arange(query_at + 2, tokens.size, 2)


def solve_kv_needle(tokens, task):
  query_at = _only(tokens, vocab.QUERY)
  entries = {}
  for start in np.nonzero(tokens[:query_at] == vocab.KEY)[0]:
    key = tuple(tokens[start + 1:start + 1 + task.key_length].tolist())
    assert tokens[start + 1 + task.key_length] == vocab.VALUE
    value_at = start + 2 + task.key_length
    assert key not in entries, "two entries share a key"
    entries[key] = tokens[value_at:value_at + task.value_length]
  assert len(entries) == task.num_distractors + 1
  needle = tuple(tokens[query_at + 1:query_at + 1 + task.key_length].tolist())
  assert tokens[query_at + 1 + task.key_length] == vocab.VALUE
  for key in entries:
    if key != needle:
      assert sum(a != b for a, b in zip(key, needle)) == 1, "a distractor is not similar"
  answer_at = query_at + 2 + task.key_length
  assert answer_at + task.value_length == tokens.size
  return entries[needle], np.arange(answer_at, tokens.size)


def solve_selective_copy(tokens, task):
  copy_at = _only(tokens, vocab.COPY)
  symbols = _symbol(tokens[1:copy_at])
  assert np.all(symbols < task.data_vocab_size + task.noise_vocab_size)
  data = symbols[symbols < task.data_vocab_size] + vocab.FIRST_SYMBOL
  assert data.size == task.num_data_tokens
  return data, np.arange(copy_at + 1, tokens.size)


def parse_listops(tokens, task):
  """The expression of a ListOps sequence as nested ``(operator name, [arguments])`` tuples
  (digits are ints), and where it starts. Layout: operators ``SYMBOLS[0..3]`` = MAX MIN MED SM,
  ``]`` = ``SYMBOLS[4]``, then filler symbols, all before the expression."""
  operators = {vocab.SYMBOLS[i]: name for i, name in enumerate(("MAX", "MIN", "MED", "SM"))}
  closer, first_filler = vocab.SYMBOLS[4], vocab.SYMBOLS[5]
  query_at = _only(tokens, vocab.QUERY)
  assert tokens[0] == vocab.BOS and query_at == tokens.size - 2
  body = tokens[1:query_at]
  start = int(np.argmax(body < first_filler))
  assert np.all((body[:start] >= first_filler) & (
      body[:start] < first_filler + task.filler_vocab_size)), vocab.render(tokens)
  stack, expression = [], None
  for token in body[start:].tolist():
    assert expression is None, f"tokens after the expression ends: {vocab.render(tokens)}"
    if token in operators:
      stack.append((operators[token], []))
    elif token == closer:
      done = stack.pop()
      if stack:
        stack[-1][1].append(done)
      else:
        expression = done
    else:
      assert vocab.FIRST_DIGIT <= token < vocab.FIRST_SYMBOL, vocab.render(tokens)
      stack[-1][1].append(token - vocab.FIRST_DIGIT)
  assert expression is not None and not stack, f"unbalanced: {vocab.render(tokens)}"
  return expression, 1 + start


def evaluate_listops(expression) -> int:
  if isinstance(expression, int):
    return expression
  name, arguments = expression
  values = sorted(evaluate_listops(a) for a in arguments)
  return {"MAX": values[-1], "MIN": values[0], "MED": values[(len(values) - 1) // 2],
          "SM": sum(values) % 10}[name]


def listops_shape(expression) -> tuple[int, int, int]:
  """(nesting depth, fewest and most arguments of an operator) of a parsed expression."""
  if isinstance(expression, int):
    return 0, 10**9, 0
  shapes = [listops_shape(a) for a in expression[1]]
  arguments = len(expression[1])
  return (1 + max(s[0] for s in shapes), min([arguments] + [s[1] for s in shapes]),
          max([arguments] + [s[2] for s in shapes]))


def solve_listops(tokens, task):
  expression, _ = parse_listops(tokens, task)
  depth, fewest, most = listops_shape(expression)
  assert depth <= task.max_depth and 2 <= fewest and most <= task.max_args, (depth, fewest, most)
  return np.asarray([vocab.DIGITS[evaluate_listops(expression)]]), np.asarray([tokens.size - 1])


def solve_variable_tracking(tokens, task):
  """Reads every ``KEY name VALUE rhs`` statement (rhs: digits or a defined name), checks the
  chains' shape, and follows the queried name back to its digits."""
  query_at = _only(tokens, vocab.QUERY)
  is_digit = (tokens >= vocab.FIRST_DIGIT) & (tokens < vocab.FIRST_SYMBOL)
  bound, covered = {}, np.zeros(tokens.size, bool)
  for start in np.nonzero(tokens[:query_at] == vocab.KEY)[0].tolist():
    name = int(tokens[start + 1])
    assert 0 <= _symbol(name) < task.name_vocab_size and tokens[start + 2] == vocab.VALUE
    assert name not in bound, f"{vocab.token_name(name)} assigned twice: {vocab.render(tokens)}"
    if is_digit[start + 3]:
      rhs = tokens[start + 3:start + 3 + task.value_length]
      assert np.all(is_digit[start + 3:start + 3 + task.value_length])
    else:
      rhs = int(tokens[start + 3])
      assert rhs in bound, f"{vocab.token_name(rhs)} used before it is assigned"
    bound[name] = rhs
    covered[start:start + 3 + (task.value_length if is_digit[start + 3] else 1)] = True
  filler = _symbol(tokens[1:query_at][~covered[1:query_at]])
  assert np.all((filler >= task.name_vocab_size) & (
      filler < task.name_vocab_size + task.filler_vocab_size)), vocab.render(tokens)
  roots = [name for name, rhs in bound.items() if not isinstance(rhs, int)]
  assert len(roots) == task.num_chains and len(bound) == task.num_chains * (task.hops + 1)
  referenced = [rhs for rhs in bound.values() if isinstance(rhs, int)]
  assert len(set(referenced)) == len(referenced), "a chain branches"
  name, hops = int(tokens[query_at + 1]), 0
  assert tokens[query_at + 2] == vocab.VALUE and name not in referenced, "not a chain's end"
  while isinstance(bound[name], int):
    name, hops = bound[name], hops + 1
  assert hops == task.hops
  answer_at = query_at + 3
  assert answer_at + task.value_length == tokens.size
  return bound[name], np.arange(answer_at, tokens.size)


SOLVERS = {"passkey": solve_passkey, "mqar": solve_mqar, "kv_needle": solve_kv_needle,
           "selective_copy": solve_selective_copy, "listops": solve_listops,
           "variable_tracking": solve_variable_tracking}
