"""Local text: the byte tokenizer, reading .txt / .jsonl by path or glob, packed text rows."""

import json
import os
import sys

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lsm.data import (ByteTokenizer, expand_paths, load_tokenizer, read_documents,
                      text_dataset)

SAMPLE = os.path.join(os.path.dirname(__file__), "sample.txt")


@hypothesis.given(text=st.text())
def test_byte_tokenizer_round_trip(text):
  tokenizer = ByteTokenizer()
  ids = tokenizer.encode(text)
  assert all(tokenizer.byte_offset <= i < tokenizer.vocab_size for i in ids)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == text


def test_byte_tokenizer_non_ascii():
  tokenizer = ByteTokenizer()
  text = "naïve café, Σας ευχαριστούμε, 灯台 🌊"
  ids = tokenizer.encode(text)
  assert len(ids) == len(text.encode("utf-8")) > len(text)
  assert tokenizer.encode("A") == [ord("A") + 3]
  assert tokenizer.vocab_size == 259
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids[:-1]).endswith("\ufffd"), "a cut character decodes as U+FFFD"
  with pytest.raises(ValueError, match=r"ids must be in \[0, 259\), got 300"):
    tokenizer.decode([300])
  with pytest.raises(TypeError, match=r"text must be a str, got bytes"):
    tokenizer.encode(b"abc")


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_reads_txt_and_jsonl_in_order(tmp_path):
  _write(tmp_path / "b.txt", "second file\nstill the second")
  _write(tmp_path / "a.txt", "first file")
  records = [{"text": "one", "id": 1}, {"text": "two ✓", "id": 2}]
  _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
  _write(tmp_path / "d.jsonl", json.dumps({"body": "in body"}) + "\n")
  assert read_documents(str(tmp_path / "*.txt")) == ["first file",
                                                     "second file\nstill the second"]
  assert read_documents([tmp_path / "c.jsonl", str(tmp_path / "a.txt")]) == [
      "one", "two ✓", "first file"]
  assert read_documents(str(tmp_path / "d.jsonl"), jsonl_field="body") == ["in body"]


def test_path_errors(tmp_path):
  with pytest.raises(ValueError, match=r"paths: '.*\*\.jsonl' matches no file"):
    expand_paths(str(tmp_path / "*.jsonl"))
  with pytest.raises(ValueError, match=r"paths: '.*missing\.txt' matches no file"):
    expand_paths(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match=r"paths must be .* non-empty sequence"):
    expand_paths([])
  _write(tmp_path / "notes.md", "# not text for us")
  with pytest.raises(ValueError, match=r"notes\.md' is neither of the text kinds"):
    expand_paths(str(tmp_path / "*.md"))


def test_jsonl_errors_name_file_line_and_field(tmp_path):
  path = _write(tmp_path / "x.jsonl", json.dumps({"text": "fine"}) + "\n" +
                json.dumps({"content": "no text"}) + "\n")
  with pytest.raises(ValueError, match=r"x\.jsonl:2: jsonl_field='text' .* \['content'\]"):
    read_documents(path)
  bad = _write(tmp_path / "y.jsonl", "{not json\n")
  with pytest.raises(ValueError, match=r"y\.jsonl:1: not a JSON object"):
    read_documents(bad)


