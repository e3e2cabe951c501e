"""Accuracy against KV budget: a synthetic retrieval task (passkey, needle) answered by decoding
with each fixed-budget cache policy (`lsm.layers.kv_policies`) at several budgets.

For every example the prompt (everything before the answer) is prefilled in one call — the
prompt SnapKV compresses — and the answer is then decoded one token at a time, teacher-forced:
each step feeds the true previous answer token, and the example counts as exact when every
answer token is the argmax (what greedy decoding produces when it is right). A budget of B
tokens maps to each policy as:

- ``sink_window``: 4 sinks + a window of ``B - 4``;
- ``heavy_hitter``: ``budget = B``, ``recent = B // 4``;
- ``snapkv``: ``budget = B``, ``observation_window = B // 4``;
- ``block_select``: blocks of 8, ``top_k = B // 8 - 2`` (with one sink and one local block a
  step reads at most B keys; every token stays stored);
- ``full``: the dense cache (the budget does not apply), the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm import layers
from lsm.train.data import landmark_block_size, synthetic_eval_batches
from lsm.train.step import shifted

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


def _answer_start(weights) -> int:
  """The first answer position, the same in every row (the tasks put the answer last)."""
  first = np.argmax(weights > 0, axis=1)
  if not np.all(weights.sum(1) > 0) or np.any(first != first[0]):
    raise ValueError("evaluate_budgets: the task's answers must start at one position in every "
                     "example (passkey, kv_needle); this task's do not")
  return int(first[0])


def evaluate_budgets(model: nnx.Module, config, *, task: str, length: int, budgets: list[int],
                     policies=POLICIES, examples: int, batch_size: int, seed: int = 0,
                     progress=print) -> list[dict]:
  """One row per (policy, budget) plus the full cache: exact match and per-token accuracy of
  the answers, decoded with that cache (module docstring)."""
  if landmark_block_size(config) is not None:
    raise ValueError("evaluate_budgets: landmark models keep their own cache; give a model "
                     "with attention layers")
  batches = synthetic_eval_batches(task, seq_len=length, seed=seed, examples=examples,
                                   batch_size=batch_size,
                                   task_options=dict(config.data.task_options))
  graphdef, params = nnx.split(model)

  @jax.jit
  def prefill(params, tokens, positions, cache):
    logits, cache = nnx.merge(graphdef, params).decode(tokens, positions=positions, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache

  @jax.jit
  def step(params, token, position, cache):
    logits, cache = nnx.merge(graphdef, params).decode(token[:, None], positions=position[:, None],
                                                       cache=cache)
    return jnp.argmax(logits[:, 0], axis=-1), cache

  cases = [("full", length)] + [(p, b) for p in policies for b in budgets]
  rows = []
  for name, budget in cases:
    policy = policy_for(name, budget)
    exact = correct = count = 0
    for batch in batches:
      inputs, targets, weights, positions, _ = (np.asarray(x) for x in shifted(batch))
      start = _answer_start(weights)
      stop = int(np.max(np.nonzero(weights.any(0))[0])) + 1  # past the last answer token
      b = inputs.shape[0]
      cache = model.init_cache(b, length, jnp.float32, policy=policy)
      guess, cache = prefill(params, jnp.asarray(inputs[:, :start + 1]),
                             jnp.asarray(positions[:, :start + 1]), cache)
      right = np.ones(b, bool)
      for i in range(start, stop):
        if i > start:
          guess, cache = step(params, jnp.asarray(inputs[:, i]), jnp.asarray(positions[:, i]),
                              cache)
        ok = (np.asarray(guess) == targets[:, i]) | (weights[:, i] == 0)
        right &= ok
        correct += int(np.sum(ok & (weights[:, i] > 0)))
        count += int(np.sum(weights[:, i] > 0))
      exact += int(right.sum())
    total = sum(x["tokens"].shape[0] for x in batches)
    row = {"policy": name, "budget": budget, "length": length, "examples": total,
           "settings": None if policy is None else {k: getattr(policy, k) for k in
                                                    policy.__dataclass_fields__},
           "exact_match": exact / total, "token_accuracy": correct / max(count, 1)}
    progress(f"{task} at {length} tokens, {name} budget {budget}: exact match "
             f"{row['exact_match']:.1%}, token accuracy {row['token_accuracy']:.1%}")
    rows.append(row)
  return rows


def plot(rows: list[dict], path, title: str):
  """Exact match against budget, one line per policy, the full cache as a dashed line."""
  import matplotlib  # noqa: PLC0415 — optional dependency (the `plot` extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
    mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["budget"])
    ax.plot([r["budget"] for r in mine], [100 * r["exact_match"] for r in mine], "o-",
            label=name)
  full = next((r for r in rows if r["policy"] == "full"), None)
  if full is not None:
    ax.axhline(100 * full["exact_match"], color="k", ls="--", label="full cache")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("KV budget (tokens)")
  ax.set_ylabel("exact match (%)")
  ax.set_ylim(0, 102)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
