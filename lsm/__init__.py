"""lsm: long-sequence modeling in JAX."""

from lsm.xla_workarounds import apply_ynn_workaround

apply_ynn_workaround()  # Before any backend starts; see lsm/xla_workarounds.py.

from lsm.kernels.attention import BlockSizes, Mask, attention, merge  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BlockSizes", "Mask", "attention", "merge", "__version__"]
