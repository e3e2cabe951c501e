"""The attention benchmark script runs end to end and writes what benchmarks/README.md promises.

This checks the script, not the speed: no timing is asserted.
"""

import json

from lsm.bench import attention as bench
from lsm.bench import common


def test_quick_run_writes_json_with_baseline_ratio_and_peak(tmp_path):
  assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
  [path] = tmp_path.glob("attention-quick-*.json")
  result = json.loads(path.read_text())
  assert result["matmul_peak"]["flops_per_s"] > 0
  assert result["machine"]["jax"]
  compared = [r for r in result["rows"] if "baseline" in r]
  alone = [r for r in result["rows"] if "baseline" not in r]
  assert compared and alone  # short cases against the baseline, the long one lsm alone
  for row in compared:
    assert row["speedup"] == row["baseline"]["median_s"] / row["lsm"]["median_s"]
    assert len(row["lsm"]["runs_s"]) == 2 and row["lsm"]["warmup"] == 1
    assert 0 < row["lsm"]["peak_fraction"] < 10
  table = bench.markdown(result)
  assert table.count("\n| ") == len(result["rows"]) + 1  # header + one line per row


def test_flop_count_halves_causal_and_counts_window_pairs():
  causal = bench.Case(t=4096, d=64, mask="causal", mode="fwd")
  assert causal.flops() == 4 * 8 * 64 * 4096 * 4096 / 2
  window = bench.Case(t=4096, d=64, mask="window", mode="fwd+bwd")
  pairs = sum(min(i + 1, 1025) for i in range(4096))
  assert window.flops() == 3.5 * 4 * 8 * 64 * pairs


def test_replace_section_keeps_the_rest_of_the_page(tmp_path):
  page = tmp_path / "README.md"
  page.write_text("# Title\n\nintro\n")
  common.replace_section(page, "x", "first")
  common.replace_section(page, "x", "second")
  text = page.read_text()
  assert text.startswith("# Title\n\nintro\n")
  assert "second" in text and "first" not in text
  assert text.count("<!-- x:start -->") == 1
