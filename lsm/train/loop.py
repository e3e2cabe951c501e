"""`train(config)`: the sharded training loop behind ``python -m lsm.train``.

Start-up: mesh from ``parallel``, data, parameters born sharded (initialised inside a jit whose
outputs carry the mesh shardings), the newest readable checkpoint restored if the run directory
has one (so rerunning the same command resumes). Each update is one jitted step with donated
state. SIGTERM (preemption) saves and exits cleanly; ``train.max_nonfinite`` skipped updates in a
row stop the run with a message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import jax
import numpy as np
from flax import nnx

from lsm import models, parallel
from lsm.config import Config, ConfigError, to_yaml
from lsm.log import logger
from lsm.models import check_layer_pattern, in_order_mixers
from lsm.train import data as train_data
from lsm.train.checkpoint import Checkpoints
from lsm.train.metrics import Reporter, device_peak_flops, train_flops_per_token
from lsm.train.optim import learning_rate_schedule, make_optimizer
from lsm.train.step import Functional, init_train_state, make_eval_step, make_train_step


class TrainingStopped(RuntimeError):
  """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclasses.dataclass
class RunResult:
  step: int
  checkpoint_dir: str
  log_file: str
  final_eval: dict
  preempted: bool


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when this process is one of several; nothing otherwise.

  On a Cloud TPU VM (jax's import-time TPU set-up exports ``TPU_ML_PLATFORM``), under GKE
  (``TPU_WORKER_HOSTNAMES``) and SLURM, jax finds the coordinator, process count and id itself.
  Elsewhere (several processes on one machine, plain VMs) set ``JAX_COORDINATOR_ADDRESS``
  (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
  """
  cluster_markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS")
  on_cloud_tpu_vm = os.environ.get("TPU_ML_PLATFORM") == "JAX"
  if jax.distributed.is_initialized() or not (
      on_cloud_tpu_vm or any(os.environ.get(k) for k in cluster_markers)):
    return
  num_processes = _env_int("JAX_NUM_PROCESSES", low=1)
  process_id = _env_int("JAX_PROCESS_ID", low=0)
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise ConfigError(f"JAX_PROCESS_ID={process_id} must be < JAX_NUM_PROCESSES={num_processes}")
  jax.distributed.initialize(num_processes=num_processes, process_id=process_id)


def _env_int(name: str, *, low: int) -> int | None:
  """The int in environment variable ``name`` (None when unset)."""
  raw = os.environ.get(name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < low:
    raise ConfigError(f"environment variable {name} must be an int >= {low}, got {raw!r}")
  return value


def build_model(config: Config, vocab_size: int, seed: int) -> nnx.Module:
  """The model of ``config.model`` (`lsm.models.build_model`), parameters not yet sharded."""
  with nnx.use_eager_sharding(False):
    return models.build_model(config.model, vocab_size=vocab_size, rngs=nnx.Rngs(seed))


def train_state_shardings(config: Config, vocab_size: int, mesh, optimizer):
  """(Functional, abstract train state with shardings, the state's shardings)."""
  abstract_model = nnx.eval_shape(lambda: build_model(config, vocab_size, config.train.seed))
  fn, _ = Functional.of(abstract_model)
  _, params_state = nnx.split(abstract_model, nnx.Param)
  shardings = nnx.to_pure_dict(parallel.state_shardings(params_state, mesh))
  abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.to_pure_dict(params_state), shardings)
  init = jax.jit(lambda p: init_train_state(p, optimizer))
  abstract_state = jax.eval_shape(init, abstract_params)
  state_shardings = dict(
      jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state),
      params=shardings, opt_state=_like_params(abstract_state["opt_state"], shardings, mesh))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_shardings)
  return fn, abstract_state, state_shardings