def test_text_rows_give_back_the_file():
  seq_len = 128
  dataset = text_dataset(SAMPLE, seq_len=seq_len)
  with open(SAMPLE, encoding="utf-8") as f:
    text = f.read()
  tokenizer = ByteTokenizer()
  assert len(dataset) == -(-(len(text.encode("utf-8")) + 2) // seq_len)
  rows = list(dataset)
  for row in rows:
    assert row["tokens"].shape == (seq_len,) and row["tokens"].dtype == np.int32
    assert row["tokens"].max() < tokenizer.vocab_size
  real = np.concatenate([row["tokens"][row["segment_ids"] > 0] for row in rows])
  assert real[0] == tokenizer.bos_id and real[-1] == tokenizer.eos_id
  assert tokenizer.decode(real) == text
  # One document longer than a row: every row is one piece, positions restart per row.
  for row in rows:
    assert set(row["segment_ids"][row["segment_ids"] > 0]) == {1}
    np.testing.assert_array_equal(row["positions"][:3], [0, 1, 2])


def test_text_rows_pack_several_documents(tmp_path):
  path = _write(tmp_path / "docs.jsonl", "".join(
      json.dumps({"text": word}) + "\n" for word in ["ab", "cde", "f"]))
  rows = list(text_dataset(path, seq_len=8))
  tokenizer = ByteTokenizer()
  b, e = tokenizer.bos_id, tokenizer.eos_id
  enc = tokenizer.encode
  # "cde" with BOS/EOS is 5 tokens: it does not fit after the 4 of "ab", so row 0 is padded.
  assert [row["tokens"].tolist() for row in rows] == [
      [b, *enc("ab"), e, 0, 0, 0, 0], [b, *enc("cde"), e, b, *enc("f"), e]]
  assert [row["segment_ids"].tolist() for row in rows] == [
      [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]]
  assert rows[1]["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_text_dataset_without_bos_eos(tmp_path):
  path = _write(tmp_path / "t.txt", "hello")
  row = text_dataset(path, seq_len=8, add_bos=False, add_eos=False)[0]
  assert row["tokens"].tolist() == ByteTokenizer().encode("hello") + [0, 0, 0]
  assert row["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]


def test_tokenizer_arguments(tmp_path, monkeypatch):
  assert isinstance(load_tokenizer(None), ByteTokenizer)
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)
  custom = ByteTokenizer()
  assert load_tokenizer(custom) is custom
  with pytest.raises(ValueError, match=r"tokenizer='nowhere\.model' is not 'byte' and not an"):
    load_tokenizer("nowhere.model")
  with pytest.raises(TypeError, match=r"tokenizer must be None, 'byte', a path .* got int"):
    load_tokenizer(3)
  vocab_file = _write(tmp_path / "vocab.txt", "a\nb\n")
  with pytest.raises(ValueError, match=r"tokenizer='.*vocab\.txt' has an unknown kind"):
    load_tokenizer(vocab_file)
  # A missing optional package is named, with the argument that needed it.
  for package, suffix in (("sentencepiece", ".model"), ("tokenizers", ".json")):
    model = _write(tmp_path / f"tok{suffix}", "{}")
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=rf"tokenizer='.*tok\{suffix}' needs the '{package}'"):
      load_tokenizer(model)


class _NoBosTokenizer(ByteTokenizer):
  bos_id = None


def test_add_bos_needs_a_bos_token(tmp_path):
  path = _write(tmp_path / "t.txt", "hello")
  with pytest.raises(ValueError, match=r"add_bos=True, but .* has no such token"):
    text_dataset(path, seq_len=8, tokenizer=_NoBosTokenizer())
  assert text_dataset(path, seq_len=8, tokenizer=_NoBosTokenizer(), add_bos=False)[0][
      "tokens"][0] == ByteTokenizer().encode("h")[0]


def test_sentencepiece_model(tmp_path):
  sentencepiece = pytest.importorskip("sentencepiece")
  prefix = str(tmp_path / "sp")
  sentencepiece.SentencePieceTrainer.train(input=SAMPLE, model_prefix=prefix, vocab_size=120,
                                           character_coverage=1.0, bos_id=1, eos_id=2)
  tokenizer = load_tokenizer(prefix + ".model")
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 120)
  assert tokenizer.decode(tokenizer.encode("the lamp was lit")) == "the lamp was lit"
  row = text_dataset(SAMPLE, seq_len=64, tokenizer=prefix + ".model")[0]
  assert row["tokens"][0] == 1 and row["tokens"].max() < 120


def test_huggingface_tokenizers_file(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  words = ["<s>", "</s>", "[UNK]", "the", "lamp", "was", "lit"]
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
  hf = tokenizers.Tokenizer(model)
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  path = str(tmp_path / "tokenizer.json")
  hf.save(path)
  tokenizer = load_tokenizer(path)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, len(words))
  assert tokenizer.encode("the lamp was lit") == [3, 4, 5, 6]
  assert tokenizer.decode([3, 4]) == "the lamp"
  text = _write(tmp_path / "t.txt", "the lamp was lit")
  assert text_dataset(text, seq_len=8, tokenizer=path)[0]["tokens"].tolist() == [
      0, 3, 4, 5, 6, 1, 0, 0]


def test_text_dataset_checks_seq_len():
  with pytest.raises(ValueError, match=r"text_dataset: seq_len must be a positive int, got 0"):
    text_dataset(SAMPLE, seq_len=0)
