"""MQAR sweeps: each point is scored on examples with that many pairs (the forward pass's answers
on exactly those), one result per run labelled by its mixers and state size, the plots, the CLI
with several runs, errors."""

import json

import numpy as np
import pytest

from lsm.data import synthetic_task
from lsm.eval import mqar
from lsm.train.data import synthetic_eval_batches
from tests.data.solvers import solve_mqar
from tests.eval.helpers import LENGTH, reference_scores, tiny_config

PAIRS = [4, 8, 16]  # 4 queries each; 16 pairs fill 42 of the 48 tokens


def test_each_point_is_scored_on_examples_with_that_many_pairs(tiny):
  model, config = tiny
  rows = mqar.evaluate_pairs(model, config, pairs=PAIRS, examples=4, batch_size=4,
                             progress=lambda _: None)
  assert [(r["num_pairs"], r["length"], r["examples"]) for r in rows] == [
      (n, LENGTH, 4) for n in PAIRS]
  for row in rows:
    batches = synthetic_eval_batches("mqar", seq_len=LENGTH, seed=0, examples=4, batch_size=4,
                                     task_options={"num_pairs": row["num_pairs"]})
    task = synthetic_task("mqar", num_pairs=row["num_pairs"])
    for tokens in batches[0]["tokens"]:
      solve_mqar(tokens, task)  # asserts num_pairs distinct keys in the context
    reference = reference_scores(model, batches)
    assert row["token_accuracy"] == pytest.approx(reference["token_accuracy"])
    assert row["exact_match"] == reference["exact_match"]
    assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  assert len({r["loss"] for r in rows}) == 3


def test_describe_labels_runs_by_mixer_and_state_size(tiny):
  model, config = tiny
  assert mqar.describe(config, model) | {"params": None} == {
      "label": "attention d=32", "layer_pattern": ["attention"], "d_model": 32,
      "state_size": None, "params": None}
  assert mqar.describe(config, model)["params"] > 0
  ssm = tiny_config(layer_pattern=["mamba2", "attention"], ssm=dict(state_size=64))
  assert mqar.describe(ssm) == {"label": "mamba2+attention d=32 N=64",
                                "layer_pattern": ["mamba2", "attention"], "d_model": 32,
                                "state_size": 64, "params": None}


def test_state_size_plot_needs_two_state_sizes(tmp_path):
  def result(state_size, accuracies):
    return {"label": f"N={state_size}", "state_size": state_size,
            "rows": [{"num_pairs": n, "token_accuracy": a} for n, a in zip((4, 8), accuracies)]}

  runs = [result(16, (1.0, 0.5)), result(64, (1.0, 0.9)), result(None, (1.0, 1.0))]
  assert mqar.plot_state_sizes(runs, tmp_path / "state.png", "s").stat().st_size > 0
  assert mqar.plot_state_sizes(runs[:1] + runs[2:], tmp_path / "none.png", "s") is None
  assert not (tmp_path / "none.png").exists()
  assert mqar.plot_pairs(runs, tmp_path / "pairs.png", "p").stat().st_size > 0


def test_cli_evaluates_several_runs(tmp_path, tiny, fake_runs, capsys):
  from lsm import evaluate  # noqa: PLC0415
  model, config = tiny
  wide = config.model_copy(update={"model": config.model.model_copy(update={"d_model": 64})})
  calls = fake_runs({"runs/a": (model, config), "runs/b": (model, wide)})
  assert evaluate.main(["--run", "runs/a", "--run", "runs/b", "--mqar-pairs", "4,8",
                        "--examples", "4", "--out", str(tmp_path)]) == 0
  assert [run for run, _ in calls] == ["runs/a", "runs/b"]
  out = capsys.readouterr().out
  assert "| attention d=32 |" in out and "| attention d=64 |" in out
  result = json.loads((tmp_path / "eval-mqar-pairs.json").read_text())
  assert [r["run"] for r in result["runs"]] == ["runs/a", "runs/b"]
  assert [[row["num_pairs"] for row in r["rows"]] for r in result["runs"]] == [[4, 8], [4, 8]]
  # The same model under two labels: the same numbers.
  first, second = ([row["token_accuracy"] for row in r["rows"]] for r in result["runs"])
  np.testing.assert_array_equal(first, second)
  assert (tmp_path / "eval-mqar-pairs.png").stat().st_size > 0
  assert not (tmp_path / "eval-mqar-state.png").exists()  # attention runs have no state size
  assert evaluate.main(["--run", "runs/a", "--mqar-pairs", "2", "--out", str(tmp_path)]) == 2
  assert ("--mqar-pairs: evaluate_pairs: 2 pairs do not fit the mqar task (options {}) at 48 "
          "tokens: mqar: num_queries must be an int in [1, 2], got 4") in capsys.readouterr().err
  assert evaluate.main(["--run", "runs/a", "--run", "runs/b"]) == 2
  assert "--run: give one run (several only with --mqar-pairs)" in capsys.readouterr().err


@pytest.mark.parametrize("pairs, pattern", [
    ([], r"pairs must be a non-empty list of positive ints, got \[\]"),
    ([4, 0], r"pairs must be a non-empty list of positive ints, got \[4, 0\]"),
    ([17], r"17 pairs do not fit .* num_pairs must be an int in \[1, 16\], got 17"),
])
def test_bad_pairs_name_the_argument(tiny, pairs, pattern):
  model, config = tiny
  with pytest.raises(ValueError, match=pattern):
    mqar.evaluate_pairs(model, config, pairs=pairs, examples=1, batch_size=1)
