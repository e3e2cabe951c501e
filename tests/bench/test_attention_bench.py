"""The attention benchmark script runs end to end and writes what benchmarks/README.md promises.

This checks the script, not the speed: no timing is asserted.
"""

import json

import jax
import numpy as np
import pytest

from lsm.bench import attention as bench
from lsm.bench import attention_gpu, common


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


def test_gpu_benchmark_smoke_run_records_every_baseline(tmp_path):
  """`--gpu --quick` runs the GPU script on CPU (kernel interpreted): every case has the lsm
  result and one entry per baseline, measured or skipped with the reason."""
  assert bench.main(["--gpu", "--quick", "--out", str(tmp_path)]) == 0
  [path] = tmp_path.glob("attention-gpu-quick-*.json")
  result = json.loads(path.read_text())
  assert result["implementation"] == "pallas_gpu"
  assert {r["case"]["mask"] for r in result["rows"]} == {"causal", "window", "sparse"}
  for row in result["rows"]:
    assert "median_s" in row["lsm"] and "median_s" in row["xla"]
    assert row["speedup_vs_xla"] == row["xla"]["median_s"] / row["lsm"]["median_s"]
    assert "median_s" in row["cudnn"] or row["cudnn"]["skipped"]
  assert attention_gpu.markdown(result).count("\n| ") == len(result["rows"]) + 1


def test_gpu_benchmark_refuses_a_full_run_without_a_gpu(tmp_path, capsys):
  if jax.default_backend() == "gpu":
    pytest.skip("checks the refusal on a machine without a GPU")
  with pytest.raises(SystemExit):
    bench.main(["--gpu", "--out", str(tmp_path)])
  assert "--gpu needs a GPU backend" in capsys.readouterr().err


def test_sparse_flops_count_the_layout_blocks():
  case = attention_gpu.Case(t=1024, d=64, mask="sparse", mode="fwd", batch=1, heads=2)
  layout = attention_gpu.sparse_layout(1024)
  pairs = np.asarray(case.lsm_mask().allowed(np.arange(1024)[:, None], np.arange(1024)[None]))
  assert case.visible_pairs() == pairs.sum() == layout.sum() * 128 * 128
  assert 0.2 < layout.mean() < 0.45
