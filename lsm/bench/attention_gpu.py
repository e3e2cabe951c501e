"""`python -m lsm.bench attention --gpu`: the Pallas GPU kernel against cuDNN and XLA.

bf16, GQA (Hkv=8), causal, sliding-window and block-sparse masks, forward and forward+backward.
Baselines in the same run: `jax.nn.dot_product_attention` with ``implementation="cudnn"`` and
``"xla"`` (given an explicit boolean mask for the block-sparse case). FLOPs count visible pairs
only (see `lsm.bench.attention`); the fraction is of the bf16 matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsm.bench import common
from lsm.bench.attention import measure
from lsm.kernels.attention import Mask, attention

SPARSE_BLOCK = 128
WINDOW = 1024
BASELINES = ("cudnn", "xla")


@functools.lru_cache(maxsize=None)
def sparse_layout(t: int) -> np.ndarray:
  """A block-sparse layout: the diagonal plus a random quarter of the blocks."""
  n = -(-t // SPARSE_BLOCK)
  layout = np.random.default_rng(n).random((n, n)) < 0.25
  return layout | np.eye(n, dtype=bool)


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  d: int
  mask: str  # causal | window | sparse
  mode: str  # fwd | fwd+bwd
  batch: int
  heads: int
  kv_heads: int = 8
  dtype: str = "bfloat16"

  def lsm_mask(self) -> Mask:
    if self.mask == "causal":
      return Mask(causal=True)
    if self.mask == "window":
      return Mask(causal=True, window=(WINDOW, 0))
    return Mask(layout=sparse_layout(self.t), layout_block=(SPARSE_BLOCK, SPARSE_BLOCK))

  def visible_pairs(self) -> float:
    if self.mask == "causal":
      return self.t * self.t / 2
    if self.mask == "window":
      return float(np.minimum(np.arange(self.t) + 1, WINDOW + 1).sum())
    return float(sparse_layout(self.t).sum()) * SPARSE_BLOCK**2

  def flops(self) -> float:
    fwd = 4 * self.batch * self.heads * self.d * self.visible_pairs()
    return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)


def cases(lengths, head_dims, modes=("fwd", "fwd+bwd")) -> list[Case]:
  """About 16k tokens per batch (B = 4 down to 1); Hq = 32 at D = 64, 16 at D = 128."""
  return [Case(t, d, mask, mode, batch=max(1, min(4, 16384 // t)), heads=32 if d == 64 else 16)
          for d in head_dims for mask in ("causal", "window", "sparse") for mode in modes
          for t in lengths]


def lsm_fn(case: Case, implementation: str):
  mask = case.lsm_mask()
  return lambda q, k, v: attention(q, k, v, mask=mask, implementation=implementation)


def baseline_fn(case: Case, implementation: str):
  if case.mask == "sparse":
    cells = np.kron(sparse_layout(case.t), np.ones((SPARSE_BLOCK, SPARSE_BLOCK), bool))
    dense = jnp.asarray(cells[:case.t, :case.t])[None, None]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense,
                                                        implementation=implementation)
  window = (WINDOW, 0) if case.mask == "window" else None
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=window, implementation=implementation)


def _attempt(case, fn, **kwargs):
  """`measure`, with a baseline that cannot run this case recorded instead of raised."""
  try:
    return measure(case, fn, **kwargs)
  except Exception as error:  # noqa: BLE001 — the run goes on; the reason lands in the JSON
    return {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def run(args) -> dict:
  started = time.time()
  info = common.machine()
  peak = common.matmul_peak(jnp.bfloat16)
  print(f"# lsm.bench attention --gpu on {info['device_kind']}, jax {info['jax']}; measured "
        f"bf16 matmul peak {peak['flops_per_s'] / 1e12:.0f} TFLOP/s; medians after warm-up, "
        f"compile excluded", flush=True)
  todo = cases(args.lengths, args.head_dims)
  if args.quick:  # the smoke run interprets the kernel on CPU: one row of 4 heads (GQA 2:1)
    todo = [dataclasses.replace(c, batch=1, heads=4, kv_heads=2) for c in todo]
  print(f"{'T':>6} {'B':>2} {'Hq':>3} {'D':>4} {'mask':>7} {'mode':>8} {'lsm TF/s':>9} "
        f"{'%peak':>6} {'cudnn TF/s':>10} {'vs cudnn':>9} {'xla TF/s':>9} {'vs xla':>7}",
        flush=True)
  rows = []
  for n, case in enumerate(todo):
    kwargs = dict(warmup=args.warmup, runs=args.runs, peak_flops=peak["flops_per_s"])
    row = {"case": dataclasses.asdict(case), "flops": case.flops(),
           "lsm": _attempt(case, lsm_fn(case, args.implementation), **kwargs)}
    for name in BASELINES:
      row[name] = _attempt(case, baseline_fn(case, name), **kwargs)
      if "median_s" in row[name] and "median_s" in row["lsm"]:
        row[f"speedup_vs_{name}"] = row[name]["median_s"] / row["lsm"]["median_s"]
    rows.append(row)
    print(_line(row) + f"   [{n + 1}/{len(todo)}, {time.time() - started:.0f}s]", flush=True)
  checks = _checks(rows)
  for name, ok, detail in checks:
    print(f"# target {'MET' if ok else 'MISSED'}: {name} ({detail})", flush=True)
  return {"benchmark": "attention-gpu", "date": datetime.date.today().isoformat(),
          "command": "python -m lsm.bench attention --gpu " + " ".join(args.argv),
          "machine": info, "matmul_peak": peak, "implementation": args.implementation,
          "baselines": [f"jax.nn.dot_product_attention(implementation={b!r})" for b in BASELINES],
          "flops_convention": "4*B*Hq*D*visible_pairs forward (causal = T^2/2); x3.5 fwd+bwd",
          "rows": rows, "checks": [dict(name=a, met=b, detail=c) for a, b, c in checks],
          "wall_s": time.time() - started}


def _tflops(result) -> str:
  return f"{result['flops_per_s'] / 1e12:.0f}" if "median_s" in result else "-"


def _line(row) -> str:
  c, lsm = row["case"], row["lsm"]
  frac = f"{100 * lsm['peak_fraction']:.0f}" if "median_s" in lsm else "-"
  vs = {b: (f"{row[f'speedup_vs_{b}']:.2f}x" if f"speedup_vs_{b}" in row else "-")
        for b in BASELINES}
  return (f"{c['t']:>6} {c['batch']:>2} {c['heads']:>3} {c['d']:>4} {c['mask']:>7} "
          f"{c['mode']:>8} {_tflops(lsm):>9} {frac:>6} {_tflops(row['cudnn']):>10} "
          f"{vs['cudnn']:>9} {_tflops(row['xla']):>9} {vs['xla']:>7}")


def _checks(rows):
  out = []
  for row in rows:
    c = row["case"]
    key = "speedup_vs_cudnn"
    if c["t"] == 8192 and c["d"] == 128 and c["mode"] == "fwd+bwd" and key in row:
      if c["mask"] == "causal":
        out.append(("causal fwd+bwd T=8k D=128: >= 0.8x cuDNN", row[key] >= 0.8,
                    f"{row[key]:.2f}x"))
      else:
        out.append((f"{c['mask']} fwd+bwd T=8k D=128: ahead of cuDNN", row[key] > 1.0,
                    f"{row[key]:.2f}x"))
  return out


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [
      f"### {m['device_kind']}, jax {m['jax']} — {result['date']}", "",
      f"Command: `{result['command']}`. Baselines in the same run: "
      f"{', '.join('`%s`' % b for b in result['baselines'])}. Measured bf16 matmul peak: "
      f"{result['matmul_peak']['flops_per_s'] / 1e12:.0f} TFLOP/s. bf16, Hkv=8; TFLOP/s count "
      f"visible pairs only (causal = half); medians after warm-up, compile excluded.", "",
      "| T | B | Hq | D | mask | mode | lsm TFLOP/s | % of peak | cuDNN TFLOP/s | vs cuDNN | "
      "XLA TFLOP/s | vs XLA |",
      "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
  for row in result["rows"]:
    c, lsm = row["case"], row["lsm"]
    frac = "%.0f%%" % (100 * lsm["peak_fraction"]) if "median_s" in lsm else "-"
    vs = {b: ("%.2fx" % row[f"speedup_vs_{b}"] if f"speedup_vs_{b}" in row else "-")
          for b in BASELINES}
    lines.append(f"| {c['t']} | {c['batch']} | {c['heads']} | {c['d']} | {c['mask']} | "
                 f"{c['mode']} | {_tflops(lsm)} | {frac} | {_tflops(row['cudnn'])} | "
                 f"{vs['cudnn']} | {_tflops(row['xla'])} | {vs['xla']} |")
  lines += ["", "Targets:", ""]
  lines += [f"- {'met' if c['met'] else 'MISSED'}: {c['name']} — {c['detail']}"
            for c in result["checks"]]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench attention --gpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run at tiny sizes; on CPU the kernel is interpreted and the "
                           "numbers mean nothing (no results table is written)")
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--implementation", default="pallas_gpu")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"))
  args = parser.parse_args(argv)
  args.argv = argv
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.quick:
    parser.error(f"--gpu needs a GPU backend, this machine has {jax.default_backend()!r} "
                 f"(use --quick for a smoke run of the script)")
  if args.quick:
    args.lengths, args.head_dims, args.runs, args.warmup = [256], [64], 1, 1
  result = run(args)
  name = "attention-gpu-quick" if args.quick else "attention-gpu"
  path = common.write_json(args.out, name, result)
  print(f"# wrote {path}")
  if not args.quick:
    common.replace_section(args.readme, "attention-gpu", markdown(result))
    print(f"# updated {args.readme}")
  return 0
