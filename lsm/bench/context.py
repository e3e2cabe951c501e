"""`python -m lsm.bench context`: context-parallel attention on 8 devices emulated on one CPU.

`lsm.parallel.context_attention` against the single-device op (`attention`, ``implementation=
"xla"``), causal, over ``P = 8`` CPU devices that XLA emulates in one process
(``--xla_force_host_platform_device_count=8``): they share this machine's cores and memory, so
wall times compare the same total work, and "bytes moved" are read from the compiled program, not
timed over a link. Six measurements:

1. memory: XLA's planned per-device peak (arguments + outputs + temporaries) of ring fwd+bwd
   against the single-device op at the same T (and at T/P, the problem each device holds);
2. work: key blocks the XLA path visits on each device (sum over the ring's hops of
   `visited_blocks` of its queries against that hop's keys) for each token layout;
3. bytes each device sends per call, parsed from the compiled HLO's collectives, per strategy,
   next to the formula;
4. wall time of ring (contiguous and zigzag) fwd+bwd against the single-device op, same run;
5. the longest T whose ring fwd+bwd fits in host memory (8 x the planned per-device peak), and
   one execution at the longest T allowed by ``--execute-up-to`` (all of it with
   ``--execute-max``);
6. decoding with a KV cache sharded over the devices: bytes per generated token of the lse merge
   (from HLO and by formula) against rotating the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from lsm.bench import common
from lsm.bench.hlo import collectives
from lsm.kernels.attention import BlockSizes, Mask, attention, visited_blocks
from lsm.parallel.context import context_attention, hop_table, work_balance
from lsm.parallel.layout import LAYOUTS, permutation

SHARDS = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={SHARDS}"
CAUSAL = Mask(causal=True)
AXIS = "sequence"


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: str

  def itemsize(self) -> int:
    return jnp.dtype(self.dtype).itemsize

  def flops(self, t: int) -> float:
    """Useful causal fwd+bwd FLOPs, as in `lsm.bench.attention`: 3.5 x 4 B Hq D T^2/2."""
    return 3.5 * 4 * self.batch * self.heads * self.head_dim * t * t / 2


TRAIN = Shape(batch=1, heads=8, kv_heads=2, head_dim=64, dtype="float32")  # = lsm.bench attention
COMM = Shape(batch=1, heads=8, kv_heads=8, head_dim=64, dtype="float32")  # ulysses needs H % P
DECODE = Shape(batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")


# --------------------------------------------------------------------------------- programs


def cpu_mesh():
  devices = np.array(jax.devices("cpu")[:SHARDS])
  return jax.make_mesh((SHARDS,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def _specs(shape: Shape, t: int, sharding):
  """Abstract q, k, v and the loss weights w (what the compiler needs; nothing allocated)."""
  return tuple(jax.ShapeDtypeStruct((shape.batch, t, h, shape.head_dim), shape.dtype,
                                    sharding=sharding)
               for h in (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads))


def _arrays(shape: Shape, t: int, sharding, seed: int = 0):
  """Random q, k, v, w drawn where they live (a 256k-token batch never passes through the host)."""
  specs = _specs(shape, t, sharding)

  def draw(key):
    keys = jax.random.split(key, len(specs))
    return tuple(jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, specs))

  return jax.jit(draw, out_shardings=(sharding,) * len(specs))(jax.random.key(seed))


def _single(q, k, v):
  return attention(q, k, v, mask=CAUSAL, implementation="xla")


def _parallel(mesh, strategy="ring", layout="contiguous"):
  return lambda q, k, v: context_attention(q, k, v, mesh=mesh, strategy=strategy, layout=layout,
                                           mask=CAUSAL, implementation="xla")


def _fwd(fn):
  return lambda q, k, v, w: fn(q, k, v)


def _fwd_bwd(fn):
  def grads(q, k, v, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return grads


def _memory(compiled) -> dict:
  """XLA's planned per-device bytes of a compiled program (an SPMD program's are per device)."""
  m = compiled.memory_analysis()
  parts = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)
  return dict(parts, total=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"])


def _compile(fn, args):
  return jax.jit(fn).lower(*args).compile()


# --------------------------------------------------------------------------------- 1, 5: memory


@functools.cache
def ring_memory(mesh, t: int, layout: str) -> dict:
  specs = _specs(TRAIN, t, NamedSharding(mesh, P(None, AXIS)))
  return _memory(_compile(_fwd_bwd(_parallel(mesh, "ring", layout)), specs))


def single_memory(t: int) -> dict:
  specs = _specs(TRAIN, t, SingleDeviceSharding(jax.devices("cpu")[0]))
  return _memory(_compile(_fwd_bwd(_single), specs))


def memory_rows(mesh, lengths, layouts) -> list[dict]:
  rows = []
  for t in lengths:
    single, local = single_memory(t), single_memory(t // SHARDS)
    ring = {layout: ring_memory(mesh, t, layout) for layout in layouts}
    rows.append(dict(t=t, ring_per_device=ring, single=single, single_at_t_over_p=local,
                     ratio={k: m["total"] / single["total"] for k, m in ring.items()},
                     ring_over_local={k: m["total"] / local["total"] for k, m in ring.items()}))
  return rows


def longest_fit(mesh, start: int, stop: int, layout: str, budget: int) -> list[dict]:
  """Ring fwd+bwd planned per-device bytes over a doubling series of T (compile only)."""
  rows, t = [], start
  while t <= stop:
    per_device = ring_memory(mesh, t, layout)["total"]
    rows.append(dict(t=t, per_device=per_device, all_devices=SHARDS * per_device,
                     fits=SHARDS * per_device <= budget))
    t *= 2
  return rows


def execute_ring(mesh, t: int, layout: str) -> dict:
  """One execution of ring fwd+bwd at T (compile excluded; no warm-up: it can take minutes)."""
  sharding = NamedSharding(mesh, P(None, AXIS))
  args = _arrays(TRAIN, t, sharding)
  compiled = _compile(_fwd_bwd(_parallel(mesh, "ring", layout)), args)
  timing = common.time_compiled(compiled, args, warmup=0, runs=1)
  grads = compiled(*args)
  finite = all(bool(jnp.isfinite(g).all()) for g in grads)
  return dict(t=t, layout=layout, seconds=timing.median_s, finite=finite)


# --------------------------------------------------------------------------------- 2: work


def work_rows(t: int, block: int) -> list[dict]:
  """Key blocks visited per device by ring attention (causal) for every layout."""
  blocks = BlockSizes(q=block, kv=block)
  local = t // SHARDS
  single = int(np.asarray(visited_blocks(CAUSAL, np.arange(t), np.arange(t),
                                         block_sizes=blocks)).sum())
  rows = []
  for layout in LAYOUTS:
    perm = permutation(t, SHARDS, layout)
    shard = lambda r: perm[r * local:(r + 1) * local]  # noqa: E731
    table = hop_table(CAUSAL, perm[None], perm[None], None, None, SHARDS)
    visited = [sum(int(np.asarray(visited_blocks(CAUSAL, shard(r), shard((r - s) % SHARDS),
                                                 block_sizes=blocks)).sum())
                   for s in range(SHARDS) if table[s, r])
               for r in range(SHARDS)]
    shares = work_balance(CAUSAL, perm[None], perm[None], SHARDS)
    rows.append(dict(layout=layout, visited_per_device=visited,
                     balance=min(visited) / max(visited), total=sum(visited),
                     total_over_single=sum(visited) / single,
                     dense_per_device=SHARDS * (local // block) ** 2,
                     hops_per_device=table.sum(axis=0).tolist(),
                     work_balance_min_over_max=float(shares.min() / shares.max())))
  return rows


# --------------------------------------------------------------------------------- 3, 6: bytes


def comm_formula(strategy: str, mode: str, s: Shape, t: int, p: int = SHARDS) -> tuple[float, str]:
  """Bytes each device sends as the strategy is written (before XLA removes or reuses any)."""
  loc = s.batch * t // p
  q = loc * s.heads * s.head_dim * s.itemsize()
  kv = 2 * loc * s.kv_heads * s.head_dim * s.itemsize()
  pos = loc * 4
  grads = 2 * loc * s.kv_heads * s.head_dim * 4  # dK, dV travel in float32
  share = (p - 1) / p
  if strategy == "ring":
    fwd = (p - 1) * (kv + pos)
    if mode == "fwd":
      return fwd, "(P-1) x local K,V,positions"
    return 2 * fwd + p * grads, "fwd x 2 (K,V,pos rotate again) + P x local dK,dV f32"
  if strategy == "all_gather":
    fwd = share * p * (kv + pos)
    if mode == "fwd":
      return fwd, "(P-1)/P x full K,V,positions"
    return fwd + share * p * kv, "fwd + reduce-scatter of full dK,dV"
  fwd = share * (2 * q + kv) + share * p * pos
  if mode == "fwd":
    return fwd, "(P-1)/P x local q,k,v,out (all-to-all) + gathered positions"
  return fwd + share * (2 * q + kv), "fwd + (P-1)/P x local dout,dq,dk,dv"


def comm_rows(mesh, t: int) -> list[dict]:
  specs = _specs(COMM, t, NamedSharding(mesh, P(None, AXIS)))
  rows = []
  for strategy in ("ring", "all_gather", "ulysses"):
    for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
      hlo = _compile(wrap(_parallel(mesh, strategy)), specs).as_text()
      formula, how = comm_formula(strategy, mode, COMM, t)
      rows.append(dict(strategy=strategy, mode=mode, measured=collectives(hlo, SHARDS),
                       formula_bytes=formula, formula=how))
  return rows


def decode_program(mesh):
  """One decoding step over a cache sharded along T: each device attends the (replicated) query
  over its slots, then the partials merge by lse (a max and two sums across the axis)."""

  def local(q, k, v):
    out, lse = attention(q, k, v, implementation="xla", return_lse=True)  # [B,1,H,Dv], [B,H,1]
    top = lax.pmax(lse, AXIS)
    weight = jnp.exp(lse - top)
    num = lax.psum(out.astype(jnp.float32) * weight.transpose(0, 2, 1)[..., None], AXIS)
    den = lax.psum(weight, AXIS)
    return (num / den.transpose(0, 2, 1)[..., None]).astype(q.dtype)

  cache = P(None, AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), cache, cache), out_specs=P(),
                       check_vma=False)


def decode_row(mesh, cache_len: int, s: Shape = DECODE) -> dict:
  q = jax.ShapeDtypeStruct((s.batch, 1, s.heads, s.head_dim), s.dtype,
                           sharding=NamedSharding(mesh, P()))
  kv = jax.ShapeDtypeStruct((s.batch, cache_len, s.kv_heads, s.head_dim), s.dtype,
                            sharding=NamedSharding(mesh, P(None, AXIS)))
  hlo = _compile(decode_program(mesh), (q, kv, kv)).as_text()
  merge = s.batch * s.heads * s.head_dim * 4 + 2 * s.batch * s.heads * 4  # out, max, sum (f32)
  cache_bytes = 2 * s.batch * cache_len * s.kv_heads * s.head_dim * s.itemsize()
  return dict(shape=dataclasses.asdict(s), cache_len=cache_len, measured=collectives(hlo, SHARDS),
              formula_payload_bytes=merge,
              formula_sent_per_device=2 * merge * (SHARDS - 1) / SHARDS,
              cache_bytes=cache_bytes,
              rotate_cache_sent_per_device=cache_bytes * (SHARDS - 1) / SHARDS)


# --------------------------------------------------------------------------------- 4: time


def time_rows(mesh, lengths, runs: int, peak_flops: float) -> list[dict]:
  rows = []
  for t in lengths:
    row = dict(t=t, flops=TRAIN.flops(t))
    cpu0 = SingleDeviceSharding(jax.devices("cpu")[0])
    cases = [("single", _single, cpu0)] + [
        (f"ring_{layout}", _parallel(mesh, "ring", layout), NamedSharding(mesh, P(None, AXIS)))
        for layout in ("contiguous", "zigzag")]
    for name, fn, sharding in cases:
      args = _arrays(TRAIN, t, sharding)
      compiled = _compile(_fwd_bwd(fn), args)
      timing = common.time_compiled(compiled, args, warmup=1, runs=runs)
      del args
      flops_per_s = row["flops"] / timing.median_s
      row[name] = dict(median_s=timing.median_s, runs_s=timing.runs_s, warmup=timing.warmup,
                       flops_per_s=flops_per_s, peak_fraction=flops_per_s / peak_flops)
    for layout in ("contiguous", "zigzag"):
      row[f"ratio_{layout}"] = row[f"ring_{layout}"]["median_s"] / row["single"]["median_s"]
    rows.append(row)
  return rows


# --------------------------------------------------------------------------------- the run


def _load_note() -> str | None:
  load = os.getloadavg()[0]
  if load > (os.cpu_count() or 1) + 0.5:
    return (f"load average {load:.1f} on {os.cpu_count()} cores at the start: another process "
            f"is using the CPU, so wall times are noisy (ratios are of the same run)")
  return None


def run(args) -> dict:
  started = time.time()
  mesh = cpu_mesh()
  info = common.machine()
  emulated = (f"{SHARDS} CPU devices emulated in one process ({DEVICE_FLAG}) sharing "
              f"{info['cpu_cores']} cores and one host memory")
  print(f"# lsm.bench context on {info['cpu']} ({info['cpu_cores']} cores), jax {info['jax']}",
        flush=True)
  print(f"# {emulated}", flush=True)
  load = _load_note()
  if load:
    print(f"# note: {load}", flush=True)
  peak = common.matmul_peak("float32", n=args.matmul_n)
  print(f"# measured float32 matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['n']}^3, median of 5)", flush=True)
  result = {"benchmark": "context", "date": datetime.date.today().isoformat(),
            "command": " ".join(["python -m lsm.bench context", *args.argv]), "machine": info,
            "devices": emulated, "shards": SHARDS, "load_note": load, "matmul_peak": peak,
            "mask": "causal", "implementation": "xla", "train_shape": dataclasses.asdict(TRAIN),
            "baseline": "lsm.kernels.attention.attention(implementation='xla') on one device",
            "memory_convention": "XLA planned peak of the compiled program per device: "
                                 "arguments + outputs + temporaries - aliased",
            "flops_convention": "3.5 x 4*B*Hq*D*T^2/2 (causal fwd+bwd), as lsm.bench attention"}

  def stage(name):
    print(f"# [{time.time() - started:.0f}s] {name}", flush=True)

  layouts = list(dict.fromkeys((args.layout, "contiguous")))
  stage(f"1. memory of ring fwd+bwd ({', '.join(layouts)}) vs the single-device op")
  result["memory"] = memory_rows(mesh, args.memory_lengths, layouts)
  print(f"{'T':>8} {'single':>10} {'single T/P':>11}" +
        "".join(f" {k[:6] + ' /dev':>12} {'ratio':>6}" for k in layouts), flush=True)
  for r in result["memory"]:
    print(f"{r['t']:>8} {common.fmt_bytes(r['single']['total']):>10} "
          f"{common.fmt_bytes(r['single_at_t_over_p']['total']):>11}" +
          "".join(f" {common.fmt_bytes(r['ring_per_device'][k]['total']):>12} "
                  f"{r['ratio'][k]:>6.3f}" for k in layouts), flush=True)

  stage(f"2. key blocks visited per device, T={args.work_length}, blocks of {args.work_block}")
  result["work"] = dict(t=args.work_length, block=args.work_block,
                        rows=work_rows(args.work_length, args.work_block))
  for r in result["work"]["rows"]:
    print(f"{r['layout']:>11}: per device {r['visited_per_device']} min/max {r['balance']:.3f}, "
          f"total {r['total_over_single']:.3f}x the single-device op's", flush=True)

  stage(f"3. bytes each device sends per call (compiled HLO), T={args.comm_length}, "
        f"Hq=Hkv={COMM.heads}, D={COMM.head_dim}, {COMM.dtype}")
  result["comm"] = dict(t=args.comm_length, shape=dataclasses.asdict(COMM),
                        rows=comm_rows(mesh, args.comm_length))
  for r in result["comm"]["rows"]:
    m = r["measured"]
    print(f"{r['strategy']:>11} {r['mode']:>8}: HLO {common.fmt_bytes(m['bytes_sent_per_device'])}"
          f" {m['counts']}, formula {common.fmt_bytes(r['formula_bytes'])} ({r['formula']})",
          flush=True)

  stage("4. wall time of ring fwd+bwd vs the single-device op (compile excluded, "
        f"median of {args.runs} after 1 warm-up)")
  print(f"{'T':>8} {'single s':>9} {'contig s':>9} {'ratio':>6} {'zigzag s':>9} {'ratio':>6} "
        f"{'zz GFLOP/s':>10} {'%peak':>6}", flush=True)
  result["time"] = []
  for t in args.time_lengths:
    r = time_rows(mesh, [t], args.runs, peak["flops_per_s"])[0]
    result["time"].append(r)
    print(f"{t:>8} {r['single']['median_s']:>9.2f} {r['ring_contiguous']['median_s']:>9.2f} "
          f"{r['ratio_contiguous']:>5.2f}x {r['ring_zigzag']['median_s']:>9.2f} "
          f"{r['ratio_zigzag']:>5.2f}x {r['ring_zigzag']['flops_per_s'] / 1e9:>10.1f} "
          f"{100 * r['ring_zigzag']['peak_fraction']:>5.0f}%", flush=True)

  budget = int(0.85 * common.available_memory_bytes())
  stage(f"5. longest T for ring fwd+bwd: {SHARDS} x planned per-device bytes <= "
        f"{common.fmt_bytes(budget)} (85% of available host memory)")
  series = longest_fit(mesh, min(args.memory_lengths), args.max_length, args.layout, budget)
  fitting = [r["t"] for r in series if r["fits"]]
  longest = max(fitting) if fitting else None
  for r in series:
    print(f"{r['t']:>8} per device {common.fmt_bytes(r['per_device']):>9}, x{SHARDS} "
          f"{common.fmt_bytes(r['all_devices']):>9} {'fits' if r['fits'] else 'does not fit'}",
          flush=True)
  limit = longest if args.execute_max else min(longest or 0, args.execute_up_to)
  runnable = [t for t in fitting if t <= limit]
  executed = execute_ring(mesh, max(runnable), args.layout) if runnable else None
  if executed:
    print(f"# executed ring fwd+bwd at T={executed['t']}: {executed['seconds']:.1f} s "
          f"(one run), finite gradients: {executed['finite']}", flush=True)
  result["longest"] = dict(budget_bytes=budget, layout=args.layout, series=series,
                           longest_fitting=longest, executed=executed)

  stage(f"6. decoding over a cache sharded {SHARDS} ways, {args.decode_cache} tokens")
  result["decode"] = decode_row(mesh, args.decode_cache)
  d = result["decode"]
  print(f"# per token: HLO {d['measured']['counts']} payload "
        f"{d['measured']['payload_bytes']:,} B (formula {d['formula_payload_bytes']:,} B), "
        f"sent per device {d['measured']['bytes_sent_per_device']:,.0f} B; rotating the cache "
        f"instead: {common.fmt_bytes(d['rotate_cache_sent_per_device'])}", flush=True)

  result["checks"] = [dict(name=a, met=b, detail=c) for a, b, c in _checks(result)]
  for c in result["checks"]:
    print(f"# target {'MET' if c['met'] else 'MISSED'}: {c['name']} ({c['detail']})", flush=True)
  result["wall_s"] = time.time() - started
  return result


def _checks(result):
  out = []
  big = result["memory"][-1]
  for layout, ratio in big["ratio"].items():
    out.append((f"ring ({layout}) fwd+bwd per-device memory ~ 1/{SHARDS} of the single-device "
                f"op at T={big['t']} (<= 1.25/{SHARDS})", ratio <= 1.25 / SHARDS,
                f"{ratio:.3f} (1/{SHARDS} = {1 / SHARDS:.3f})"))
  zigzag = next(r for r in result["work"]["rows"] if r["layout"] == "zigzag")
  out.append(("zigzag: least-loaded device >= 95% of the most-loaded's visited blocks",
              zigzag["balance"] >= 0.95, f"{zigzag['balance']:.3f}"))
  ring = next(r for r in result["comm"]["rows"] if r["strategy"] == "ring" and r["mode"] == "fwd")
  got = ring["measured"]["bytes_sent_per_device"]
  out.append(("ring fwd: bytes in the HLO = (P-1) x local K,V,positions",
              abs(got - ring["formula_bytes"]) <= 0.01 * ring["formula_bytes"],
              f"{common.fmt_bytes(got)} vs {common.fmt_bytes(ring['formula_bytes'])}"))
  if result["time"]:
    t = result["time"][-1]
    for layout in ("contiguous", "zigzag"):
      ratio = t[f"ratio_{layout}"]
      out.append((f"ring ({layout}) fwd+bwd T={t['t']}: <= 1.3x the single-device op",
                  ratio <= 1.3, f"{ratio:.2f}x"))
  longest = result["longest"]["longest_fitting"]
  out.append(("longest causal T whose ring fwd+bwd fits (planned memory) >= 256k",
              bool(longest and longest >= 262144), f"{longest}"))
  d = result["decode"]
  out.append(("decode: the lse merge moves what the formula says (HLO payload)",
              d["measured"]["payload_bytes"] == d["formula_payload_bytes"],
              f"{d['measured']['payload_bytes']:,} B vs {d['formula_payload_bytes']:,} B"))
  return out


# --------------------------------------------------------------------------------- output


def _counts(measured: dict) -> str:
  return ", ".join(f"{n}× {op}" for op, n in measured["counts"].items())


def markdown(result: dict) -> str:
  m, fb = result["machine"], common.fmt_bytes
  p = result["shards"]
  s = result["train_shape"]
  lines = [
      f"### {m['cpu']} ({m['cpu_cores']} cores, cpu), jax {m['jax']} — {result['date']}", "",
      f"Command: `{result['command']}`. Devices: {result['devices']}. Causal mask, "
      f"`implementation='xla'`; B={s['batch']}, Hq={s['heads']}, Hkv={s['kv_heads']}, "
      f"D={s['head_dim']}, {s['dtype']} unless said. Measured float32 matmul peak: "
      f"{result['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s."
      + (f" Note: {result['load_note']}." if result["load_note"] else ""), "",
      "**Memory** (compile-time: XLA's planned per-device peak of ring fwd+bwd; ratio = ring "
      f"per device / single-device op at the same T, ideally 1/P = {1 / p:.3f}; last column: "
      "ring per device / single-device op at T/P, the problem each device holds):", ""]
  layouts = list(result["memory"][0]["ratio"])
  lines += ["| T | single-device op | single-device op at T/P | " + " | ".join(
      f"ring {k}, per device | ratio | × op at T/P" for k in layouts) +
      " |", "|---:|---:|---:|" + "---:|---:|---:|" * len(layouts)]
  for r in result["memory"]:
    lines.append(f"| {r['t']} | {fb(r['single']['total'])} | "
                 f"{fb(r['single_at_t_over_p']['total'])} | " + " | ".join(
                     f"{fb(r['ring_per_device'][k]['total'])} | {r['ratio'][k]:.3f} | "
                     f"{r['ring_over_local'][k]:.2f}x" for k in layouts) + " |")
  w = result["work"]
  lines += ["", f"**Work per device** (key blocks the XLA path visits, summed over the ring's "
                f"hops; T={w['t']}, blocks of {w['block']}, {p} devices):", "",
            "| layout | visited blocks per device | min / max | total vs single-device op | "
            "hops computed per device |", "|---|---|---:|---:|---|"]
  for r in w["rows"]:
    lines.append(f"| {r['layout']} | {min(r['visited_per_device'])}–"
                 f"{max(r['visited_per_device'])} | {r['balance']:.3f} | "
                 f"{r['total_over_single']:.3f}x | {r['hops_per_device']} |")
  c = result["comm"]
  lines += ["", f"**Bytes each device sends per call** (compiled HLO's collectives, compile "
                f"only; T={c['t']}, Hq=Hkv={c['shape']['heads']}, D={c['shape']['head_dim']}, "
                f"{c['shape']['dtype']}):", "",
            "| strategy | mode | collectives in the HLO | HLO bytes | formula | formula bytes |",
            "|---|---|---|---:|---|---:|"]
  for r in c["rows"]:
    lines.append(f"| {r['strategy']} | {r['mode']} | {_counts(r['measured'])} | "
                 f"{fb(r['measured']['bytes_sent_per_device'])} | {r['formula']} | "
                 f"{fb(r['formula_bytes'])} |")
  lines += ["", "**Wall time** of fwd+bwd (executed; medians after warm-up, compile excluded; "
                f"the {p} devices share the cores, so both sides do the same total work):", "",
            "| T | single-device op s | ring contiguous s | ratio | ring zigzag s | ratio | "
            "ring zigzag GFLOP/s | % of peak |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["time"]:
    zz = r["ring_zigzag"]
    lines.append(f"| {r['t']} | {r['single']['median_s']:.2f} | "
                 f"{r['ring_contiguous']['median_s']:.2f} | {r['ratio_contiguous']:.2f}x | "
                 f"{zz['median_s']:.2f} | {r['ratio_zigzag']:.2f}x | "
                 f"{zz['flops_per_s'] / 1e9:.0f} | {100 * zz['peak_fraction']:.0f}% |")
  g = result["longest"]
  lines += ["", f"**Longest T** (compile-time: {p} × planned per-device peak of ring fwd+bwd "
                f"against {fb(g['budget_bytes'])}, 85% of the host memory available):", "",
            "| T | per device | all devices | fits |", "|---:|---:|---:|---|"]
  for r in g["series"]:
    lines.append(f"| {r['t']} | {fb(r['per_device'])} | {fb(r['all_devices'])} | "
                 f"{'yes' if r['fits'] else 'no'} |")
  e = g["executed"]
  lines += ["", f"Executed: ring fwd+bwd at T={e['t']} ({e['layout']}) in {e['seconds']:.1f} s "
                f"(one run), gradients finite: {e['finite']}; longer T compiled only."
            if e else "Executed: none (nothing fitted the execution limit)."]
  d = result["decode"]
  ds = d["shape"]
  lines += ["", f"**Decoding** one token over a {d['cache_len']}-token cache sharded {p} ways "
                f"(B={ds['batch']}, Hq={ds['heads']}, Hkv={ds['kv_heads']}, D={ds['head_dim']}, "
                f"{ds['dtype']}; local attention, then a max and two sums of the float32 partials"
                "; compile only):", "",
            "| per generated token | bytes |", "|---|---:|",
            f"| lse merge, all-reduce payload in the HLO ({_counts(d['measured'])}) | "
            f"{d['measured']['payload_bytes']:,} |",
            f"| lse merge, formula B·Hq·Dv·4 + 2·B·Hq·4 | {d['formula_payload_bytes']:,} |",
            f"| lse merge, sent per device (ring all-reduce, 2(P-1)/P × payload) | "
            f"{d['measured']['bytes_sent_per_device']:,.0f} |",
            f"| rotating the cache instead, per device ((P-1)/P × K,V) | "
            f"{d['rotate_cache_sent_per_device']:,.0f} ({fb(d['rotate_cache_sent_per_device'])}) |"]
  lines += ["", "Targets:", ""]
  lines += [f"- {'met' if x['met'] else 'MISSED'}: {x['name']} — {x['detail']}"
            for x in result["checks"]]
  return "\n".join(lines)


def _with_devices(argv: list[str]) -> int | None:
  """Re-run in a fresh process with the flag when this one has fewer CPU devices (jax was
  initialised before `main` could set it); None when this process has them."""
  if len(jax.devices("cpu")) >= SHARDS:
    return None
  if os.environ.get("LSM_BENCH_CONTEXT_CHILD"):
    raise SystemExit(f"lsm.bench context: {DEVICE_FLAG} did not give {SHARDS} CPU devices")
  flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
  env = dict(os.environ, XLA_FLAGS=flags, LSM_BENCH_CONTEXT_CHILD="1")
  return subprocess.call([sys.executable, "-m", "lsm.bench", "context", *argv], env=env)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m lsm.bench context", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run at tiny sizes in seconds (not for the README table)")
  parser.add_argument("--memory-lengths", type=int, nargs="+",
                      default=[4096, 8192, 16384, 32768, 65536, 131072])
  parser.add_argument("--layout", default="zigzag", choices=LAYOUTS,
                      help="token layout of the longest-T runs (memory: it and contiguous)")
  parser.add_argument("--work-length", type=int, default=32768)
  parser.add_argument("--work-block", type=int, default=512, help="q and kv block size")
  parser.add_argument("--comm-length", type=int, default=8192)
  parser.add_argument("--time-lengths", type=int, nargs="*", default=[4096, 8192, 16384])
  parser.add_argument("--runs", type=int, default=3, help="timed runs per case")
  parser.add_argument("--max-length", type=int, default=1 << 20,
                      help="the doubling series of compiled lengths stops here")
  parser.add_argument("--execute-up-to", type=int, default=32768,
                      help="execute ring fwd+bwd once at the longest fitting T up to this")
  parser.add_argument("--execute-max", action="store_true",
                      help="execute at the longest fitting T (256k takes 20+ minutes on 2 cores)")
  parser.add_argument("--decode-cache", type=int, default=131072, help="cached tokens")
  parser.add_argument("--matmul-n", type=int, default=4096, help="size of the peak matmul")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("benchmarks/README.md"),
                      help="where the tables go (skipped for --quick)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.quick:
    args.memory_lengths, args.max_length = [1024, 2048], 4096
    args.work_length, args.work_block, args.comm_length = 4096, 64, 1024
    args.time_lengths, args.runs, args.matmul_n = [1024], 2, 1024
    args.execute_up_to, args.execute_max, args.decode_cache = 2048, False, 4096
  child = _with_devices(argv)
  if child is not None:
    return child
  with jax.default_device(jax.devices("cpu")[0]):
    result = run(args)
  path = common.write_json(args.out, "context-quick" if args.quick else "context-cpu", result)
  print(f"# wrote {path}")
  if not args.quick:
    common.replace_section(args.readme, "context-cpu", markdown(result))
    print(f"# updated {args.readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
