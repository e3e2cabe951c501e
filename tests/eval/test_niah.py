"""Needle-in-a-haystack grid: every cell scores needles placed at its depth (the forward pass's
answers on exactly those examples), lengths past training get the RoPE scaling, decoding with a
cache policy that holds everything scores the same, the CLI writes JSON and a heatmap, errors
name the argument."""

import json

import numpy as np
import pytest

from lsm.data import synthetic_vocab as vocab
from lsm.eval import niah, rope_overrides
from lsm.train.data import synthetic_eval_batches
from tests.eval.helpers import reference_scores

KNOBS = dict(num_distractors=3, key_length=2, value_length=2)  # entries of 6 tokens, 31 at least
ENTRY = 6


def test_each_cell_is_scored_on_needles_at_its_depth(tiny, tmp_path):
  model, config = tiny
  loads = []

  def load(overrides):
    loads.append(overrides)
    return model

  rows = niah.evaluate_niah(load, config, task="kv_needle", lengths=[40, 96], depths=[0.0, 1.0],
                            examples=4, batch_size=4, rope_scaling="yarn", task_options=KNOBS,
                            progress=lambda _: None)
  assert [(r["length"], r["depth"]) for r in rows] == [(40, 0.0), (40, 1.0), (96, 0.0),
                                                       (96, 1.0)]
  assert loads == [[], rope_overrides(config, 96, "yarn")] and loads[1]
  assert [r["rope_scaling"] for r in rows] == ["none", "none", "yarn", "yarn"]
  for row in rows:
    batches = synthetic_eval_batches("kv_needle", seq_len=row["length"], seed=0, examples=4,
                                     batch_size=4, task_options={**KNOBS, "depth": row["depth"]})
    for tokens in batches[0]["tokens"]:
      query_at = int(np.argmax(tokens == vocab.QUERY))
      needle_at = 1 if row["depth"] == 0 else query_at - ENTRY
      assert tokens[needle_at] == vocab.KEY, vocab.render(tokens)
      np.testing.assert_array_equal(tokens[needle_at + 1:needle_at + 3],
                                    tokens[query_at + 1:query_at + 3])
    reference = reference_scores(model, batches)
    assert row["examples"] == 4 and row["exact_match"] == reference["exact_match"]
    assert row["token_accuracy"] == pytest.approx(reference["token_accuracy"])
    assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  assert rows[0]["loss"] != rows[1]["loss"]
  assert niah.plot(rows, tmp_path / "grid.png", "grid").stat().st_size > 0


def test_cli_grid_and_a_cache_policy(tmp_path, tiny, fake_runs, capsys):
  from lsm import evaluate  # noqa: PLC0415
  fake_runs({str(tmp_path): tiny})
  task = ["data.task=kv_needle", "data.task_options={num_distractors: 3, key_length: 2, "
          "value_length: 2}"]
  grid = ["--run", str(tmp_path), "--niah-grid", "--lengths", "40", "--depths", "0,0.5,1",
          "--examples", "4", *task]
  assert evaluate.main(grid) == 0
  assert "| 0.5 |" in capsys.readouterr().out
  result = json.loads((tmp_path / "eval-niah-kv_needle.json").read_text())
  assert result["depths"] == [0, 0.5, 1] and len(result["rows"]) == 3
  assert (tmp_path / "eval-niah-kv_needle.png").stat().st_size > 0
  # Decoded with a sink + window cache that holds the whole sequence: the same answers.
  assert evaluate.main([*grid, "decode.cache_policy=sink_window",
                        "decode.sink_window.window=64", "--out", str(tmp_path / "decoded")]) == 0
  decoded = json.loads((tmp_path / "decoded" / "eval-niah-kv_needle.json").read_text())["rows"]
  for forward, row in zip(result["rows"], decoded):
    assert row["scoring"].startswith("decode (SinkWindowPolicy(") and forward["scoring"] == (
        "forward")
    assert (row["exact_match"], row["token_accuracy"]) == (forward["exact_match"],
                                                           forward["token_accuracy"])
    assert row["loss"] == pytest.approx(forward["loss"], rel=1e-5)
  capsys.readouterr()
  assert evaluate.main(["--run", str(tmp_path), "--niah-grid", "--task", "mqar"]) == 2
  assert "the task 'mqar' has no needle depth; give --task, one of ['kv_needle', 'passkey']" in (
      capsys.readouterr().err)
  assert evaluate.main(["--run", str(tmp_path), "--depths", "0.5"]) == 2
  assert "--depths: only with --niah-grid" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(task="mqar"), r"task must be one with a depth knob \(\['kv_needle', 'passkey'\]\), "
                        r"got 'mqar'"),
    (dict(depths=[0.5, 1.5]), r"depths must be a non-empty list of numbers in \[0, 1\], got "
                              r"\[0.5, 1.5\]"),
    (dict(lengths=[]), r"lengths must be a non-empty list of ints, got \[\]"),
])
def test_bad_arguments_name_the_argument(tiny, kwargs, pattern):
  _, config = tiny
  arguments = {**dict(task="passkey", lengths=[48], examples=1, batch_size=1,
                      rope_scaling="none"), **kwargs}
  with pytest.raises(ValueError, match=pattern):
    niah.evaluate_niah(lambda _: None, config, **arguments)
