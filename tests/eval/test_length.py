"""The length table, ``python -m lsm.evaluate --run R --task X``: every synthetic task runs
through it, also on a run trained on another task (whose knobs must not leak into it), and its
rows are the forward pass's scores on those examples."""

import json

import pytest

from lsm.data import SYNTHETIC_TASKS
from lsm.train.data import synthetic_eval_batches
from tests.eval.helpers import LENGTH, reference_scores

KV_NEEDLE = ["data.task=kv_needle",
             "data.task_options={num_distractors: 3, key_length: 2, value_length: 2}"]


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_every_task_through_the_cli(task, tmp_path, tiny, fake_runs, capsys):
  from lsm import evaluate  # noqa: PLC0415
  model, _ = tiny
  fake_runs({str(tmp_path): tiny})
  # kv_needle's defaults need 171 tokens: its knobs come as the run's own task's.
  extra = KV_NEEDLE if task == "kv_needle" else []
  assert evaluate.main(["--run", str(tmp_path), "--task", task, "--lengths", str(LENGTH),
                        "--examples", "4", *extra]) == 0
  assert f"| {LENGTH} | 1 | none |" in capsys.readouterr().out
  (row,) = json.loads((tmp_path / f"eval-{task}.json").read_text())["rows"]
  # The run's own task keeps its knobs; any other task takes its defaults.
  options = {"passkey": dict(num_digits=3),
             "kv_needle": dict(num_distractors=3, key_length=2, value_length=2)}.get(task, {})
  reference = reference_scores(model, synthetic_eval_batches(
      task, seq_len=LENGTH, seed=0, examples=4, batch_size=4, task_options=options))
  assert row["examples"] == 4 and row["exact_match"] == reference["exact_match"]
  assert row["token_accuracy"] == pytest.approx(reference["token_accuracy"])
  assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_unknown_task_names_the_choices(tmp_path, tiny, fake_runs, capsys):
  from lsm import evaluate  # noqa: PLC0415
  fake_runs({str(tmp_path): tiny})
  assert evaluate.main(["--run", str(tmp_path), "--task", "needle"]) == 2
  assert "--task: must be one of ['kv_needle', 'listops', 'mqar', 'passkey'" in (
      capsys.readouterr().err)
