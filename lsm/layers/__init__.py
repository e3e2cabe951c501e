"""Flax NNX layers: norms, MLP, embeddings, rotary positions and sequence mixers."""

from lsm.layers.attention import CACHE_POLICIES, Attention
from lsm.layers.block_memory import BlockMemoryKVCache, BlockMemoryPolicy
from lsm.layers.duo import (HEAD_TYPES, DuoAttention, DuoCache, DuoDistillation, DuoGate,
                            enable_gates, fix_head_types)
from lsm.layers.embed import Embed
from lsm.layers.kv_cache import EMPTY_POSITION, DenseKVCache, RingKVCache
from lsm.layers.landmark import LANDMARK_POSITION_MODES, LandmarkAttention, LandmarkCache
from lsm.layers.mamba import GatedRMSNorm, Mamba, Mamba2, SSMCache
from lsm.layers.mlp import SwiGLU
from lsm.layers.kv_policies import (BlockSelectPolicy, HeavyHitterPolicy, ScoredKVCache,
                                    SelectKVCache, SinkWindowPolicy, SnapKVPolicy)
from lsm.layers.norms import RMSNorm
from lsm.layers.params import LOGICAL_AXES, logical_param
from lsm.layers.rope import ROPE_SCALING_KINDS, RopeScaling, apply_rope, rope_frequencies
from lsm.layers.s4 import S4, S4D, S4Cache
from lsm.layers.sparse import SparseAttention

__all__ = ["CACHE_POLICIES", "BlockSelectPolicy", "HeavyHitterPolicy", "ScoredKVCache",
           "SelectKVCache", "SinkWindowPolicy", "SnapKVPolicy", "Attention", "BlockMemoryKVCache", "BlockMemoryPolicy", "DenseKVCache",
           "EMPTY_POSITION", "Embed", "GatedRMSNorm", "LANDMARK_POSITION_MODES", "LOGICAL_AXES",
           "LandmarkAttention", "LandmarkCache", "Mamba", "Mamba2", "ROPE_SCALING_KINDS",
           "RMSNorm", "RingKVCache", "RopeScaling", "S4", "S4Cache", "S4D",
           "SSMCache", "SparseAttention", "SwiGLU", "apply_rope", "logical_param",
           "rope_frequencies"]
__all__ += ["HEAD_TYPES", "DuoAttention", "DuoCache", "DuoDistillation", "DuoGate",
            "enable_gates", "fix_head_types"]
