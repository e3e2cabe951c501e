"""Tokenizers for local text: bytes by default, or a local SentencePiece / HF tokenizers file.

Every tokenizer here has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id`` and ``eos_id`` (None when the model file defines none). Packed rows pad with id 0 and
mark padding by segment id 0, whatever id 0 means to the tokenizer.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable


class ByteTokenizer:
  """UTF-8 bytes as tokens: id 0 is padding, 1 BOS, 2 EOS, and byte ``b`` is ``b + 3``."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  byte_offset = 3
  vocab_size = 256 + byte_offset

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"ByteTokenizer.encode: text must be a str, got {type(text).__name__}")
    return [byte + self.byte_offset for byte in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of the byte ids; special ids are dropped, broken UTF-8 becomes U+FFFD."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ByteTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[0]}")
    data = bytes(i - self.byte_offset for i in ids if i >= self.byte_offset)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _import(package: str, pip_name: str, path: str):
  try:
    return importlib.import_module(package)
  except ImportError as error:
    raise ImportError(f"tokenizer={path!r} needs the '{package}' package, which is not "
                      f"installed; install it (pip install {pip_name}) or use the byte "
                      f"tokenizer (tokenizer=None)") from error


class SentencePieceTokenizer:
  """A local SentencePiece ``.model`` file (needs the ``sentencepiece`` package)."""

  def __init__(self, path: str):
    sentencepiece = _import("sentencepiece", "sentencepiece", path)
    self.path = path
    self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._processor.vocab_size())
    self.bos_id = self._special(self._processor.bos_id())
    self.eos_id = self._special(self._processor.eos_id())

  @staticmethod
  def _special(token_id: int) -> int | None:
    return None if token_id < 0 else int(token_id)

  def encode(self, text: str) -> list[int]:
    return list(self._processor.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r})"


class HuggingFaceTokenizer:
  """A local HF ``tokenizers`` ``.json`` file (needs the ``tokenizers`` package).

  BOS / EOS are the ids of the first of ``bos_tokens`` / ``eos_tokens`` the vocabulary has.
  """

  def __init__(self, path: str, *, bos_tokens=("<s>", "<bos>", "<|begin_of_text|>"),
               eos_tokens=("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>")):
    tokenizers = _import("tokenizers", "tokenizers", path)
    self.path = path
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
    self.bos_id = self._first_known(bos_tokens)
    self.eos_id = self._first_known(eos_tokens)

  def _first_known(self, names) -> int | None:
    ids = [self._tokenizer.token_to_id(name) for name in names]
    return next((int(i) for i in ids if i is not None), None)

  def encode(self, text: str) -> list[int]:
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f"HuggingFaceTokenizer({self.path!r})"


def load_tokenizer(tokenizer=None):
  """A tokenizer from a spec: None or ``"byte"`` (bytes), a ``.model`` path (SentencePiece), a
  ``.json`` path (HF tokenizers), or an object that already has ``encode`` and ``decode``."""
  if tokenizer is None or tokenizer == "byte":
    return ByteTokenizer()
  if hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
    return tokenizer
  if not isinstance(tokenizer, (str, os.PathLike)):
    raise TypeError(f"load_tokenizer: tokenizer must be None, 'byte', a path or a tokenizer "
                    f"object, got {type(tokenizer).__name__}")
  path = os.fspath(tokenizer)
  if not os.path.isfile(path):
    raise ValueError(f"load_tokenizer: tokenizer={path!r} is not 'byte' and not an existing file")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  raise ValueError(f"load_tokenizer: tokenizer={path!r} has an unknown kind; allowed: a "
                   f"SentencePiece '.model' file or a HF tokenizers '.json' file")
