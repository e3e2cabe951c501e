"""lsm: long-sequence modeling in JAX."""

from lsm.kernels.attention import BlockSizes, Mask, attention, merge

__version__ = "0.1.0"

__all__ = ["BlockSizes", "Mask", "attention", "merge", "__version__"]