def _path_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _like_params(opt_state, param_shardings, mesh):
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path (Adam's
  moments, ...) is sharded like that parameter; anything else (step counts) is replicated."""
  by_path = {_path_names(path): s for path, s in
             jax.tree_util.tree_leaves_with_path(param_shardings)}
  longest = max(map(len, by_path), default=0)

  def one(path, leaf):
    names = _path_names(path)
    for n in range(min(longest, len(names)), 0, -1):
      sharding = by_path.get(names[-n:])
      if sharding is not None and len(sharding.spec) <= leaf.ndim:
        return sharding
    return parallel.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_state)


def _evaluate(eval_step, params, batches, mesh) -> dict:
  totals = {}
  for batch in batches:
    out = jax.device_get(eval_step(params, parallel.host_batch_to_global(batch, mesh)))
    for key, value in out.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  count = max(totals.get("count", 0.0), 1.0)
  return {"loss": totals.get("loss_sum", 0.0) / count,
          "accuracy": totals.get("correct", 0.0) / count,
          "exact": totals.get("exact", 0.0) / max(totals.get("rows", 0.0), 1.0)}


def train(config: Config, *, max_steps_this_run: int | None = None,
          devices=None) -> RunResult:
  """Trains (or resumes) the run described by ``config``.

  ``max_steps_this_run`` stops after that many updates (a checkpoint is written); ``devices``
  (default: all) are the devices the mesh spans.
  """
  maybe_initialize_distributed()
  check_layer_pattern_or_raise(config)
  devices = jax.devices() if devices is None else list(devices)
  shape = config.parallel.shape(len(devices))
  if config.data.batch_size % (shape["data"] * shape["fsdp"]):
    raise ConfigError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                      f"devices sharing the batch: data={shape['data']} x fsdp={shape['fsdp']} "
                      f"(of {len(devices)} devices)")
  mesh = parallel.make_mesh(shape, devices)
  out_dir = config.output_dir
  data = train_data.build(config, shard_index=jax.process_index(),
                          shard_count=jax.process_count())
  vocab_size = config.model.vocab_size or data.vocab_size
  total = config.train.steps
  optimizer = make_optimizer(config.optimizer, total)
  schedule = learning_rate_schedule(config.optimizer, total)
  fn, abstract_state, state_shardings = train_state_shardings(config, vocab_size, mesh,
                                                               optimizer)

  ckpt = None
  if config.checkpoint.enabled:
    ckpt = Checkpoints(out_dir / "checkpoints", every=config.checkpoint.every,
                       keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(abstract_state) if ckpt else None
  if restored is not None:
    start, state, data_state = restored
    data.iterator.set_state(data_state)
    logger.info("resumed from %s at step %d", ckpt.directory, start)
    print(f"# resumed from {ckpt.directory} at step {start}", flush=True)
  else:
    @jax.jit
    def init():
      model = build_model(config, vocab_size, config.train.seed)
      return init_train_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer)

    state = jax.jit(init, out_shardings=state_shardings)()
    start = 0

  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(config))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
  peak = device_peak_flops()
  reporter = Reporter(out_dir, total_steps=total, peak_flops=peak["flops_per_s"],
                      flops_per_token=train_flops_per_token(config.model, vocab_size,
                                                            config.data.seq_len))
  print(f"# {config.name}: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
        f"{config.data.batch_size} x {config.data.seq_len} tokens per update, "
        f"{total} updates; logs in {out_dir}", flush=True)

  batch_sharding = parallel.data_sharding(mesh, 2, config.data.seq_len + 1)
  # Called with the mesh set: layers find it for context parallelism.
  step_fn = parallel.in_mesh(mesh, jax.jit(
      make_train_step(fn, optimizer, config.train.grad_accum),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0))
  eval_fn = parallel.in_mesh(mesh, jax.jit(
      make_eval_step(fn), in_shardings=(state_shardings["params"], batch_sharding)))

  preempted = {"flag": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  step, tracing = start, False
  try:
    pending = []
    stop_at = total if max_steps_this_run is None else min(total, start + max_steps_this_run)
    profile, tracing = config.train.profile_steps, False
    while step < stop_at:
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(out_dir / "profile"))
        tracing = True
      if tracing and step == profile[1]:
        jax.profiler.stop_trace()
        tracing = False
        print(f"# profile of steps {profile[0]}..{profile[1] - 1} in {out_dir / 'profile'}")
      batch = parallel.host_batch_to_global(next(data.iterator), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append(metrics)
      if ckpt:
        ckpt.save(step, state, data.iterator.get_state())
      if step % config.train.log_every == 0 or step == stop_at:
        host = jax.device_get(pending)
        tokens = len(host) * config.data.batch_size * config.data.seq_len
        skipped_in_a_row = int(jax.device_get(state["skipped_in_a_row"]))
        reporter.log(step, "train", {
            "loss": float(np.mean([m["loss"] for m in host if m["finite"]] or [np.nan])),
            "accuracy": float(np.mean([m["accuracy"] for m in host if m["finite"]] or [0.0])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
            "learning_rate": float(schedule(step)),
            "skipped": int(jax.device_get(state["skipped"]))}, tokens=tokens)
        pending = []
        if skipped_in_a_row >= config.train.max_nonfinite:
          raise TrainingStopped(
              f"{skipped_in_a_row} updates in a row had a non-finite loss or gradient "
              f"(train.max_nonfinite={config.train.max_nonfinite}); the last good state is in "
              f"the checkpoints. Lower optimizer.learning_rate or check the data.")
      if config.train.eval_every and step % config.train.eval_every == 0 and step < total:
        reporter.log(step, "eval", _evaluate(eval_fn, state["params"], data.eval_batches, mesh))
      if preempted["flag"]:
        print(f"# SIGTERM: saving step {step} and exiting", flush=True)
        break
    final_eval = {}
    if step == total:
      final_eval = _evaluate(eval_fn, state["params"], data.eval_batches, mesh)
      reporter.log(step, "eval", final_eval)
    if ckpt and ckpt.latest_step() != step:
      ckpt.save(step, state, data.iterator.get_state(), force=True)
  finally:
    if tracing:
      jax.profiler.stop_trace()
    signal.signal(signal.SIGTERM, previous)
    reporter.close()
    if ckpt:
      ckpt.wait()
  where = ckpt.directory if ckpt else "(checkpoints disabled)"
  print(f"# checkpoint: {where}\n# logs: {reporter.jsonl} and {out_dir / 'tensorboard'}",
        flush=True)
  return RunResult(step=step, checkpoint_dir=str(where), log_file=str(reporter.jsonl),
                   final_eval=final_eval, preempted=preempted["flag"])


def check_layer_pattern_or_raise(config: Config) -> None:
  try:
    check_layer_pattern(config.model.layer_pattern)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  scans = in_order_mixers(config.model.layer_pattern)
  layout = config.model.attention.context_parallel.layout
  if scans and config.parallel.sequence > 1 and layout != "contiguous":
    raise ConfigError(f"model.layer_pattern has mixers that scan their tokens in order "
                      f"({', '.join(scans)}); with parallel.sequence={config.parallel.sequence} "
                      f"set model.attention.context_parallel.layout=contiguous, got {layout!r}")
  memory = config.model.recurrent_memory
  if memory.slots and config.parallel.sequence > 1:
    raise ConfigError(f"model.recurrent_memory.slots={memory.slots} runs segments in order and "
                      f"cannot shard the sequence; set parallel.sequence=1, got "
                      f"{config.parallel.sequence}")
  if memory.slots and config.data.seq_len % memory.segment_length:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be a multiple of "
                      f"model.recurrent_memory.segment_length={memory.segment_length} when "
                      f"model.recurrent_memory.slots > 0")

