"""Multi-host training on one machine: 2 processes x 4 emulated CPU devices joined by
`jax.distributed` over localhost (what `scripts/tpu_vm/train.sh` starts on every TPU VM worker).
They train, checkpoint, and a rerun of the same command resumes from the checkpoint with the
losses of one uninterrupted 8-device run."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from lsm.config import ConfigError, load_config
from lsm.train import train
from lsm.train.loop import maybe_initialize_distributed

PROCESSES, DEVICES_PER_PROCESS = 2, 4
# A constant learning rate after warm-up, so a run of 4 updates resumed to 6 takes the same
# steps as one run of 6.
TINY = ["name=mp", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=2", "model.mlp_dim=64", "data.task=passkey", "data.seq_len=32",
        "data.batch_size=8", "data.task_options.num_digits=3", "optimizer.schedule=constant",
        "optimizer.warmup_steps=2", "train.log_every=1", "train.eval_batches=1",
        "checkpoint.every=2", "checkpoint.async_save=false"]


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records `jax.distributed.initialize` calls instead of making them."""
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "TPU_ML_PLATFORM"):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


def test_distributed_is_initialized_on_a_tpu_vm_or_with_a_coordinator(initialize_calls,
                                                                       monkeypatch):
  maybe_initialize_distributed()
  assert initialize_calls == []  # one process: nothing to join
  monkeypatch.setenv("TPU_ML_PLATFORM", "JAX")  # what jax's import exports on a Cloud TPU VM
  maybe_initialize_distributed()
  assert initialize_calls == [dict(num_processes=None, process_id=None)]  # jax asks the VM
  monkeypatch.delenv("TPU_ML_PLATFORM")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  maybe_initialize_distributed()
  assert initialize_calls[-1] == dict(num_processes=4, process_id=3)


@pytest.mark.parametrize("env,message", [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an int >= 1, got 'two'"),
    ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID must be an int >= 0, got '-1'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 must be < JAX_NUM_PROCESSES=2"),
])
def test_bad_process_environment_is_named(initialize_calls, monkeypatch, env, message):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ConfigError, match=message):
    maybe_initialize_distributed()
  assert initialize_calls == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(overrides: list[str], work_dir, timeout: float = 240) -> list[str]:
  """Starts ``python -m lsm.train`` once per process (the same command, as on TPU VM workers);
  returns each process's output. A rerun takes its programs from the compilation cache."""
  port = _free_port()
  procs, logs = [], []
  for index in range(PROCESSES):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(work_dir / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(PROCESSES),
               JAX_PROCESS_ID=str(index))
    logs.append(open(work_dir / f"process{index}-port{port}.log", "w+"))
    procs.append(subprocess.Popen([sys.executable, "-m", "lsm.train", *overrides], env=env,
                                  stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for index, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {index} exited {proc.returncode}:\n{out[-4000:]}"
  return outputs


def _steps_saved(run_dir) -> set[int]:
  return {int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()}


def _records(run_dir) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_then_resume_like_one_run(tmp_path):
  run_dir = tmp_path / "mp"
  overrides = [*TINY, f"train.output_dir={run_dir}"]
  first = _run_processes([*overrides, "train.steps=4"], tmp_path)
  for out in first:  # each process saw all 8 devices through jax.distributed
    assert "mesh {'data': 8, 'fsdp': 1, 'sequence': 1, 'tensor': 1}" in out, out[-2000:]
  assert _steps_saved(run_dir) >= {2, 4} and max(_steps_saved(run_dir)) == 4

  second = _run_processes([*overrides, "train.steps=6"], tmp_path)
  for out in second:
    assert f"# resumed from {run_dir / 'checkpoints'} at step 4" in out, out[-2000:]
  assert max(_steps_saved(run_dir)) == 6
  records = _records(run_dir)
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == [1, 2, 3, 4, 5, 6]  # only process 0 logs; the rerun went on from 4
  resumed = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}

  # One process, the same 8 devices (conftest), 6 updates without a restart: the per-process
  # shards make up the same global batches, so the losses agree.
  reference = load_config(None, [*TINY, f"train.output_dir={tmp_path}/one", "train.steps=6"])
  assert train(reference, devices=jax.devices()[:8]).step == 6
  whole = {r["step"]: r["loss"] for r in _records(tmp_path / "one") if r["kind"] == "train"}
  for step in range(1, 7):
    assert abs(resumed[step] - whole[step]) <= 1e-5 * abs(whole[step]), (step, resumed, whole)
