"""Accuracy against KV budget: a synthetic retrieval task (passkey, needle) answered by decoding
with each fixed-budget cache policy (`lsm.layers.kv_policies`) at several budgets.

For every example the prompt (everything before the answer) is prefilled in one call — the
prompt SnapKV compresses — and the answer is then decoded one token at a time, teacher-forced
(`lsm.eval.scoring.Scoring`): each step feeds the true previous answer token, and the example
counts as exact when every answer token is the argmax (what greedy decoding produces when it is
right). A budget of B tokens maps to each policy as:

- ``sink_window``: 4 sinks + a window of ``B - 4``;
- ``heavy_hitter``: ``budget = B``, ``recent = B // 4``;
- ``snapkv``: ``budget = B``, ``observation_window = B // 4``;
- ``block_select``: blocks of 8, ``top_k = B // 8 - 2`` (with one sink and one local block a
  step reads at most B keys; every token stays stored);
- ``full``: the dense cache (the budget does not apply), the reference.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from lsm import layers
from lsm.eval import plots
from lsm.eval.scoring import Scoring
from lsm.train.data import landmark_block_size, synthetic_eval_batches

POLICIES = ("sink_window", "heavy_hitter", "snapkv", "block_select")
BLOCK = 8  # block_select's block size


def policy_for(name: str, budget: int):
  """The cache policy ``name`` with a budget of ``budget`` tokens (module docstring)."""
  if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
    raise ValueError(f"policy_for: budget must be a positive int, got {budget!r}")
  if name == "full":
    return None
  if name == "sink_window":
    if budget <= 4:
      raise ValueError(f"policy_for: sink_window needs a budget > 4 (4 sinks), got {budget}")
    return layers.SinkWindowPolicy(sink_tokens=4, window=budget - 4)
  if name == "heavy_hitter":
    return layers.HeavyHitterPolicy(budget=budget, recent=budget // 4)
  if name == "snapkv":
    return layers.SnapKVPolicy(budget=budget, observation_window=max(1, budget // 4),
                               pool_kernel=7)
  if name == "block_select":
    if budget < 3 * BLOCK:
      raise ValueError(f"policy_for: block_select needs a budget >= {3 * BLOCK} (a sink, the "
                       f"local and one chosen block of {BLOCK}), got {budget}")
    return layers.BlockSelectPolicy(block_size=BLOCK, top_k=budget // BLOCK - 2)
  raise ValueError(f"policy_for: name must be one of {('full', *POLICIES)}, got {name!r}")


def evaluate_budgets(model: nnx.Module, config, *, task: str, length: int, budgets: list[int],
                     policies=POLICIES, examples: int, batch_size: int, seed: int = 0,
                     task_options: dict | None = None, progress=print) -> list[dict]:
  """One row per (policy, budget) plus the full cache: exact match and per-token accuracy of
  the answers, decoded with that cache (module docstring). ``task_options``: the task's knobs
  (default the config's ``data.task_options``)."""
  if landmark_block_size(config) is not None:
    raise ValueError("evaluate_budgets: landmark models keep their own cache; give a model "
                     "with attention layers")
  options = dict(config.data.task_options) if task_options is None else task_options
  batches = synthetic_eval_batches(task, seq_len=length, seed=seed, examples=examples,
                                   batch_size=batch_size, task_options=options)
  cases = [("full", length)] + [(p, b) for p in policies for b in budgets]
  rows = []
  for name, budget in cases:
    policy = policy_for(name, budget)
    scores = Scoring(decode=True, policy=policy)(model, batches).row()
    row = {"policy": name, "budget": budget, "length": length, "examples": scores["examples"],
           "settings": None if policy is None else dataclasses.asdict(policy),
           "exact_match": scores["exact_match"], "token_accuracy": scores["token_accuracy"]}
    progress(f"{task} at {length} tokens, {name} budget {budget}: exact match "
             f"{row['exact_match']:.1%}, token accuracy {row['token_accuracy']:.1%}")
    rows.append(row)
  return rows


def plot(rows: list[dict], path, title: str):
  """Exact match against budget, one line per policy, the full cache as a dashed line."""
  lines = []
  for name in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
    mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["budget"])
    lines.append((name, [r["budget"] for r in mine], [100 * r["exact_match"] for r in mine]))
  full = [(100 * r["exact_match"], "full cache") for r in rows if r["policy"] == "full"]
  return plots.line_plot(path, lines, xlabel="KV budget (tokens)", ylabel="exact match (%)",
                         title=title, log2_x=True, ylim=(0, 102), hlines=full[:1])
