"""Shared benchmark machinery: machine facts, the matmul peak, timing, memory, results files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def machine() -> dict:
  """What the numbers were measured on."""
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  names = [line.split(":", 1)[1].strip() for line in
           (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
           if line.startswith("model name")]
  cpu = names[0] if names else cpu
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu": cpu,
      "cpu_cores": os.cpu_count(),
      "memory_gib": round(available_memory_bytes(total=True) / 2**30, 1),
      "jax": jax.__version__,
      "python": platform.python_version(),
  }


def available_memory_bytes(total: bool = False) -> int:
  """Host memory available now (or in total), from /proc/meminfo; on an accelerator, its memory."""
  stats = jax.devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - (0 if total else stats.get("bytes_in_use", 0)))
  key = "MemTotal:" if total else "MemAvailable:"
  for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
    if line.startswith(key):
      return int(line.split()[1]) * 1024
  raise RuntimeError("cannot read /proc/meminfo")


@dataclasses.dataclass
class Timing:
  median_s: float
  runs_s: list[float]
  warmup: int


def time_compiled(fn: Callable, args: Sequence, *, warmup: int, runs: int) -> Timing:
  """Median wall time of an already compiled function, synchronised before every clock read."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), times, warmup)


def compile_with_memory(fn: Callable, args: Sequence):
  """AOT-compile (so compile time is never timed) and return (compiled, planned peak bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  peak = None
  if stats is not None:
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
            stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return compiled, peak


def matmul_peak(dtype, n: int = 4096, runs: int = 5) -> dict:
  """The machine's measured matmul rate: median of ``runs`` [n, n] x [n, n] products."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  compiled, _ = compile_with_memory(lambda x, y: x @ y, (a, b))
  timing = time_compiled(compiled, (a, b), warmup=2, runs=runs)
  return {"dtype": jnp.dtype(dtype).name, "n": n, "median_s": timing.median_s,
          "flops_per_s": 2 * n**3 / timing.median_s}


def write_json(out_dir: pathlib.Path, name: str, payload: dict) -> pathlib.Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path = out_dir / f"{name}-{stamp}.json"
  path.write_text(json.dumps(payload, indent=1) + "\n")
  return path


def replace_section(path: pathlib.Path, marker: str, body: str) -> None:
  """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` (or append)."""
  start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
  text = path.read_text() if path.exists() else ""
  block = f"{start}\n{body.rstrip()}\n{end}"
  if start in text and end in text:
    head, rest = text.split(start, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
  path.write_text(text)


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "-"
  if n >= 2**30:
    return f"{n / 2**30:.2f} GiB"
  return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
