"""`python -m lsm.bench train`: training throughput and MFU, and decoding speed.

Training: the jitted train step (forward, backward, AdamW) of the quickstart model and of a
~25M-parameter model at T = 2k and 8k; tokens/s and MFU = model FLOPs/s (`train_flops_per_token`)
over the matmul peak measured in the same run. Baseline in the same run: the same step with the
model's attention on ``implementation="reference"`` (materialised scores) where it fits.
Decoding: tokens/s of the jitted one-token step at batch 1 and 8 after a prefill.
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
from lsm.config import load_config
from lsm.decode import generate
from lsm.train.loop import build_model
from lsm.train.metrics import train_flops_per_token
from lsm.train.optim import make_optimizer
from lsm.train.step import Functional, init_train_state, make_train_step

MODELS = {
    "quickstart": ["model.d_model=64", "model.num_layers=2", "model.num_heads=4",
                   "model.num_kv_heads=4", "model.mlp_dim=128"],
    "25M": ["model.d_model=512", "model.num_layers=8", "model.num_heads=8",
            "model.num_kv_heads=4", "model.mlp_dim=1536"],
}
VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  t: int
  batch: int
  implementation: str = "xla"


def _config(case: Case):
  return load_config(None, [*MODELS[case.model], f"data.seq_len={case.t}",
                            f"data.batch_size={case.batch}",
                            f"model.attention.implementation={case.implementation}"])


def _batch(case: Case):
  rng = np.random.default_rng(0)
  shape = (case.batch, case.t + 1)
  return {"tokens": jnp.asarray(rng.integers(0, VOCAB, shape), jnp.int32),
          "loss_mask": jnp.ones(shape, jnp.float32),
          "segment_ids": jnp.ones(shape, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(case.t + 1, dtype=jnp.int32), shape)}


def measure_train(case: Case, *, runs: int, peak: float) -> dict:
  config = _config(case)
  fn, params = Functional.of(build_model(config, VOCAB, 0))
  optimizer = make_optimizer(config.optimizer, 100)
  state = init_train_state(params, optimizer)
  batch = _batch(case)
  step = make_train_step(fn, optimizer, 1)
  compiled, peak_bytes = common.compile_with_memory(step, (state, batch))
  if peak_bytes is not None and peak_bytes > 0.85 * common.available_memory_bytes():
    return {"skipped": f"needs {common.fmt_bytes(peak_bytes)}"}
  timing = common.time_compiled(compiled, (state, batch), warmup=1, runs=runs)
  tokens = case.batch * case.t
  flops = train_flops_per_token(config.model, VOCAB, case.t) * tokens
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"median_s": timing.median_s, "runs_s": timing.runs_s, "tokens_per_s":
          tokens / timing.median_s, "mfu": flops / timing.median_s / peak,
          "params": n_params, "peak_bytes": peak_bytes}


def measure_decode(model_name: str, batch: int, *, prompt: int, new: int) -> dict:
  config = _config(Case(model_name, prompt, batch))
  model = build_model(config, VOCAB, 0)
  prompts = [list(np.random.default_rng(i).integers(0, VOCAB, prompt)) for i in range(batch)]
  generate(model, prompts, max_new_tokens=4)  # compile
  result = generate(model, prompts, max_new_tokens=new)
  return {"batch": batch, "prompt": prompt, "new_tokens": new, "prefill_s": result.prefill_s,
          "decode_s": result.decode_s, "tokens_per_s": result.tokens_per_s}


def run(args) -> dict:
  started = time.time()
  info = common.machine()
  peak = common.matmul_peak(jnp.float32 if info["backend"] == "cpu" else jnp.bfloat16)
  print(f"# lsm.bench train on {info['cpu']} ({info['cpu_cores']} cores, {info['backend']}), "
        f"jax {info['jax']}; measured matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s; "
        f"medians after warm-up, compile excluded", flush=True)
  rows = []
  for model_name, t, batch in args.cases:
    row = {"model": model_name, "t": t, "batch": batch}
    row["lsm"] = measure_train(Case(model_name, t, batch), runs=args.runs,
                               peak=peak["flops_per_s"])
    row["baseline"] = measure_train(Case(model_name, t, batch, "reference"), runs=args.runs,
                                    peak=peak["flops_per_s"])
    if "median_s" in row["lsm"] and "median_s" in row["baseline"]:
      row["speedup"] = row["baseline"]["median_s"] / row["lsm"]["median_s"]
    rows.append(row)
    lsm = row["lsm"]
    versus = f"{row['speedup']:.2f}x" if "speedup" in row else "- (baseline skipped)"
    print(f"train {model_name:>10} T={t:<5} B={batch:<3} "
          f"{lsm.get('tokens_per_s', 0):>9,.0f} tok/s  MFU {100 * lsm.get('mfu', 0):5.1f}%  "
          f"vs reference attention {versus}   [{time.time() - started:.0f}s]", flush=True)
  decode = []
  for batch in args.decode_batches:
    d = measure_decode(args.decode_model, batch, prompt=args.decode_prompt, new=args.decode_new)
    decode.append(d)
    print(f"decode {args.decode_model} B={batch}: {d['tokens_per_s']:,.0f} tokens/s "
          f"(prompt {d['prompt']}, {d['new_tokens']} new)", flush=True)
  checks = []
  target = next((r for r in rows if r["model"] == "25M" and r["t"] == 2048), None)
  if target and "mfu" in target["lsm"]:
    checks.append(dict(name="25M model, T=2k: MFU >= 30% of the measured matmul peak",
                       met=target["lsm"]["mfu"] >= 0.30,
                       detail=f"{100 * target['lsm']['mfu']:.1f}%"))
  for c in checks:
    print(f"# target {'MET' if c['met'] else 'MISSED'}: {c['name']} ({c['detail']})")
  return {"benchmark": "train", "date": datetime.date.today().isoformat(),
          "command": "python -m lsm.bench train " + " ".join(args.argv), "machine": info,
          "matmul_peak": peak, "baseline": "the same step with implementation='reference' "
          "attention (materialised scores)", "flops_convention": "lsm.train.metrics."
          "train_flops_per_token (6 x matmul params + attention scores, causal = half)",
          "rows": rows, "decode": decode, "checks": checks, "wall_s": time.time() - started}


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"### {m['cpu']} ({m['cpu_cores']} cores, {m['backend']}), jax {m['jax']} — "
           f"{result['date']}", "",
           f"Command: `{result['command']}`. Measured matmul peak "
           f"{result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s. Baseline: "
           f"{result['baseline']}, same run. float32, AdamW step, compile excluded.", "",
           "| model | params | T | B | tokens/s | MFU | step s | vs reference attention |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lsm = r["lsm"]
    if "median_s" not in lsm:
      lines.append(f"| {r['model']} | - | {r['t']} | {r['batch']} | skipped | | | |")
      continue
    speed = f"{r['speedup']:.2f}x" if "speedup" in r else "baseline skipped"
    lines.append(f"| {r['model']} | {lsm['params'] / 1e6:.1f}M | {r['t']} | {r['batch']} | "
                 f"{lsm['tokens_per_s']:,.0f} | {100 * lsm['mfu']:.1f}% | "
                 f"{lsm['median_s']:.2f} | {speed} |")
  lines += ["", "| decode | batch | prompt | new tokens | tokens/s |", "|---|---:|---:|---:|---:|"]
  for d in result["decode"]:
    lines.append(f"| {result['decode_model']} | {d['batch']} | {d['prompt']} | "
                 f"{d['new_tokens']} | {d['tokens_per_s']:,.0f} |")
  lines += ["", "Targets:", ""] + [f"- {'met' if c['met'] else 'MISSED'}: {c['name']} — "
                                   f"{c['detail']}" for c in result["checks"]]
  return "\n".join(lines)


def _case(text: str):
  model, t, batch = text.split(":")
  return model, int(t), int(batch)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny smoke run (no README table)")
  parser.add_argument("--cases", type=_case, nargs="+",
                      default=[("quickstart", 128, 32), ("25M", 2048, 4), ("25M", 8192, 1)],
                      help="model:T:batch")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--decode-model", default="25M", choices=sorted(MODELS))
  parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--decode-prompt", type=int, default=512)
  parser.add_argument("--decode-new", type=int, default=64)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"))
  args = parser.parse_args(argv)
  args.argv = argv
  if args.quick:
    args.cases, args.runs = [("quickstart", 64, 4)], 1
    args.decode_model, args.decode_batches, args.decode_prompt, args.decode_new = (
        "quickstart", [1, 2], 16, 4)
  result = run(args)
  result["decode_model"] = args.decode_model
  name = "train-quick" if args.quick else f"train-{result['machine']['backend']}"
  path = common.write_json(args.out, name, result)
  print(f"# wrote {path}")
  if not args.quick:
    common.replace_section(args.readme, f"train-{result['machine']['backend']}",
                           markdown(result))
    print(f"# updated {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
