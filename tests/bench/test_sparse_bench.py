"""The sparse benchmark script runs end to end at a toy size: every ratio comes from its own
measurements, densities are the patterns' own, a PNG is written. No timing target is asserted."""

import json
import statistics

import pytest

from lsm.bench import sparse as bench
from lsm.kernels.attention import patterns


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("sparse")
  argv = ["--quick", "--lengths", "512", "--backward-lengths", "--densities", "0.25", "0.5",
          "--patterns", "sink_window", "strided", "--select-top-k", "0", "--out", str(out)]
  assert bench.main(argv) == 0
  [path] = out.glob("sparse-quick-*.json")
  assert path.with_suffix(".png").stat().st_size > 0
  return json.loads(path.read_text())


def test_every_case_is_timed_against_dense_in_the_same_run(quick):
  rows = quick["rows"]
  dense = [r for r in rows if r["pattern"] == "dense causal"]
  assert len(dense) == 1 and dense[0]["vs_dense"] == 1.0
  base = statistics.median(dense[0]["runs"])
  peak = quick["matmul_peak"]["flops_per_s"]
  assert {(r["pattern"], r["target"]) for r in rows} >= {("sink_window", 0.25),
                                                          ("sink_window", 0.5)}
  for row in rows:
    assert row["median_s"] == statistics.median(row["runs"])
    assert row["vs_dense"] == row["median_s"] / base
    assert row["fraction_of_peak"] == row["flops"] / row["median_s"] / peak


def test_reported_densities_are_the_patterns_own(quick):
  for row in quick["rows"]:
    if row["params"] is None:
      continue
    mask = patterns.pattern_mask(row["pattern"], **row["params"])
    measured = patterns.density(mask, row["length"],
                                block_sizes=bench.BlockSizes(quick["block"], quick["block"]))
    assert (row["density_pairs"], row["density_blocks"]) == (measured.pairs, measured.blocks)


def test_parameters_aim_at_the_target_density():
  for target in (0.125, 0.25, 0.5):
    params = bench.pattern_for("sink_window", 16384, target, 512)
    got = patterns.density(patterns.sink_window(**params), 4096 * 4).pairs
    assert abs(got - target) < 0.02
  assert bench.pattern_for("bigbird", 1024, 0.0625, 128) is None  # not that sparse
