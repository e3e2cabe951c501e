"""Flax NNX layers: norms, MLP, embeddings, rotary positions and sequence mixers."""

from lsm.layers.attention import Attention
from lsm.layers.embed import Embed
from lsm.layers.kv_cache import EMPTY_POSITION, DenseKVCache, RingKVCache
from lsm.layers.mlp import SwiGLU
from lsm.layers.norms import RMSNorm
from lsm.layers.params import LOGICAL_AXES, logical_param
from lsm.layers.rope import ROPE_SCALING_KINDS, RopeScaling, apply_rope, rope_frequencies

__all__ = ["Attention", "DenseKVCache", "EMPTY_POSITION", "Embed", "LOGICAL_AXES",
           "ROPE_SCALING_KINDS", "RMSNorm", "RingKVCache", "RopeScaling", "SwiGLU", "apply_rope",
           "logical_param", "rope_frequencies"]
