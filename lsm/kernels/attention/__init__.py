"""The attention op: one function every attention-like mixer in lsm is built on."""

from lsm.kernels.attention.api import IMPLEMENTATIONS, attention, default_implementation
from lsm.kernels.attention.mask import Mask
from lsm.kernels.attention.merge import merge
from lsm.kernels.attention.reference import attention_reference
from lsm.kernels.attention.blocks import BlockSizes, visited_blocks

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "Mask", "attention", "attention_reference",
           "default_implementation", "merge", "visited_blocks"]
