"""The attention op: one function every attention-like mixer in lsm is built on."""

from lsm.kernels.attention.api import IMPLEMENTATIONS, attention, default_implementation
from lsm.kernels.attention.landmark import LANDMARK_IMPLEMENTATIONS, landmark_attention
from lsm.kernels.attention.mask import Mask
from lsm.kernels.attention.merge import merge
from lsm.kernels.attention.reference import attention_reference
from lsm.kernels.attention.blocks import BlockSizes, visited_blocks
from lsm.kernels.attention import patterns
from lsm.kernels.attention.patterns import PATTERNS, Density, density, pattern_mask

__all__ = ["IMPLEMENTATIONS", "LANDMARK_IMPLEMENTATIONS", "PATTERNS", "BlockSizes", "Density",
           "Mask", "attention", "attention_reference", "default_implementation", "density",
           "landmark_attention", "merge", "pattern_mask", "patterns", "visited_blocks"]
