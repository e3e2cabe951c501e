"""Models assembled from a layer pattern of sequence mixers."""

from lsm.models.lm import LM, Block, count_params
from lsm.models.registry import (check_layer_pattern, in_order_mixers, make_mixer, mixer_names,
                                 register_mixer)

__all__ = ["LM", "Block", "count_params", "check_layer_pattern", "in_order_mixers", "make_mixer",
           "mixer_names", "register_mixer"]
