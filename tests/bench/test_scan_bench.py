"""The scan benchmark script runs end to end and its ratios come from its own measurements.

This checks the script, not the speed: no timing target is asserted.
"""

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.bench import __main__ as bench_cli
from lsm.bench import scan as bench
from lsm.bench import scan_decode


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """One smoke run (ssd and Mamba2 only, to stay well under a minute on the 2-core machine)."""
  out = tmp_path_factory.mktemp("scan")
  assert bench.main(["--quick", "--ops", "ssd", "--layers", "Mamba2", "--out", str(out)]) == 0
  [path] = out.glob("scan-quick-*.json")
  return json.loads(path.read_text())


def test_quick_run_records_machine_peak_and_every_case(quick):
  assert quick["benchmark"] == "scan" and quick["machine"]["jax"] == jax.__version__
  assert quick["matmul_peak"]["flops_per_s"] > 0
  cases = {(r["op"], r["mode"], r["t"]) for r in quick["ops"]}
  assert cases == {("ssd", mode, t) for mode in bench.MODES for t in (256, 1024)}
  for row in quick["ops"]:
    assert set(row["results"]) == {"xla_chunked", bench.LOOP}
    for result in row["results"].values():
      assert result["median_s"] == statistics.median(result["runs_s"])
      assert 2 <= len(result["runs_s"]) <= 3 and result["peak_bytes"] > 0


def test_ratios_and_rates_are_computed_from_the_measured_times(quick):
  peak = quick["matmul_peak"]["flops_per_s"]
  for row in quick["ops"]:
    op, loop = row["results"]["xla_chunked"], row["results"][bench.LOOP]
    assert row["speedup_vs_loop"]["xla_chunked"] == loop["median_s"] / op["median_s"]
    assert row["flops"] == bench.ssd_flops(row["t"], row["mode"])
    for result in (op, loop):
      assert result["flops_per_s"] == row["flops"] / result["median_s"]
      assert result["peak_fraction"] == result["flops_per_s"] / peak
    if row["mode"] == "fwd":  # the loop baseline computes what the op computes
      assert row["max_relative_error_vs_loop"]["xla_chunked"] < 1e-4
  checks = {c["name"]: c for c in quick["checks"]}
  speedup = checks["ssd xla_chunked fwd+bwd T=1024: >= 10x faster than the lax.scan loop"]
  row = next(r for r in quick["ops"] if r["t"] == 1024 and r["mode"] == "fwd+bwd")
  assert speedup["detail"] == f"{row['speedup_vs_loop']['xla_chunked']:.1f}x"
  assert speedup["met"] == (row["speedup_vs_loop"]["xla_chunked"] >= 10)
  times = {r["t"]: r["results"]["xla_chunked"]["median_s"] for r in quick["ops"]
           if r["mode"] == "fwd"}
  linear = checks["ssd xla_chunked fwd: time(T=1024) <= 4.5x time(T=256) (linear in T)"]
  assert linear["detail"] == f"{times[1024] / times[256]:.2f}x"


def test_decode_rows_prefill_the_whole_context_and_share_one_step(quick):
  [layer] = quick["decode"]
  assert layer["layer"] == "Mamba2" and layer["state_bytes"] > 0
  assert [r["context"] for r in layer["contexts"]] == [256, 2048]
  for r in layer["contexts"]:
    assert r["context_reached"] == r["context"] and not r["stopped_early"]
    assert r["state_finite"] and r["prefill_chunk"] == 256
    assert r["step"]["median_s"] == statistics.median(r["step"]["runs_s"])
    assert len(r["step"]["runs_s"]) == 5
  ratio = layer["contexts"][1]["step"]["median_s"] / layer["contexts"][0]["step"]["median_s"]
  check = next(c for c in quick["checks"] if c["name"].startswith("Mamba2 decode step"))
  assert check["detail"] == f"{ratio:.3f}x" and check["met"] == (abs(ratio - 1) <= 0.1)


def test_markdown_has_a_row_per_case_and_the_decode_table(quick):
  table = bench.markdown(quick)
  assert table.count("\n| ssd |") == len(quick["ops"])
  assert table.count("\n| Mamba2 |") == 2
  targets = table.split("Targets:")[1]
  assert targets.count("\n- ") == len(quick["checks"]) > 0


def test_loops_compute_what_the_ops_compute():
  """The baselines are the same recurrences as the ops, on fresh inputs at an odd length."""
  for op in bench.OPS.values():
    inputs = {k: jnp.asarray(v, jnp.float32)
              for k, v in op.inputs(37, np.random.default_rng(0)).items()}
    errors = bench.max_errors(op, inputs)
    assert set(errors) == set(op.implementations)
    assert max(errors.values()) < 1e-4, (op.name, errors)


def test_loop_is_skipped_when_its_extrapolated_time_exceeds_the_limit():
  last = {"fwd": {"median_s": 2.0, "t": 1024}}
  result = bench._measure_loop(bench.SSD, "fwd", 65536, None, last, 60.0, 0, {})
  assert result["predicted_s"] == 128.0 and "over the 60 s limit" in result["skipped"]
  assert last["fwd"] == {"median_s": 2.0, "t": 1024}  # the next length extrapolates from it too


def test_ssd_flops_count_the_chunked_matmuls():
  per_token = 2 * 64 * 64 * 1 + 2 * 64 * 32 * 8 + 4 * 32 * 64 * 8
  assert bench.ssd_flops(4096, "fwd") == 4096 * per_token
  assert bench.ssd_flops(4096, "fwd+bwd") == 3 * 4096 * per_token
  assert bench.ssd_flops(32, "fwd") == 32 * (2 * 32 * 64 + 2 * 32 * 32 * 8 + 4 * 32 * 64 * 8)


def test_command_line(capsys):
  assert "scan" in bench_cli.BENCHMARKS
  with pytest.raises(SystemExit):
    bench.main(["--contexts", "1000", "40000", "--prefill-chunk", "16384"])
  assert "40000 is neither <= --prefill-chunk=16384 nor a multiple" in capsys.readouterr().err
  assert set(scan_decode.LAYERS) == {"Mamba2", "Mamba", "S4D"}
