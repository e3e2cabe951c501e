"""Local text as a grain dataset: ``.txt`` / ``.jsonl`` files, tokenized, packed into rows.

A ``.txt`` file is one document; a ``.jsonl`` file holds one document per non-blank line, the
string under ``jsonl_field``. Files are read, tokenized and laid out in rows once, when the
dataset is built (this is for local corpora that fit in memory); rows are then random access.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from lsm.data.packing import PackedDocuments
from lsm.data.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")


def expand_paths(paths) -> list[str]:
  """Files named by ``paths``: one path or glob pattern, or a sequence of them, in the given
  order (the matches of one pattern sorted). A pattern that matches nothing is an error."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not isinstance(paths, Sequence) or not paths:
    raise ValueError(f"paths must be a path, a glob pattern or a non-empty sequence of them, got "
                     f"{paths!r}")
  files = []
  for pattern in map(os.fspath, paths):
    if any(char in pattern for char in "*?["):
      matches = sorted(glob.glob(pattern, recursive=True))
    else:
      matches = [pattern] if os.path.exists(pattern) else []
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise ValueError(f"paths: {pattern!r} matches no file")
    for match in matches:
      if not match.endswith(TEXT_SUFFIXES):
        raise ValueError(f"paths: {match!r} is neither of the text kinds {TEXT_SUFFIXES}")
    files += matches
  return files


def _read(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as error:
    raise ValueError(f"paths: {path!r} is not UTF-8 text ({error})") from error


def _jsonl_documents(path: str, field: str) -> list[str]:
  documents = []
  for number, line in enumerate(_read(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: a record must be a JSON object, got "
                       f"{type(record).__name__}")
    if not isinstance(record.get(field), str):
      raise ValueError(f"{path}:{number}: jsonl_field={field!r} must name a string field of "
                       f"every record; this record has fields {sorted(record)}")
    documents.append(record[field])
  return documents


def read_documents(paths, *, jsonl_field: str = "text") -> list[str]:
  """The documents of the files named by ``paths`` (see `expand_paths`), in order."""
  if not isinstance(jsonl_field, str) or not jsonl_field:
    raise ValueError(f"read_documents: jsonl_field must be a non-empty str, got {jsonl_field!r}")
  documents = []
  for path in expand_paths(paths):
    if path.endswith(".jsonl"):
      documents += _jsonl_documents(path, jsonl_field)
    else:
      documents.append(_read(path))
  return documents


def text_dataset(paths, *, seq_len: int, tokenizer=None, jsonl_field: str = "text",
                 add_bos: bool = True, add_eos: bool = True) -> grain.MapDataset:
  """A grain `MapDataset` of packed rows of local text (see `lsm.data.packing` for the rows).

  Args:
    paths: a path or glob pattern of ``.txt`` / ``.jsonl`` files, or a sequence of them.
    seq_len: tokens per row.
    tokenizer: None (bytes), a SentencePiece ``.model`` or HF tokenizers ``.json`` path, or an
      object with ``encode``; see `load_tokenizer`.
    jsonl_field: the field of each ``.jsonl`` record that holds its text.
    add_bos, add_eos: wrap each document in the tokenizer's BOS / EOS ids.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"text_dataset: seq_len must be a positive int, got {seq_len!r}")
  tokenizer = load_tokenizer(tokenizer)
  for flag, value, token_id in (("add_bos", add_bos, tokenizer.bos_id),
                                ("add_eos", add_eos, tokenizer.eos_id)):
    if not isinstance(value, bool):
      raise TypeError(f"text_dataset: {flag} must be a bool, got {value!r}")
    if value and token_id is None:
      raise ValueError(f"text_dataset: {flag}=True, but {tokenizer} has no such token; pass "
                       f"{flag}=False")
  prefix = [tokenizer.bos_id] if add_bos else []
  suffix = [tokenizer.eos_id] if add_eos else []
  documents = [np.asarray(prefix + tokenizer.encode(text) + suffix, np.int64)
               for text in read_documents(paths, jsonl_field=jsonl_field)]
  return grain.MapDataset.source(PackedDocuments(documents, seq_len=seq_len))
