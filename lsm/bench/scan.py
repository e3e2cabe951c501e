"""`python -m lsm.bench scan`: the recurrence ops' XLA paths against a plain `lax.scan`, and the
decode step of the state-space layers at short and very long contexts.

1. Ops, float32, batch 1: `linear_scan` (C=256 channels; "xla_chunked", "xla_associative"),
   `selective_scan` (Mamba-1: E=256, N=16, with D and the z gate, chunks of 64; "xla_chunked"),
   `ssd` (Mamba-2: H=8, P=32, N=64, G=1, chunks of 64; "xla_chunked"), each against the same
   recurrence written here as a `lax.scan` over time (state carried step by step; its gradient is
   XLA's autodiff of the loop, which stores every step's state), forward and forward+backward
   (gradient of ``sum(y * w)`` with respect to every input). Times are medians of AOT-compiled
   functions after a warm-up (compile excluded; the warm-up call also sizes the number of timed
   runs); memory is XLA's planned peak (arguments + outputs + temporaries). The loop is skipped
   where its planned memory does not fit or where one call, extrapolated linearly in T from the
   previous length, would take longer than ``--loop-limit`` seconds. ssd FLOP/s count the
   chunked algorithm's matmuls (see `ssd_flops`) against the float32 matmul rate measured in the
   same run.
2. Decoding (`lsm.bench.scan_decode`): one jitted decode step of Mamba2, Mamba and S4D with a
   cache that has seen n tokens, n = 1k and 1M, the cache reached by actually prefilling n
   tokens through the layer in chunks (each a call with the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsm.bench import common, scan_decode
from lsm.kernels.scan.linear import linear_scan
from lsm.kernels.scan.selective import selective_scan
from lsm.kernels.scan.ssd import ssd

LOOP = "lax.scan"
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  sizes: dict
  implementations: tuple[str, ...]
  inputs: Callable[[int, np.random.Generator], dict]  # T -> named float32 arrays
  call: Callable[[dict, str], jax.Array]  # (inputs, implementation) -> y
  loop: Callable[[dict], jax.Array]  # the same recurrence as a lax.scan over time -> y


def _time_major(*xs):
  return tuple(jnp.swapaxes(x, 0, 1) for x in xs)


def _log_uniform(rng, low, high, shape):
  return np.exp(rng.uniform(np.log(low), np.log(high), shape))


def _dt_bias(rng, size):
  """Softplus-inverse of step sizes in [1e-3, 0.1], as the layers initialise it."""
  return np.log(np.expm1(_log_uniform(rng, 1e-3, 0.1, size)))


# ------------------------------------------------------------------------ linear_scan


LINEAR_SIZES = dict(batch=1, channels=256)


def _linear_inputs(t, rng):
  b, c = LINEAR_SIZES["batch"], LINEAR_SIZES["channels"]
  return {"a": rng.uniform(0.9, 1.0, (b, t, c)), "b": rng.standard_normal((b, t, c))}


def _linear_loop(i):
  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, h_TBC = lax.scan(step, jnp.zeros_like(i["a"][:, 0]), _time_major(i["a"], i["b"]))
  return jnp.swapaxes(h_TBC, 0, 1)


LINEAR = Op("linear_scan", LINEAR_SIZES, ("xla_chunked", "xla_associative"), _linear_inputs,
            lambda i, impl: linear_scan(i["a"], i["b"], implementation=impl)[0], _linear_loop)


# --------------------------------------------------------------------- selective_scan


SELECTIVE_SIZES = dict(batch=1, inner=256, state=16, chunk=64)


def _selective_inputs(t, rng):
  b, e, n = (SELECTIVE_SIZES[k] for k in ("batch", "inner", "state"))
  return {"x": rng.standard_normal((b, t, e)), "dt": 0.1 * rng.standard_normal((b, t, e)),
          "A": -np.broadcast_to(np.arange(1, n + 1), (e, n)),
          "B": rng.standard_normal((b, t, n)), "C": rng.standard_normal((b, t, n)),
          "D": np.ones(e), "z": rng.standard_normal((b, t, e)), "dt_bias": _dt_bias(rng, e)}


def _selective_call(i, impl):
  return selective_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], z=i["z"],
                        dt_bias=i["dt_bias"], chunk_size=SELECTIVE_SIZES["chunk"],
                        implementation=impl)[0]


def _selective_loop(i):
  delta_BTE = jax.nn.softplus(i["dt"] + i["dt_bias"])

  def step(h_BEN, xs):
    x_BE, delta_BE, B_BN, C_BN = xs
    h_BEN = (jnp.exp(delta_BE[..., None] * i["A"]) * h_BEN
             + (delta_BE * x_BE)[..., None] * B_BN[:, None])
    return h_BEN, jnp.einsum("ben,bn->be", h_BEN, C_BN)

  b, _, e = i["x"].shape
  h0 = jnp.zeros((b, e, i["A"].shape[1]), jnp.float32)
  _, y_TBE = lax.scan(step, h0, _time_major(i["x"], delta_BTE, i["B"], i["C"]))
  return (jnp.swapaxes(y_TBE, 0, 1) + i["D"] * i["x"]) * jax.nn.silu(i["z"])


SELECTIVE = Op("selective_scan", SELECTIVE_SIZES, ("xla_chunked",), _selective_inputs,
               _selective_call, _selective_loop)


# -------------------------------------------------------------------------------- ssd


SSD_SIZES = dict(batch=1, heads=8, head_dim=32, state=64, groups=1, chunk=64)


def _ssd_inputs(t, rng):
  b, h, p, n, g = (SSD_SIZES[k] for k in ("batch", "heads", "head_dim", "state", "groups"))
  return {"x": rng.standard_normal((b, t, h, p)), "dt": 0.1 * rng.standard_normal((b, t, h)),
          "A": -rng.uniform(1, 16, h), "B": rng.standard_normal((b, t, g, n)),
          "C": rng.standard_normal((b, t, g, n)), "D": np.ones(h), "dt_bias": _dt_bias(rng, h)}


def _ssd_call(i, impl):
  return ssd(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], dt_bias=i["dt_bias"],
             chunk_size=SSD_SIZES["chunk"], implementation=impl)[0]


def _ssd_loop(i):
  delta_BTH = jax.nn.softplus(i["dt"] + i["dt_bias"])
  b, _, h, p = i["x"].shape
  per_group = h // i["B"].shape[2]
  B_BTHN, C_BTHN = (jnp.repeat(i[k], per_group, axis=2) for k in ("B", "C"))

  def step(h_BHPN, xs):
    x_BHP, delta_BH, B_BHN, C_BHN = xs
    h_BHPN = (jnp.exp(delta_BH * i["A"])[..., None, None] * h_BHPN
              + (delta_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None])
    return h_BHPN, jnp.einsum("bhpn,bhn->bhp", h_BHPN, C_BHN)

  h0 = jnp.zeros((b, h, p, B_BTHN.shape[-1]), jnp.float32)
  _, y_TBHP = lax.scan(step, h0, _time_major(i["x"], delta_BTH, B_BTHN, C_BTHN))
  return jnp.swapaxes(y_TBHP, 0, 1) + i["D"][:, None] * i["x"]


SSD = Op("ssd", SSD_SIZES, ("xla_chunked",), _ssd_inputs, _ssd_call, _ssd_loop)

OPS = {op.name: op for op in (LINEAR, SELECTIVE, SSD)}


FLOPS_CONVENTION = ("ssd: matmul FLOPs of the chunked algorithm per token, chunk Q = min(64, T): "
                    "2QNG + 2QPH + 4PNH; x3 for fwd+bwd; the same count for the loop")


def ssd_flops(t: int, mode: str, sizes: dict = SSD_SIZES) -> float:
  """Matmul FLOPs of the chunked SSD algorithm (chunks of Q = min(chunk, T)), per token: C·Bᵀ
  within the chunk (2·Q·N per group), its masked product with x (2·Q·P per head), the chunk's
  state from x and B, and the output from the incoming state (2·P·N each per head). Forward +
  backward counts 3x (two matmuls backward per matmul forward)."""
  q = min(sizes["chunk"], t)
  h, p, n, g = sizes["heads"], sizes["head_dim"], sizes["state"], sizes["groups"]
  per_token = 2 * q * n * g + 2 * q * p * h + 4 * p * n * h
  return sizes["batch"] * t * per_token * (3.0 if mode == "fwd+bwd" else 1.0)


# ------------------------------------------------------------------------ measurement


def _program(y_fn, mode):
  if mode == "fwd":
    return lambda inputs, w: y_fn(inputs)
  return jax.grad(lambda inputs, w: jnp.sum(y_fn(inputs) * w))


def measure(fn, args, *, budget: int, min_runs: int, max_runs: int, target_s: float) -> dict:
  """Compile (timed separately), then time: one warm-up call, whose time sets how many runs fit
  in about ``target_s`` (between ``min_runs`` and ``max_runs``), then the median of those."""
  start = time.perf_counter()
  compiled, peak_bytes = common.compile_with_memory(fn, args)
  compile_s = time.perf_counter() - start
  if peak_bytes is not None and peak_bytes > budget:
    return {"skipped": f"planned memory {common.fmt_bytes(peak_bytes)} > "
                       f"{common.fmt_bytes(budget)} available", "peak_bytes": peak_bytes}
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  runs = int(np.clip(target_s / max(first, 1e-9), min_runs, max_runs))
  timing = common.time_compiled(compiled, args, warmup=0, runs=runs)
  return {"median_s": timing.median_s, "runs_s": timing.runs_s, "warmup": 1,
          "warmup_s": first, "compile_s": compile_s, "peak_bytes": peak_bytes}


def max_errors(op: Op, inputs: dict) -> dict[str, float]:
  """Per implementation: the largest |op - loop| of the forward outputs over the largest |loop|."""
  y_loop = jax.jit(op.loop)(inputs)
  scale = jnp.max(jnp.abs(y_loop))
  return {impl: float(jnp.max(jnp.abs(jax.jit(lambda i, impl=impl: op.call(i, impl))(inputs)
                                      - y_loop)) / scale) for impl in op.implementations}


def op_rows(op: Op, lengths, args, peak_flops: float, progress) -> list[dict]:
  rows, last_loop = [], {}
  budget = int(0.85 * common.available_memory_bytes())
  timing = dict(min_runs=args.min_runs, max_runs=args.max_runs, target_s=args.target_s)
  for t in lengths:
    rng = np.random.default_rng(t)
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in op.inputs(t, rng).items()}
    y_shape = jax.eval_shape(lambda i: op.call(i, op.implementations[0]), inputs).shape
    w = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
    for mode in MODES:
      row = {"op": op.name, "t": t, "mode": mode, "sizes": op.sizes, "results": {}}
      for impl in op.implementations:
        row["results"][impl] = measure(_program(lambda i, impl=impl: op.call(i, impl), mode),
                                       (inputs, w), budget=budget, **timing)
      row["results"][LOOP] = _measure_loop(op, mode, t, (inputs, w), last_loop, args.loop_limit,
                                           budget, timing)
      loop = row["results"][LOOP]
      row["speedup_vs_loop"] = {
          impl: loop["median_s"] / r["median_s"] for impl, r in row["results"].items()
          if impl != LOOP and "median_s" in r and "median_s" in loop}
      if op is SSD:
        row["flops"] = ssd_flops(t, mode)
        for r in row["results"].values():
          if "median_s" in r:
            r["flops_per_s"] = row["flops"] / r["median_s"]
            r["peak_fraction"] = r["flops_per_s"] / peak_flops
      if mode == "fwd" and "median_s" in loop:
        row["max_relative_error_vs_loop"] = max_errors(op, inputs)
      rows.append(row)
      progress(_line(row))
  return rows


def _measure_loop(op, mode, t, fn_args, last_loop, limit, budget, timing) -> dict:
  previous = last_loop.get(mode)
  guess = previous["median_s"] * t / previous["t"] if previous else 0.0
  if guess > limit:
    result = {"skipped": f"one call would take ~{guess:.0f} s (linear from T={previous['t']}), "
                         f"over the {limit:g} s limit", "predicted_s": guess}
  else:
    result = measure(_program(op.loop, mode), fn_args, budget=budget, **timing)
  if "median_s" in result:
    last_loop[mode] = {"median_s": result["median_s"], "t": t}
  return result


# ----------------------------------------------------------------------------- output


def _ms(result: dict | None) -> str:
  if result is None:
    return "-"
  return "skipped" if "skipped" in result else f"{result['median_s'] * 1e3:.2f}"


def _line(row) -> str:
  parts = []
  for impl, r in row["results"].items():
    part = f"{impl} {_ms(r)} ms ({common.fmt_bytes(r.get('peak_bytes'))})"
    if impl in row["speedup_vs_loop"]:
      part += f" {row['speedup_vs_loop'][impl]:.1f}x"
    if "peak_fraction" in r:
      part += f" {r['flops_per_s'] / 1e9:.1f} GFLOP/s {100 * r['peak_fraction']:.0f}%"
    parts.append(part)
  return f"{row['op']:>14} {row['mode']:>7} T={row['t']:>6}: " + "; ".join(parts)


def _find(rows, **want):
  return next((r for r in rows if all(r[k] == v for k, v in want.items())), None)


def _checks(result) -> list[tuple[str, bool, str]]:
  """The targets, evaluated on what this run measured."""
  rows, out = result["ops"], []
  target_t = result["targets"]["ssd_speedup_t"]
  both = _find(rows, op="ssd", t=target_t, mode="fwd+bwd")
  if both and "xla_chunked" in both["speedup_vs_loop"]:
    speedup = both["speedup_vs_loop"]["xla_chunked"]
    out.append((f"ssd xla_chunked fwd+bwd T={target_t}: >= 10x faster than the lax.scan loop",
                speedup >= 10, f"{speedup:.1f}x"))
  lengths = sorted({r["t"] for r in rows})
  long_t = lengths[-1]
  short_t = long_t // 8 if long_t // 8 in lengths else lengths[0]
  allowed = 9 / 8 * long_t / short_t
  for op in OPS.values():
    for impl in op.implementations:
      for mode in MODES:
        short, longer = (_find(rows, op=op.name, t=x, mode=mode) for x in (short_t, long_t))
        if not (short and longer and short is not longer):
          continue
        a, b = short["results"][impl], longer["results"][impl]
        if "median_s" in a and "median_s" in b:
          ratio = b["median_s"] / a["median_s"]
          out.append((f"{op.name} {impl} {mode}: time(T={long_t}) <= {allowed:g}x "
                      f"time(T={short_t}) (linear in T)", ratio <= allowed, f"{ratio:.2f}x"))
  for layer in result["decode"]:
    rows_ = layer["contexts"]
    if len(rows_) >= 2:
      ratio = rows_[-1]["step"]["median_s"] / rows_[0]["step"]["median_s"]
      out.append((f"{layer['layer']} decode step after {rows_[-1]['context_reached']} tokens "
                  f"within 10% of after {rows_[0]['context_reached']}", abs(ratio - 1) <= 0.1,
                  f"{ratio:.3f}x"))
  return out


def markdown(result: dict) -> str:
  m, fb = result["machine"], common.fmt_bytes
  lines = [
      f"### {m['cpu']} ({m['cpu_cores']} cores, {m['backend']}), jax {m['jax']} — "
      f"{result['date']}", "",
      f"Command: `{result['command']}`. float32, batch 1. Baseline: {result['baseline']}, same "
      f"run. Measured float32 matmul peak: {result['matmul_peak']['flops_per_s'] / 1e9:.0f} "
      f"GFLOP/s. Load average {result['load_average']['start']:.1f} at the start, "
      f"{result['load_average']['end']:.1f} at the end ({m['cpu_cores']} cores).", "",
      "| op | implementation | mode | T | ms | lax.scan ms | speedup | memory | "
      "lax.scan memory | GFLOP/s | % of peak | max rel. error |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in result["ops"]:
    loop = row["results"][LOOP]
    errors = row.get("max_relative_error_vs_loop", {})
    for impl, r in row["results"].items():
      if impl == LOOP:
        continue
      speed = row["speedup_vs_loop"].get(impl)
      flops = "%.1f" % (r["flops_per_s"] / 1e9) if "flops_per_s" in r else "-"
      frac = "%.0f%%" % (100 * r["peak_fraction"]) if "peak_fraction" in r else "-"
      err = f"{errors[impl]:.1e}" if impl in errors else "-"
      lines.append(
          f"| {row['op']} | {impl} | {row['mode']} | {row['t']} | {_ms(r)} | {_ms(loop)} | "
          f"{'%.1fx' % speed if speed else '-'} | {fb(r.get('peak_bytes'))} | "
          f"{fb(loop.get('peak_bytes'))} | {flops} | {frac} | {err} |")
  skipped = sorted({(row["op"], row["mode"], row["t"], row["results"][LOOP]["skipped"])
                    for row in result["ops"] if "skipped" in row["results"][LOOP]})
  if skipped:
    lines += ["", "lax.scan skipped: " + "; ".join(
        f"{op} {mode} T={t} ({why})" for op, mode, t, why in skipped) + "."]
  lines += ["", scan_decode.markdown(result["decode"], result["decode_note"])]
  lines += ["", "Targets:", ""]
  lines += [f"- {'met' if c['met'] else 'MISSED'}: {c['name']} — {c['detail']}"
            for c in result["checks"]]
  return "\n".join(lines)


def run(args) -> dict:
  started = time.time()
  info = common.machine()
  load_start = os.getloadavg()[0]
  print(f"# lsm.bench scan on {info['cpu']} ({info['cpu_cores']} cores, {info['backend']}), "
        f"jax {info['jax']}; load average {load_start:.1f}", flush=True)
  peak = common.matmul_peak("float32", n=args.matmul_n)
  print(f"# measured float32 matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['n']}^3, median of 5)", flush=True)
  print("# times are medians after a warm-up, compile excluded; memory is XLA's planned peak",
        flush=True)

  def progress(text):
    print(f"[{time.time() - started:5.0f}s] {text}", flush=True)

  ops = []
  for name in args.ops:
    ops += op_rows(OPS[name], args.lengths, args, peak["flops_per_s"], progress)
  decode = scan_decode.decode_rows(args.layers, args.contexts, chunk=args.prefill_chunk,
                                   prefill_limit=args.prefill_limit, rounds=args.decode_rounds,
                                   progress=progress)
  result = {"benchmark": "scan", "date": datetime.date.today().isoformat(),
            "command": " ".join(["python -m lsm.bench scan", *args.argv]).strip(),
            "machine": info, "matmul_peak": peak, "dtype": "float32",
            "baseline": "the same recurrence as a lax.scan over time, written in lsm.bench.scan",
            "memory_convention": "XLA planned peak of the compiled function: arguments + outputs"
                                 " + temporaries - aliased",
            "flops_convention": FLOPS_CONVENTION,
            "timing": dict(min_runs=args.min_runs, max_runs=args.max_runs,
                           target_s=args.target_s, loop_limit_s=args.loop_limit),
            "targets": {"ssd_speedup_t": 16384 if 16384 in args.lengths else args.lengths[-1]},
            "ops": ops, "decode": decode, "decode_note": scan_decode.NOTE,
            "load_average": {"start": load_start, "end": os.getloadavg()[0]}}
  result["checks"] = [dict(name=a, met=b, detail=c) for a, b, c in _checks(result)]
  for c in result["checks"]:
    print(f"# target {'MET' if c['met'] else 'MISSED'}: {c['name']} ({c['detail']})", flush=True)
  result["wall_s"] = time.time() - started
  return result


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench scan", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run at tiny sizes in under a minute (not for the README)")
  parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
  parser.add_argument("--min-runs", type=int, default=3, help="timed runs at least")
  parser.add_argument("--max-runs", type=int, default=20, help="timed runs at most")
  parser.add_argument("--target-s", type=float, default=2.0,
                      help="timed runs per case: as many as fit in this (within the bounds)")
  parser.add_argument("--loop-limit", type=float, default=60.0,
                      help="skip the lax.scan loop where one call would take longer (seconds)")
  parser.add_argument("--layers", nargs="*", choices=sorted(scan_decode.LAYERS),
                      default=list(scan_decode.LAYERS))
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 1 << 20],
                      help="tokens the decode cache has seen (prefilled) before the timed step")
  parser.add_argument("--prefill-chunk", type=int, default=16384,
                      help="tokens per prefill call (contexts must be multiples or smaller)")
  parser.add_argument("--prefill-limit", type=float, default=600.0,
                      help="seconds of prefill per layer and context; past it the prefill stops "
                           "and the row says how many tokens the cache saw")
  parser.add_argument("--decode-rounds", type=int, default=200,
                      help="timed decode steps per context (interleaved across contexts)")
  parser.add_argument("--matmul-n", type=int, default=4096, help="size of the peak matmul")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"),
                      help="where the tables go (skipped for --quick)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.quick:
    args.lengths, args.contexts, args.prefill_chunk = [256, 1024], [256, 2048], 256
    args.min_runs, args.max_runs, args.target_s = 2, 3, 0.05
    args.decode_rounds, args.matmul_n = 5, 512
  for n in args.contexts:
    if n > args.prefill_chunk and n % args.prefill_chunk:
      parser.error(f"--contexts: {n} is neither <= --prefill-chunk={args.prefill_chunk} nor a "
                   f"multiple of it")
  result = run(args)
  path = common.write_json(args.out, "scan-quick" if args.quick else "scan-cpu", result)
  print(f"# wrote {path}")
  if not args.quick:
    common.replace_section(args.readme, f"scan-{result['machine']['backend']}", markdown(result))
    print(f"# updated {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
