"""Checkpoints of a training run: orbax `CheckpointManager` over train state + data iterator.

Saves are asynchronous (the device-to-host copy happens before `save` returns, so the next step
may donate the buffers), every ``checkpoint.every`` updates, keeping the newest
``checkpoint.keep``. Restoring picks the newest checkpoint that reads back; a partially written
one (orbax's temporary directory, e.g. from a kill -9 during a save) is reported and never loaded,
and a finalised one that fails to read is reported and skipped for the one before it. Restoring
takes the target shardings, so a run can resume on a different mesh. The directory may be a URI
(``gs://bucket/run/checkpoints``); every process of a multi-host run passes the same one.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath

from lsm.config import is_uri
from lsm.log import logger

_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Checkpoints:
  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool):
    directory = epath.Path(directory)
    self.directory = directory if is_uri(directory) else directory.absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves if ``step`` is on the interval (or ``force``); returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state))
    return self.manager.save(step, args=args, force=force)

  def partial_writes(self) -> list[epath.Path]:
    return sorted(p for p in self.directory.glob(f"*{_TMP_SUFFIX}*") if p.is_dir())

  def restore_latest(self, abstract_state):
    """(step, state, data_state) of the newest readable checkpoint, or None.

    ``abstract_state``: the train state's tree of `jax.ShapeDtypeStruct` with shardings.
    """
    for path in self.partial_writes():
      logger.warning("checkpoint: skipping %s, a partially written checkpoint (interrupted save)",
                     path)
    for step in sorted(self.manager.all_steps(), reverse=True):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as error:  # noqa: BLE001 — any unreadable checkpoint is skipped
        logger.warning("checkpoint: step %d in %s cannot be read (%s: %s); trying an older one",
                       step, self.directory, type(error).__name__, str(error)[:200])
        continue
      return step, restored.state, restored.data
    return None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
