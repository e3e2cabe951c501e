"""Generation: chunked prefill into the mixers' caches, then a jitted decode loop."""

from lsm.decode.generate import Generation, cache_policy_of, generate, landmark_layout
from lsm.decode.sampling import sample

__all__ = ["Generation", "cache_policy_of", "generate", "landmark_layout", "sample"]
