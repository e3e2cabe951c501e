"""`python -m lsm.bench attention`: lsm's attention op against `jax.nn.dot_product_attention`.

FLOPs count the useful work: ``4 * B * Hq * D * pairs`` for the forward pass, with ``pairs`` the
visible (query, key) pairs — ``T*T/2`` for causal, the exact count for a sliding window — and
``3.5x`` that for forward+backward (two matmuls forward, five backward, recomputation included).
Times are medians after warm-up of AOT-compiled functions (compile time excluded); memory is
XLA's planned peak for the compiled function (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsm.bench import common
from lsm.kernels.attention import Mask, attention

MASKS = {"causal": dict(causal=True), "window": dict(causal=True, window=(1024, 0))}


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  d: int
  mask: str
  mode: str  # "fwd" or "fwd+bwd"
  batch: int = 1
  heads: int = 8
  kv_heads: int = 2
  dtype: str = "float32"

  def visible_pairs(self) -> float:
    if self.mask == "causal":
      return self.t * self.t / 2
    left = MASKS[self.mask]["window"][0]
    rows = np.arange(self.t)
    return float(np.minimum(rows + 1, left + 1).sum())

  def flops(self) -> float:
    fwd = 4 * self.batch * self.heads * self.d * self.visible_pairs()
    return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)


def _inputs(case: Case):
  rng = np.random.default_rng(case.t + case.d)
  shape = lambda h: (case.batch, case.t, h, case.d)
  q, k, v = (jnp.asarray(rng.standard_normal(shape(h)), case.dtype)
             for h in (case.heads, case.kv_heads, case.kv_heads))
  w = jnp.asarray(rng.standard_normal(shape(case.heads)), case.dtype)
  return q, k, v, w


def _lsm_fn(case: Case, implementation: str):
  mask = Mask(**MASKS[case.mask])
  return lambda q, k, v: attention(q, k, v, mask=mask, implementation=implementation)


def _baseline_fn(case: Case, implementation: str = "xla"):
  window = MASKS[case.mask].get("window")
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=window, implementation=implementation)


def _with_mode(fn, mode):
  if mode == "fwd":
    return lambda q, k, v, w: fn(q, k, v)

  def fwd_bwd(q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                    argnums=(0, 1, 2))(q, k, v)

  return fwd_bwd


def measure(case: Case, fn, *, warmup: int, runs: int, peak_flops: float) -> dict:
  args = _inputs(case)
  fn = _with_mode(fn, case.mode)
  compiled, peak_bytes = common.compile_with_memory(fn, args)
  budget = 0.85 * common.available_memory_bytes()
  if peak_bytes is not None and peak_bytes > budget:
    return {"skipped": f"needs {common.fmt_bytes(peak_bytes)}, "
                       f"{common.fmt_bytes(int(budget))} available"}
  timing = common.time_compiled(compiled, args, warmup=warmup, runs=runs)
  flops_per_s = case.flops() / timing.median_s
  return {"median_s": timing.median_s, "runs_s": timing.runs_s, "warmup": warmup,
          "peak_bytes": peak_bytes, "flops_per_s": flops_per_s,
          "peak_fraction": flops_per_s / peak_flops}


def run(args) -> dict:
  started = time.time()
  info = common.machine()
  dtype = "float32"
  print(f"# lsm.bench attention on {info['cpu']} ({info['cpu_cores']} cores, "
        f"{info['backend']}), jax {info['jax']}", flush=True)
  peak = common.matmul_peak(dtype)
  print(f"# measured {dtype} matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['n']}^3, median of 5)", flush=True)
  print("# times are medians after warm-up, compile excluded; memory is XLA's planned peak",
        flush=True)

  main = [Case(t, d, m, mode) for d in args.head_dims for m in MASKS for mode in ("fwd", "fwd+bwd")
          for t in args.lengths]
  long = [Case(t, d, m, mode) for d in args.long_head_dims for m in MASKS
          for mode in ("fwd", "fwd+bwd") for t in args.long_lengths]
  rows = []
  header = (f"{'T':>7} {'D':>4} {'mask':>7} {'mode':>8} {'lsm ms':>10} {'base ms':>10} "
            f"{'speedup':>8} {'GFLOP/s':>8} {'%peak':>6} {'lsm mem':>10} {'base mem':>10}")
  print(header, flush=True)
  for n, case in enumerate(main + long):
    is_long = n >= len(main)
    many = case.t <= args.many_runs_up_to
    warmup, runs = (1, args.runs) if many else (args.long_warmup, 1)
    row = {"case": dataclasses.asdict(case), "flops": case.flops()}
    row["lsm"] = measure(case, _lsm_fn(case, args.implementation), warmup=warmup, runs=runs,
                         peak_flops=peak["flops_per_s"])
    if not is_long:
      row["baseline"] = measure(case, _baseline_fn(case), warmup=warmup, runs=runs,
                                peak_flops=peak["flops_per_s"])
      if "median_s" in row["baseline"] and "median_s" in row["lsm"]:
        row["speedup"] = row["baseline"]["median_s"] / row["lsm"]["median_s"]
    rows.append(row)
    print(_line(row) + f"   [{n + 1}/{len(main) + len(long)}, {time.time() - started:.0f}s]",
          flush=True)

  checks = _checks(rows)
  for name, ok, detail in checks:
    print(f"# target {'MET' if ok else 'MISSED'}: {name} ({detail})", flush=True)
  return {"benchmark": "attention", "date": datetime.date.today().isoformat(),
          "command": "python -m lsm.bench attention " + " ".join(args.argv), "machine": info,
          "matmul_peak": peak, "implementation": args.implementation,
          "baseline": "jax.nn.dot_product_attention(implementation='xla')",
          "flops_convention": "4*B*Hq*D*visible_pairs forward (causal = T^2/2); x3.5 fwd+bwd",
          "memory_convention": "XLA planned peak of the compiled function",
          "rows": rows, "checks": [dict(name=a, met=b, detail=c) for a, b, c in checks],
          "wall_s": time.time() - started}


def _ms(result):
  if result is None:
    return "-"
  if "skipped" in result:
    return "skipped"
  return f"{result['median_s'] * 1e3:.1f}"


def _line(row) -> str:
  c, lsm, base = row["case"], row["lsm"], row.get("baseline")
  speed = f"{row['speedup']:.1f}x" if "speedup" in row else "-"
  gflops = f"{lsm['flops_per_s'] / 1e9:.1f}" if "median_s" in lsm else "-"
  frac = f"{100 * lsm['peak_fraction']:.0f}" if "median_s" in lsm else "-"
  return (f"{c['t']:>7} {c['d']:>4} {c['mask']:>7} {c['mode']:>8} {_ms(lsm):>10} "
          f"{_ms(base):>10} {speed:>8} {gflops:>8} {frac:>6} "
          f"{common.fmt_bytes(lsm.get('peak_bytes')):>10} "
          f"{common.fmt_bytes(base.get('peak_bytes')) if base else '-':>10}")


def _find(rows, **want):
  for row in rows:
    if all(row["case"][k] == v for k, v in want.items()):
      return row
  return None


def _checks(rows):
  """The issue's targets, evaluated on this run's numbers (where the run measured them)."""
  out = []
  for d in sorted({r["case"]["d"] for r in rows}):
    fwd = _find(rows, t=8192, d=d, mask="causal", mode="fwd")
    if fwd and "speedup" in fwd:
      out.append((f"causal fwd T=8k D={d}: >=5x baseline and >=50% of matmul peak",
                  fwd["speedup"] >= 5 and fwd["lsm"]["peak_fraction"] >= 0.5,
                  f"{fwd['speedup']:.1f}x, {100 * fwd['lsm']['peak_fraction']:.0f}%"))
    both = _find(rows, t=8192, d=d, mask="causal", mode="fwd+bwd")
    if both and "speedup" in both:
      out.append((f"causal fwd+bwd T=8k D={d}: >=4x baseline", both["speedup"] >= 4,
                  f"{both['speedup']:.1f}x"))
    for mode in ("fwd", "fwd+bwd"):
      short = _find(rows, t=2048, d=d, mask="window", mode=mode)
      longer = _find(rows, t=16384, d=d, mask="window", mode=mode)
      if short and longer and "median_s" in short["lsm"] and "median_s" in longer["lsm"]:
        ratio = longer["lsm"]["median_s"] / short["lsm"]["median_s"]
        out.append((f"window {mode} D={d}: time(16k) <= 12x time(2k)", ratio <= 12,
                    f"{ratio:.1f}x"))
    big = _find(rows, t=131072, d=d, mask="causal", mode="fwd+bwd")
    if big:
      out.append((f"causal fwd+bwd T=128k D={d} completes", "median_s" in big["lsm"],
                  _ms(big["lsm"]) + " ms"))
  return out


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [
      f"### {m['cpu']} ({m['cpu_cores']} cores, {m['backend']}), jax {m['jax']} — "
      f"{result['date']}",
      "",
      f"Command: `{result['command']}`. Baseline: `{result['baseline']}` in the same run. "
      f"Measured float32 matmul peak: {result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s. "
      "B=1, Hq=8, Hkv=2, float32; times are medians after warm-up (compile excluded); "
      "GFLOP/s count useful work (causal = half); memory is XLA's planned peak.",
      "",
      "| T | D | mask | mode | lsm ms | baseline ms | speedup | lsm GFLOP/s | % of peak | "
      "lsm memory | baseline memory |",
      "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in result["rows"]:
    c, lsm, base = row["case"], row["lsm"], row.get("baseline")
    ok = "median_s" in lsm
    speed = "%.1fx" % row["speedup"] if "speedup" in row else "-"
    gflops = "%.0f" % (lsm["flops_per_s"] / 1e9) if ok else "-"
    frac = "%.0f%%" % (100 * lsm["peak_fraction"]) if ok else "-"
    base_mem = common.fmt_bytes(base.get("peak_bytes")) if base else "-"
    lines.append(
        f"| {c['t']} | {c['d']} | {c['mask']} | {c['mode']} | {_ms(lsm)} | {_ms(base)} | "
        f"{speed} | {gflops} | {frac} | {common.fmt_bytes(lsm.get('peak_bytes'))} | {base_mem} |")
  lines += ["", "Targets:", ""]
  lines += [f"- {'met' if c['met'] else 'MISSED'}: {c['name']} — {c['detail']}"
            for c in result["checks"]]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if "--gpu" in argv:
    from lsm.bench import attention_gpu  # noqa: PLC0415 — it imports this module
    return attention_gpu.main([a for a in argv if a != "--gpu"])
  parser = argparse.ArgumentParser(prog="python -m lsm.bench attention", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a one-minute smoke run at small sizes (not for the README table)")
  parser.add_argument("--gpu", action="store_true",
                      help="the GPU benchmark instead: Pallas kernel vs cuDNN and XLA, bf16 "
                           "(see `--gpu --help`)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--long-lengths", type=int, nargs="*", default=[32768, 65536, 131072],
                      help="lengths run for lsm alone (the baseline stores T x T)")
  parser.add_argument("--long-head-dims", type=int, nargs="*", default=[64])
  parser.add_argument("--runs", type=int, default=3, help="timed runs per case (T <= 16k)")
  parser.add_argument("--many-runs-up-to", type=int, default=16384,
                      help="longer cases get one timed run")
  parser.add_argument("--long-warmup", type=int, default=1,
                      help="warm-up runs before the single timed run of long cases")
  parser.add_argument("--implementation", default="xla")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"),
                      help="where the table goes (skipped for --quick)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.quick:
    args.lengths, args.head_dims, args.long_lengths, args.runs = [512, 1024], [64], [2048], 2
  result = run(args)
  name = "attention-quick" if args.quick else f"attention-{result['machine']['backend']}"
  path = common.write_json(args.out, name, result)
  print(f"# wrote {path}")
  if not args.quick:
    marker = f"attention-{result['machine']['backend']}"
    common.replace_section(args.readme, marker, markdown(result))
    print(f"# updated {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
