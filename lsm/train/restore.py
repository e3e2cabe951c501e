"""Loading a trained model back from its run directory (for generation and evaluation)."""

from __future__ import annotations

import jax
from etils import epath

from lsm import data as lsm_data
from lsm import parallel
from lsm.config import Config, ConfigError, load_config
from lsm.train.checkpoint import Checkpoints
from lsm.train.data import landmark_block_size
from lsm.train.loop import train_state_shardings
from lsm.train.optim import make_optimizer


def vocab_size_of(config: Config) -> int:
  """The model's vocabulary: the config's, else the data's (plus the landmark token, if any)."""
  if config.model.vocab_size:
    return config.model.vocab_size
  landmark = int(landmark_block_size(config) is not None)
  if config.data.task == "text":
    path = None if config.data.tokenizer == "byte" else config.data.tokenizer_path
    return lsm_data.load_tokenizer(path).vocab_size + landmark
  return lsm_data.SYNTHETIC_VOCAB_SIZE + landmark


def mesh_of(config: Config):
  """The mesh of ``config.parallel`` over all devices."""
  return parallel.make_mesh(config.parallel.shape(jax.device_count()))


def load_run(run_dir, overrides: list[str] = ()):
  """(model, config, step) from ``run_dir`` (its ``config.yaml`` and newest readable checkpoint).

  ``overrides`` change the saved config (e.g. ``model.rope.scaling=yarn``); parameters must keep
  their shapes. The model is placed on all local devices, data-parallel (``parallel.*``
  overrides change that: ``parallel.sequence=8`` shards decoding caches over 8 devices; call the
  model under ``jax.set_mesh(mesh_of(config))``).
  """
  run_dir = epath.Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise ConfigError(f"--run {str(run_dir)!r}: no config.yaml there; give the directory a "
                      f"`python -m lsm.train` run wrote (train.output_dir)")
  config = load_config(run_dir / "config.yaml", ["parallel.data=-1", "parallel.fsdp=1",
                                                 "parallel.sequence=1", "parallel.tensor=1",
                                                 *overrides])
  mesh = mesh_of(config)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  fn, abstract_state, _ = train_state_shardings(config, vocab_size_of(config), mesh,
                                                 optimizer)
  checkpoints = Checkpoints(run_dir / "checkpoints", every=1, keep=1, async_save=False)
  restored = checkpoints.restore_latest(abstract_state)
  checkpoints.close()
  if restored is None:
    raise ConfigError(f"--run {str(run_dir)!r}: no readable checkpoint in {run_dir}/checkpoints")
  step, state, _ = restored
  return fn.module(state["params"]), config, step
