"""The context-parallel benchmark runs end to end on the 8 emulated devices (conftest) and records
what benchmarks/README.md promises. It checks the script and the facts a broken measurement would
change (per-device shards, work balance, bytes against their formulas), not the speed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.bench import context as bench
from lsm.bench.hlo import collectives
from lsm.kernels.attention import attention


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("context")
  assert bench.main(["--quick", "--out", str(out)]) == 0
  [path] = out.glob("context-quick-*.json")
  return json.loads(path.read_text())


def test_quick_run_records_every_measurement(quick):
  assert {"memory", "work", "comm", "time", "longest", "decode", "checks"} <= set(quick)
  assert "emulated" in quick["devices"] and quick["shards"] == 8
  assert quick["matmul_peak"]["flops_per_s"] > 0
  assert bench.markdown(quick).count("\n| ") >= (
      len(quick["memory"]) + len(quick["work"]["rows"]) + len(quick["comm"]["rows"]) +
      len(quick["time"]) + len(quick["longest"]["series"]) + 5)


def test_memory_is_per_device(quick):
  for row in quick["memory"]:
    assert set(row["ring_per_device"]) == {"zigzag", "contiguous"}
    for layout, ring in row["ring_per_device"].items():
      assert ring["argument"] * 8 == row["single"]["argument"]  # q, k, v, w: one shard each
      assert 0 < row["ratio"][layout] < 1
  series = quick["longest"]["series"]
  assert [r["t"] for r in series] == [1024, 2048, 4096]
  assert all(r["all_devices"] == 8 * r["per_device"] for r in series)
  executed = quick["longest"]["executed"]
  assert executed["t"] == 2048 and executed["finite"] and executed["seconds"] > 0


def test_zigzag_balances_the_visited_blocks(quick):
  rows = {r["layout"]: r for r in quick["work"]["rows"]}
  assert rows["zigzag"]["balance"] >= 0.95
  assert rows["contiguous"]["balance"] < 0.2
  # Contiguous and zigzag skip every block the single-device op skips; striped cannot.
  assert rows["contiguous"]["total_over_single"] == rows["zigzag"]["total_over_single"] == 1.0
  assert rows["striped"]["total_over_single"] > 1.0
  assert rows["contiguous"]["hops_per_device"] == list(range(1, 9))


def test_forward_bytes_in_the_hlo_equal_the_formulas(quick):
  rows = {(r["strategy"], r["mode"]): r for r in quick["comm"]["rows"]}
  for strategy in ("ring", "all_gather", "ulysses"):
    row = rows[strategy, "fwd"]
    assert row["measured"]["bytes_sent_per_device"] == pytest.approx(row["formula_bytes"])
    assert row["measured"]["outside_entry"] == []
  assert rows["ring", "fwd"]["measured"]["counts"] == {"collective-permute": 21}  # K, V, pos x 7
  # fwd+bwd moves at most what the strategy is written to move (XLA may reuse or drop some).
  for strategy in ("ring", "all_gather", "ulysses"):
    row = rows[strategy, "fwd+bwd"]
    assert rows[strategy, "fwd"]["formula_bytes"] < row["measured"]["bytes_sent_per_device"]
    assert row["measured"]["bytes_sent_per_device"] <= row["formula_bytes"] * (1 + 1e-9)


def test_decode_merge_moves_partials_not_the_cache(quick):
  d = quick["decode"]
  assert d["measured"]["payload_bytes"] == d["formula_payload_bytes"]
  assert set(d["measured"]["counts"]) == {"all-reduce"}
  assert d["rotate_cache_sent_per_device"] > 100 * d["measured"]["bytes_sent_per_device"]


def test_wall_times_are_recorded_with_ratios(quick):
  [row] = quick["time"]
  for name in ("single", "ring_contiguous", "ring_zigzag"):
    assert len(row[name]["runs_s"]) == 2 and row[name]["warmup"] == 1
  assert row["ratio_zigzag"] == row["ring_zigzag"]["median_s"] / row["single"]["median_s"]


def test_decode_program_equals_attention_over_the_whole_cache():
  """The program whose HLO is counted is the real merge: same output as one device."""
  mesh = bench.cpu_mesh()
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((1, 1, 4, 16), (1, 64, 2, 16), (1, 64, 2, 16)))
  got = jax.jit(bench.decode_program(mesh))(q, k, v)
  np.testing.assert_allclose(got, attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_collectives_are_parsed_with_their_groups():
  hlo = """\
%body (p: f32[4]) -> f32[4] {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={{0,1}}, to_apply=%add
}

ENTRY %main (a: f32[2,8]) -> f32[2,8] {
  %cp = f32[2,8]{1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %ag = bf16[16,8]{1,0} all-gather(%b), replica_groups=[2,4]<=[8], dimensions={0}
  %aa = (f32[1,8]{1,0}, f32[1,8]{1,0}) all-to-all(%c, %d), replica_groups={{0,1}}
  %rs = s32[4]{0} reduce-scatter(%e), replica_groups={{0,1,2,3}}, dimensions={0}
}
"""
  got = collectives(hlo, devices=8)
  assert got["counts"] == {"all-reduce": 1, "collective-permute": 1, "all-gather": 1,
                           "all-to-all": 1, "reduce-scatter": 1}
  assert got["payload_bytes"] == 16 + 64 + 256 + 64 + 16
  sent = 2 * 16 * 1 / 2 + 64 + 256 * 3 / 4 + 64 * 1 / 2 + 16 * 3
  assert got["bytes_sent_per_device"] == pytest.approx(sent)
  assert got["outside_entry"] == ["%body"]
