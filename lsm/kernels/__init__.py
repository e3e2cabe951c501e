"""Pure functions on arrays, one folder per op: no Flax, no config."""

from lsm.kernels import attention, scan

__all__ = ["attention", "scan"]
