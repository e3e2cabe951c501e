"""``python -m lsm.train --config configs/<name>.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

from lsm.config import ConfigError, load_config


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lsm.train", description="Train (or resume) a long-context LM from a config.",
      epilog="Overrides are dotted keys, e.g. train.steps=200 model.num_layers=4 "
             "'model.layer_pattern=[attention]'. Rerunning the same command resumes from the "
             "newest checkpoint in the run directory.")
  parser.add_argument("--config", help="YAML file under configs/ (default: built-in defaults)")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="# %(message)s")
  try:
    config = load_config(args.config, args.overrides)
    from lsm.train.loop import TrainingStopped, train  # noqa: PLC0415 — jax after the config
    try:
      train(config)
    except TrainingStopped as stopped:
      print(f"error: training stopped: {stopped}", file=sys.stderr)
      return 3
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
