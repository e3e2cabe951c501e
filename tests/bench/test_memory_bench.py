"""The memory benchmark script runs end to end; its ratios and rates come from its own
measurements and the cache sizes follow each method's budget. No timing target is asserted."""

import json
import statistics

import jax
import pytest

from lsm.bench import memory as bench


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("memory")
  assert bench.main(["--quick", "--out", str(out)]) == 0
  [path] = out.glob("memory-quick-*.json")
  return json.loads(path.read_text())


def test_every_method_and_context_is_measured(quick):
  assert quick["benchmark"] == "memory" and quick["machine"]["jax"] == jax.__version__
  rows = {(r["method"], r["context"]): r for r in quick["rows"]}
  assert set(rows) == {(m, n) for m in bench.methods() for n in (256, 1024)}
  for row in rows.values():
    assert row["seen"] == row["context"]  # the quick prefill is never cut short
    assert row["step_median_s"] == statistics.median(row["step_runs_s"])
    assert len(row["step_runs_s"]) == 3 and row["cache_bytes"] > 0


def test_ratios_and_rates_are_computed_from_the_measured_times(quick):
  peak = quick["matmul_peak"]["flops_per_s"]
  rows = {(r["method"], r["context"]): r for r in quick["rows"]}
  for (method, n), row in rows.items():
    base = rows["full attention", n]
    assert row["vs_full_attention"] == row["step_median_s"] / base["step_median_s"]
    assert row["fraction_of_peak"] == row["flops"] / row["step_median_s"] / peak
  assert rows["full attention", 1024]["vs_full_attention"] == 1.0


def test_cache_sizes_follow_each_budget(quick):
  rows = {(r["method"], r["context"]): r for r in quick["rows"]}
  full = [rows["full attention", n]["cache_bytes"] for n in (256, 1024)]
  assert full[1] > 3 * full[0]  # a dense cache grows with the context
  # Recurrent memory carries a fixed-size state whatever the context.
  assert rows["recurrent_memory", 256]["cache_bytes"] == rows["recurrent_memory", 1024][
      "cache_bytes"]
  assert rows["full attention", 1024]["attended"] == 1024
  assert rows["landmark", 1024]["attended"] < 1024
