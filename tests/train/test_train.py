"""The training loop: it learns, shards without changing the numbers, resumes exactly after
kill -9 and SIGTERM, restores onto another mesh, skips bad checkpoints, and stops on NaNs."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.config import load_config
from lsm.train import TrainingStopped, build_model, train
from lsm.train import data as train_data
from lsm.train.optim import make_optimizer
from lsm.train.step import Functional, init_train_state, make_train_step

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "data.seq_len=32", "data.batch_size=8",
        "data.task_options.num_digits=3", "optimizer.warmup_steps=2", "train.log_every=1",
        "train.eval_batches=1", "checkpoint.every=2", "checkpoint.async_save=false"]


def _config(tmp_path, name, *overrides):
  return load_config(None, [f"name={name}", f"train.output_dir={tmp_path}/{{name}}", *TINY,
                            *overrides])


def _losses(run_dir):
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_overfits_a_tiny_batch():
  config = _config("/tmp", "overfit", "optimizer.learning_rate=1e-2", "optimizer.weight_decay=0")
  data = train_data.build(config)
  batch = jax.tree.map(jnp.asarray, next(data.iterator))
  fn, params = Functional.of(build_model(config, data.vocab_size, 0))
  optimizer = make_optimizer(config.optimizer, 150)
  step = jax.jit(make_train_step(fn, optimizer, grad_accum=1))
  state = init_train_state(params, optimizer)
  first = None
  for _ in range(150):
    state, metrics = step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.05 * first
  assert float(metrics["accuracy"]) == 1.0


def test_gradient_accumulation_equals_one_big_batch():
  config = _config("/tmp", "accum")
  data = train_data.build(config)
  batch = jax.tree.map(jnp.asarray, next(data.iterator))
  fn, params = Functional.of(build_model(config, data.vocab_size, 0))
  optimizer = make_optimizer(config.optimizer, 10)
  results = [jax.jit(make_train_step(fn, optimizer, grad_accum=a))(
      init_train_state(params, optimizer), batch) for a in (1, 4)]
  np.testing.assert_allclose(float(results[0][1]["loss"]), float(results[1][1]["loss"]),
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][0]["params"]),
                  jax.tree.leaves(results[1][0]["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axes", [
    ["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"],
    ["parallel.data=2", "parallel.sequence=2", "parallel.tensor=2"],  # ring attention, zigzag
])
def test_sharded_run_matches_one_device(tmp_path, axes):
  """data x fsdp x tensor, or data x sequence x tensor, on 8 emulated devices: the same losses
  (train and eval) as one device."""
  steps = ["train.steps=4", "checkpoint.enabled=false", "train.eval_every=2",
           "model.attention.implementation=xla"]
  one = _config(tmp_path, "one", *steps, "parallel.data=1")
  train(one, devices=jax.devices()[:1])
  mesh = _config(tmp_path, "mesh", *steps, *axes)
  train(mesh)
  a, b = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
  evals = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text()
            .splitlines() if json.loads(line)["kind"] == "eval"] for run in ("one", "mesh")]
  assert len(evals[0]) == len(evals[1]) >= 2
  for x, y in zip(*evals):
    assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)


def _subprocess_env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _start(config_overrides):
  return subprocess.Popen([sys.executable, "-u", "-m", "lsm.train", *config_overrides],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_subprocess_env())


def _run_until(process, marker):
  seen = []
  for line in process.stdout:
    seen.append(line)
    if marker in line:
      return "".join(seen)
  process.wait()
  raise AssertionError(f"process ended before {marker!r}:\n{''.join(seen)}")


def _overrides(tmp_path, name, *extra):
  return [f"name={name}", f"train.output_dir={tmp_path}/{{name}}", *TINY, *extra]


def test_kill_9_then_rerun_resumes_with_the_same_losses(tmp_path):
  steps = "train.steps=8"
  whole = _config(tmp_path, "whole", steps)
  train(whole, devices=jax.devices()[:1])
  process = _start(_overrides(tmp_path, "killed", steps))
  _run_until(process, "step 5/8")
  process.send_signal(signal.SIGKILL)
  process.wait()
  done_before = max(_losses(tmp_path / "killed"))
  assert done_before < 8
  resumed = train(_config(tmp_path, "killed", steps), devices=jax.devices()[:1])
  assert resumed.step == 8
  a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
  for step in range(1, 9):  # the rerun's lines come last in the log, so b holds the resumed ones
    assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  process = _start(_overrides(tmp_path, "term", "train.steps=400", "checkpoint.every=1000"))
  _run_until(process, "step 3/400")
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  assert "SIGTERM: saving step" in output
  saved = sorted(int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved and 3 <= saved[-1] < 400


def test_restore_onto_another_mesh(tmp_path):
  """Four updates on 8-way data parallelism, two more on data=2 x fsdp=2 x tensor=2: the same
  losses as six updates on the first mesh."""
  base = ["parallel.data=8"]
  train(_config(tmp_path, "same", "train.steps=6", *base))
  train(_config(tmp_path, "moved", "train.steps=6", *base), max_steps_this_run=4)
  result = train(_config(tmp_path, "moved", "train.steps=6", "parallel.data=2",
                         "parallel.fsdp=2", "parallel.tensor=2"))
  assert result.step == 6
  a, b = _losses(tmp_path / "same"), _losses(tmp_path / "moved")
  for step in (5, 6):
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_partial_and_unreadable_checkpoints_are_skipped(tmp_path, caplog):
  config = _config(tmp_path, "bad", "train.steps=4")
  train(config, devices=jax.devices()[:1])
  ckpt_dir = tmp_path / "bad" / "checkpoints"
  # A save interrupted by kill -9 leaves orbax's temporary directory behind ...
  (ckpt_dir / "6.orbax-checkpoint-tmp-1234").mkdir()
  # ... and the newest finalised checkpoint loses its files.
  for path in sorted((ckpt_dir / "4").rglob("*"), reverse=True):
    if path.is_file():
      path.unlink()
  with caplog.at_level("WARNING", logger="lsm"):
    result = train(_config(tmp_path, "bad", "train.steps=5"), devices=jax.devices()[:1])
  said = caplog.text
  assert "partially written checkpoint" in said and "cannot be read" in said
  assert result.step == 5
  losses = _losses(tmp_path / "bad")
  assert 3 in losses and 5 in losses  # resumed from step 2: steps 3.. ran again


def test_non_finite_losses_stop_the_run(tmp_path):
  config = _config(tmp_path, "nan", "train.steps=20", "optimizer.learning_rate=1e30",
                   "optimizer.grad_clip=null", "optimizer.warmup_steps=0",
                   "train.max_nonfinite=3", "checkpoint.enabled=false")
  with pytest.raises(TrainingStopped, match=r"3 updates in a row had a non-finite loss"):
    train(config, devices=jax.devices()[:1])


def test_built_model_is_what_train_trains():
  config = _config("/tmp", "built")
  model = build_model(config, 64, 0)
  assert isinstance(model, nnx.Module)
  assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 64)


def test_text_lm_config_trains_on_the_sample_text(tmp_path):
  config = load_config("configs/text_lm.yaml", [
      f"train.output_dir={tmp_path}/{{name}}", "train.steps=3", "train.log_every=1",
      "data.seq_len=64", "data.batch_size=4", "model.num_layers=2", "checkpoint.enabled=false",
      "train.eval_batches=1"])
  result = train(config, devices=jax.devices()[:1])
  losses = _losses(tmp_path / "text_lm")
  assert result.step == 3 and sorted(losses) == [1, 2, 3]
  assert all(np.isfinite(v) for v in losses.values())
  assert np.isfinite(result.final_eval["loss"])


def test_tpu_config_is_consistent_on_an_emulated_mesh():
  """The ~1B / 32k config, built abstractly (no memory) and sharded FSDP over 8 devices: every
  large parameter and its Adam moments are split, and the train step lowers."""
  from lsm import parallel  # noqa: PLC0415
  from lsm.train.loop import train_state_shardings  # noqa: PLC0415
  config = load_config("configs/tpu_1b_32k.yaml", ["parallel.fsdp=8"])
  mesh = parallel.make_mesh(config.parallel.shape(8))
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  fn, abstract_state, shardings = train_state_shardings(config, config.model.vocab_size, mesh,
                                                        optimizer)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  assert 0.8e9 < n_params < 1.3e9
  for x in jax.tree.leaves(abstract_state["params"]) + jax.tree.leaves(
      abstract_state["opt_state"]):
    if x.size >= 2**20:
      assert "fsdp" in str(x.sharding.spec), (x.shape, x.sharding.spec)
  batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1),
                                   jnp.float32 if k == "loss_mask" else jnp.int32,
                                   sharding=parallel.data_sharding(mesh))
           for k in ("tokens", "loss_mask", "segment_ids", "positions")}
  step = jax.jit(make_train_step(fn, optimizer, config.train.grad_accum),
                 out_shardings=(shardings, None))
  lowered = step.lower(abstract_state, batch)
  assert "while" in lowered.as_text()[:10**7]  # the scanned layers


def test_profiler_window_writes_a_trace(tmp_path):
  config = _config(tmp_path, "prof", "train.steps=3", "train.profile_steps=[1, 2]",
                   "checkpoint.enabled=false")
  train(config, devices=jax.devices()[:1])
  traces = list((tmp_path / "prof" / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_batch_not_divisible_by_the_data_devices_is_a_config_error(tmp_path):
  from lsm.config import ConfigError
  config = _config(tmp_path, "indivisible", "data.batch_size=4")
  with pytest.raises(ConfigError, match="data.batch_size=4 must be divisible by the devices "
                                        "sharing the batch: data=8 x fsdp=1"):
    train(config)
