"""What a run reports: a console line per interval, a JSONL log and TensorBoard event files.

MFU = model FLOPs per second / the device's matmul peak, measured at start-up on this machine
(a bf16 product on accelerators, float32 on CPU), so the number means the same on every backend.
Model FLOPs per token: 6 x (matmul parameters) for forward + backward, plus the attention score
and value products (``12 x layers x Hq x Dh x visible keys per query``).

The run directory may be a URI (``gs://bucket/run``). Objects in a bucket cannot be appended to,
so there the JSONL log is rewritten whole, at most once a minute and when the run ends.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from etils import epath

from lsm.bench.common import matmul_peak
from lsm.config import is_uri


def train_flops_per_token(model_config, vocab_size: int, seq_len: int) -> float:
  """Forward + backward FLOPs per trained token of the decoder LM."""
  m = model_config
  d, dh = m.d_model, m.resolved_head_dim
  attention_layers = sum(name == "attention" for name in m.layer_pattern) * (
      m.num_layers // len(m.layer_pattern))
  attn_params = d * dh * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp_params = 3 * d * m.resolved_mlp_dim
  matmul_params = m.num_layers * mlp_params + attention_layers * attn_params + d * vocab_size
  window = m.attention.window
  keys = seq_len / 2 if window is None else min(window + 1, seq_len / 2)
  return 6 * matmul_params + 12 * attention_layers * m.num_heads * dh * keys


def device_peak_flops() -> dict:
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  n = 2048 if jax.default_backend() == "cpu" else 8192
  return matmul_peak(dtype, n=n, runs=3)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class JsonlLog:
  """Appends lines to a JSONL file. A file in an object store (``gs://``) cannot be appended to:
  its lines are kept and the file rewritten, at most every ``rewrite_seconds`` and on `close`."""

  def __init__(self, path: str | os.PathLike, *, rewrite_seconds: float = 60.0):
    self.path = epath.Path(path)
    self.rewrite_seconds = rewrite_seconds
    self._remote = is_uri(self.path)
    self._text = self.path.read_text() if self._remote and self.path.exists() else ""
    self._unwritten = False
    self._rewritten_at = time.monotonic()

  def append(self, line: str) -> None:
    if not self._remote:
      with self.path.open("a") as f:
        f.write(line + "\n")
      return
    self._text += line + "\n"
    self._unwritten = True
    if time.monotonic() - self._rewritten_at >= self.rewrite_seconds:
      self.flush()

  def flush(self) -> None:
    if self._unwritten:
      self.path.write_text(self._text)
      self._unwritten = False
      self._rewritten_at = time.monotonic()

  def close(self) -> None:
    self.flush()


class Reporter:
  """Console, JSONL and TensorBoard output of one run (only process 0 writes)."""

  def __init__(self, output_dir: str | os.PathLike, *, total_steps: int,
               flops_per_token: float, peak_flops: float, tensorboard: bool = True):
    output_dir = epath.Path(output_dir)
    self.total_steps = total_steps
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.writes = jax.process_index() == 0
    self.jsonl = output_dir / "metrics.jsonl"
    self.log_file = None
    self.tb = None
    if self.writes:
      output_dir.mkdir(parents=True, exist_ok=True)
      self.log_file = JsonlLog(self.jsonl)
      if tensorboard:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 — optional at import time
        self.tb = SummaryWriter(str(output_dir / "tensorboard"))
    self._last = (time.perf_counter(), None)
    self.started = time.perf_counter()

  def log(self, step: int, kind: str, values: dict, *, tokens: float | None = None,
          steps_done: int | None = None) -> str:
    """Writes one record; returns (and prints, for "train" and "eval") the console line."""
    now = time.perf_counter()
    record = {"step": step, "kind": kind, "time": time.time(), **values}
    if tokens is not None:
      last_time, last_step = self._last
      if last_step is not None and step > last_step:
        rate = tokens / (now - last_time)
        record["tokens_per_s"] = rate
        record["mfu"] = rate * self.flops_per_token / self.peak_flops
        record["eta_s"] = (self.total_steps - step) * (now - last_time) / (step - last_step)
      self._last = (now, step)
    if self.writes:
      self.log_file.append(json.dumps(record))
      if self.tb is not None:
        for key, value in record.items():
          if key not in ("step", "kind", "time") and isinstance(value, (int, float)):
            self.tb.add_scalar(f"{kind}/{key}", value, step)
    line = self.line(record)
    if self.writes:
      print(line, flush=True)
    return line

  def line(self, r: dict) -> str:
    parts = [f"{r['kind']:<5} step {r['step']}/{self.total_steps}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"),
                     ("exact", "exact {:.3f}"), ("learning_rate", "lr {:.2e}"),
                     ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}")):
      if key in r:
        parts.append(fmt.format(r[key]))
    if "eta_s" in r:
      parts.append(f"ETA {_duration(r['eta_s'])}")
    if r.get("skipped"):
      parts.append(f"skipped {r['skipped']}")
    return " | ".join(parts)

  def close(self):
    if self.log_file is not None:
      self.log_file.close()
    if self.tb is not None:
      self.tb.close()
