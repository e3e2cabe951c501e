"""The `lsm` logger and a log-once helper for choices users should hear about exactly once."""

from __future__ import annotations

import logging

logger = logging.getLogger("lsm")
_said: set[str] = set()


def log_once(message: str, level: int = logging.INFO) -> None:
  """Log ``message`` the first time it is seen in this process."""
  if message not in _said:
    _said.add(message)
    logger.log(level, message)
