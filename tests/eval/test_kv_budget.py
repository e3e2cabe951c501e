"""Accuracy against KV budget: the full-cache row equals the teacher-forced forward pass (so the
decode loop reads the answers right), a budget that holds everything equals the full cache,
policies map from budgets as documented, the CLI writes JSON and PNG."""

import json

import pytest

from lsm import layers
from lsm.eval import kv_budget
from lsm.train.data import synthetic_eval_batches
from tests.eval.helpers import LENGTH, reference_scores


def test_full_cache_row_equals_the_forward_pass_and_roomy_budgets_equal_it(tiny):
  model, config = tiny
  rows = kv_budget.evaluate_budgets(model, config, task="passkey", length=LENGTH,
                                    budgets=[LENGTH], policies=("heavy_hitter", "snapkv"),
                                    examples=12, batch_size=6, progress=lambda _: None)
  reference = reference_scores(model, synthetic_eval_batches(
      "passkey", seq_len=LENGTH, seed=0, examples=12, batch_size=6,
      task_options=dict(num_digits=3)))
  full = rows[0]
  assert full["policy"] == "full" and full["examples"] == 12
  assert full["exact_match"] == reference["exact_match"]
  assert full["token_accuracy"] == pytest.approx(reference["token_accuracy"])
  assert 0 < full["token_accuracy"] < 1  # an untrained model: some right, some wrong
  for row in rows[1:]:
    assert (row["exact_match"], row["token_accuracy"]) == (full["exact_match"],
                                                           full["token_accuracy"])


def test_budgets_map_to_policies():
  assert kv_budget.policy_for("sink_window", 36) == layers.SinkWindowPolicy(4, 32)
  assert kv_budget.policy_for("heavy_hitter", 32) == layers.HeavyHitterPolicy(32, 8)
  assert kv_budget.policy_for("snapkv", 32) == layers.SnapKVPolicy(32, 8, 7)
  block = kv_budget.policy_for("block_select", 40)
  assert block == layers.BlockSelectPolicy(block_size=8, top_k=3) and block.budget == 40
  assert kv_budget.policy_for("full", 8) is None
  for name, budget, message in (("sink_window", 4, "needs a budget > 4"),
                                ("block_select", 16, "needs a budget >= 24"),
                                ("lru", 8, "name must be one of"),
                                ("snapkv", 0, "budget must be a positive int")):
    with pytest.raises(ValueError, match=message):
      kv_budget.policy_for(name, budget)


def test_cli_writes_json_and_png(tmp_path, tiny, fake_runs):
  from lsm import evaluate  # noqa: PLC0415
  fake_runs({str(tmp_path): tiny})
  assert evaluate.main(["--run", str(tmp_path), "--kv-budgets", "24", "--policies",
                        "block_select,sink_window", "--examples", "6"]) == 0
  result = json.loads((tmp_path / "eval-kv-budget-passkey.json").read_text())
  assert [(r["policy"], r["budget"]) for r in result["rows"]] == [
      ("full", LENGTH), ("block_select", 24), ("sink_window", 24)]
  assert (tmp_path / "eval-kv-budget-passkey.png").stat().st_size > 0
  assert evaluate.main(["--run", str(tmp_path), "--kv-budgets", "8", "--policies",
                        "block_select"]) == 2
