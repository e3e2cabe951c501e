"""Training: the sharded loop, its step functions, optimizer, checkpoints and reports."""

from lsm.train.loop import RunResult, TrainingStopped, build_model, train

__all__ = ["RunResult", "TrainingStopped", "build_model", "train"]
