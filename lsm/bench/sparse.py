"""``python -m lsm.bench sparse``: sparse attention time against density, next to dense causal
attention measured in the same run.

For each length T and each static pattern of `lsm.kernels.attention.patterns` (sink + window,
BigBird blocks, strided blocks) the pattern's parameters are chosen for a target density (the
fraction of causal (query, key) pairs it keeps); the measured density (pairs, and key blocks the
XLA path visits) is reported next to the time. Every case is the attention op's XLA path with the
pattern's `Mask`; the baseline is the same op with a plain causal mask at the same T. Cases are
AOT-compiled (compile time excluded) and timed interleaved, one run of every case per round, so
machine drift hits all alike; a row's time is the median over rounds. The issue's target: time
tracks density, 25% density at most 35% of dense time.

FLOPs count useful work: ``4 * B * Hq * D * pairs`` forward (``x 3.5`` with the backward), as
in `lsm.bench attention`; the fraction of the measured float32 matmul peak is reported.

Block selection (`lsm.kernels.attention.select`, when present) is reported separately: the whole
`block_select_attention` call and its selection stage alone (block summaries, scores, top-k).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsm.bench import common
from lsm.kernels.attention import BlockSizes, Mask, attention
from lsm.kernels.attention import patterns

PATTERN_NAMES = ("sink_window", "bigbird", "strided")


def pattern_for(name: str, length: int, target: float, block: int) -> dict | None:
  """Parameters of pattern ``name`` whose density at ``length`` is close to ``target`` (a
  fraction of the causal pairs), or None when the pattern cannot be that sparse."""
  n = -(-length // block)
  rows = target * (n + 1) / 2  # visible key blocks per query block, on average
  if name == "sink_window":
    # A window w keeps about w * T - w**2 / 2 of the T**2 / 2 causal pairs.
    return dict(window=max(1, round(length * (1 - (1 - target) ** 0.5))), sink_tokens=4)
  if name == "bigbird":
    local, global_ = 1, 1
    random = round(rows - local - global_)
    if random < 0:
      return None
    return dict(block=block, num_local_blocks=local, num_global_blocks=global_,
                num_random_blocks=random, seed=0, max_length=length)
  if name == "strided":
    extra = rows - 1  # one local (diagonal) block; the rest every `stride` blocks back
    if extra <= 0:
      return None
    return dict(block=block, local_blocks=1, stride=max(1, round(n / (2 * extra))),
                max_length=length)
  raise ValueError(f"pattern_for: name must be one of {PATTERN_NAMES}, got {name!r}")


def _inputs(args, length: int):
  rng = np.random.default_rng(length)
  shape = lambda h: (1, length, h, args.head_dim)
  q, k, v, w = (jnp.asarray(rng.standard_normal(shape(h)), jnp.float32)
                for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
  return q, k, v, w


def _fn(mask: Mask, mode: str, block: int):
  sizes = BlockSizes(block, block)

  def forward(q, k, v):
    return attention(q, k, v, mask=mask, implementation="xla", block_sizes=sizes)

  if mode == "fwd":
    return lambda q, k, v, w: forward(q, k, v)
  return lambda q, k, v, w: jax.grad(
      lambda q, k, v: jnp.sum(forward(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _selection_fns(args, length: int, top_k: int):
  """(whole call, selection stage) of block selection, or None without the module."""
  try:
    from lsm.kernels.attention import select  # noqa: PLC0415 — optional module
  except ImportError:
    return None
  block = args.block

  def whole(q, k, v, w):
    return select.block_select_attention(q, k, v, block_size=block, top_k=top_k,
                                         implementation="xla")

  def stage(q, k, v, w):
    summaries = select.block_summaries(k, block)
    return select.select_blocks(select.block_scores(q, summaries, block_size=block), top_k)

  return whole, stage


def run(args, progress=print) -> dict:
  started = time.time()
  info = common.machine()
  peak = common.matmul_peak(jnp.float32, n=args.matmul_n)
  progress(f"# lsm.bench sparse on {info['cpu']} ({info['cpu_cores']} cores), jax {info['jax']}; "
           f"float32 matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s")
  cases = []
  for length in args.lengths:
    inputs = _inputs(args, length)
    modes = ["fwd"] + (["fwd+bwd"] if length in args.backward_lengths else [])
    for mode in modes:
      dense = Mask(causal=True)
      specs = [("dense causal", None, dense, 1.0)]
      for name in args.patterns:
        for target in args.densities:
          params = pattern_for(name, length, target, args.block)
          if params is None:
            progress(f"T={length} {name} at density {target}: not reachable, skipped")
            continue
          specs.append((name, params, patterns.pattern_mask(name, **params), target))
      for name, params, mask, target in specs:
        measured = patterns.density(mask, length, block_sizes=BlockSizes(args.block, args.block))
        compiled, peak_bytes = common.compile_with_memory(_fn(mask, mode, args.block), inputs)
        pairs = measured.pairs * length * (length + 1) / 2
        flops = 4 * args.heads * args.head_dim * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
        cases.append(dict(length=length, mode=mode, pattern=name, params=params, target=target,
                          density_pairs=measured.pairs, density_blocks=measured.blocks,
                          flops=flops, peak_bytes=peak_bytes, compiled=compiled, args=inputs,
                          runs=[]))
        progress(f"compiled T={length} {mode} {name} target {target:g}: pairs "
                 f"{100 * measured.pairs:.1f}%, blocks {100 * measured.blocks:.1f}% "
                 f"[{time.time() - started:.0f}s]")
    if args.select_top_k and length in args.select_lengths:
      fns = _selection_fns(args, length, args.select_top_k)
      if fns is None:
        progress("block selection: lsm.kernels.attention.select not available, skipped")
      else:
        for label, fn in zip(("block selection", "block selection: select only"), fns):
          compiled, peak_bytes = common.compile_with_memory(fn, inputs)
          n = -(-length // args.block)
          kept = min(n, args.select_top_k + 2)  # + sink and local blocks
          cases.append(dict(length=length, mode="fwd", pattern=label,
                            params=dict(block_size=args.block, top_k=args.select_top_k),
                            target=None, density_pairs=None, density_blocks=kept / ((n + 1) / 2),
                            flops=None, peak_bytes=peak_bytes, compiled=compiled, args=inputs,
                            runs=[]))
  for round_ in range(args.runs + 1):  # round 0 warms up
    for case in cases:
      begin = time.perf_counter()
      jax.block_until_ready(case["compiled"](*case["args"]))
      if round_:
        case["runs"].append(time.perf_counter() - begin)
    progress(f"round {round_}/{args.runs} done [{time.time() - started:.0f}s]")
  rows = []
  for case in cases:
    base = next(c for c in cases if c["pattern"] == "dense causal" and
                c["length"] == case["length"] and c["mode"] == case["mode"])
    median = statistics.median(case["runs"])
    row = {k: v for k, v in case.items() if k not in ("compiled", "args")}
    row.update(median_s=median, vs_dense=median / statistics.median(base["runs"]))
    if case["flops"] is not None:
      row["fraction_of_peak"] = case["flops"] / median / peak["flops_per_s"]
    rows.append(row)
  checks = _checks(rows)
  for name, ok, detail in checks:
    progress(f"# target {'MET' if ok else 'MISSED'}: {name} ({detail})")
  return {"benchmark": "sparse", "date": datetime.date.today().isoformat(),
          "command": "python -m lsm.bench sparse " + " ".join(args.argv), "machine": info,
          "matmul_peak": peak, "shape": dict(batch=1, heads=args.heads, kv_heads=args.kv_heads,
                                             head_dim=args.head_dim, dtype="float32"),
          "block": args.block, "baseline": "attention op, xla, Mask(causal=True), same run",
          "rows": rows, "checks": [dict(name=a, met=b, detail=c) for a, b, c in checks],
          "wall_s": time.time() - started}


def _checks(rows):
  """25% density at most 35% of dense time: per length, mode and pattern, the case built for
  the 0.25 target."""
  out = []
  for row in rows:
    if row["target"] == 0.25 and row["pattern"] != "dense causal":
      out.append((f"{row['pattern']} T={row['length']} {row['mode']}: density "
                  f"{100 * row['density_pairs']:.0f}% takes <= 35% of dense time",
                  row["vs_dense"] <= 0.35, f"{100 * row['vs_dense']:.0f}%"))
  return out


def markdown(result: dict) -> str:
  m, s = result["machine"], result["shape"]
  lines = [
      f"### {m['cpu']} ({m['cpu_cores']} cores, {m['backend']}), jax {m['jax']} — "
      f"{result['date']}",
      "",
      f"Command: `{result['command']}`. B=1, Hq={s['heads']}, Hkv={s['kv_heads']}, "
      f"D={s['head_dim']}, float32, kernel and layout blocks of {result['block']}. Baseline: "
      f"{result['baseline']}. Measured float32 matmul peak: "
      f"{result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s. Times are medians over "
      "interleaved rounds, compile excluded.",
      "",
      "| T | mode | pattern | density (pairs) | key blocks visited | ms | vs dense | % of peak |",
      "|---:|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    pairs = "-" if r["density_pairs"] is None else f"{100 * r['density_pairs']:.1f}%"
    frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-"
    lines.append(f"| {r['length']} | {r['mode']} | {r['pattern']} | {pairs} | "
                 f"{100 * r['density_blocks']:.1f}% | {r['median_s'] * 1e3:.1f} | "
                 f"{100 * r['vs_dense']:.1f}% | {frac} |")
  lines += ["", "Targets:", ""]
  lines += [f"- {'met' if c['met'] else 'MISSED'}: {c['name']} — {c['detail']}"
            for c in result["checks"]]
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> pathlib.Path:
  import matplotlib  # noqa: PLC0415 — optional dependency (the `plot` extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  keys = sorted({(r["length"], r["mode"]) for r in result["rows"]})
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
  for ax, (length, mode) in zip(axes[0], keys):
    rows = [r for r in result["rows"] if (r["length"], r["mode"]) == (length, mode)
            and r["density_pairs"] is not None and r["pattern"] != "dense causal"]
    for name in sorted({r["pattern"] for r in rows}):
      mine = sorted((r for r in rows if r["pattern"] == name), key=lambda r: r["density_pairs"])
      ax.plot([100 * r["density_pairs"] for r in mine], [100 * r["vs_dense"] for r in mine],
              "o-", label=name)
    ax.plot([0, 100], [0, 100], "k:", label="time = density")
    ax.axhline(35, color="grey", lw=0.5)
    ax.axvline(25, color="grey", lw=0.5)
    ax.set_xlim(0, 60)
    ax.set_ylim(0, 80)
    ax.set_xlabel("density (% of causal pairs)")
    ax.set_ylabel("time (% of dense causal)")
    ax.set_title(f"T={length // 1024}k, {mode}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench sparse", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run at small sizes (not for the README table)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
  parser.add_argument("--backward-lengths", type=int, nargs="*", default=[16384],
                      help="lengths also timed forward+backward")
  parser.add_argument("--densities", type=float, nargs="+", default=[0.0625, 0.125, 0.25, 0.5])
  parser.add_argument("--patterns", nargs="+", default=list(PATTERN_NAMES),
                      choices=PATTERN_NAMES)
  parser.add_argument("--block", type=int, default=512, help="kernel and layout block size")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=1)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--select-top-k", type=int, default=8,
                      help="blocks kept per query block by block selection (0: skip it)")
  parser.add_argument("--select-lengths", type=int, nargs="*", default=[16384, 65536])
  parser.add_argument("--runs", type=int, default=3, help="timed rounds")
  parser.add_argument("--matmul-n", type=int, default=4096)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"))
  if "--quick" in argv:  # small defaults; options given explicitly still win
    parser.set_defaults(lengths=[1024], backward_lengths=[1024], block=128, runs=1,
                        select_lengths=[1024], select_top_k=2, matmul_n=512)
  args = parser.parse_args(argv)
  args.argv = argv
  for name in ("block", "heads", "kv_heads", "head_dim", "runs", "matmul_n"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be a positive int, got "
                   f"{getattr(args, name)}")
  if args.heads % args.kv_heads:
    parser.error(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
  for density in args.densities:
    if not 0 < density <= 1:
      parser.error(f"--densities must lie in (0, 1], got {density}")
  result = run(args)
  tag = "sparse-quick" if args.quick else f"sparse-{jax.default_backend()}"
  path = common.write_json(args.out, tag, result)
  png = plot(result, path.with_suffix(".png"))
  if not args.quick:
    common.replace_section(args.readme, "sparse", markdown(result))
  print(f"# wrote {path} and {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
