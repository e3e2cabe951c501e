"""Models assembled from a layer pattern of sequence mixers."""

from flax import nnx

from lsm.models.lm import LM, Block, count_params
from lsm.models.recurrent_memory import RecurrentMemoryCache, RecurrentMemoryLM
from lsm.models.registry import (check_layer_pattern, in_order_mixers, make_mixer, mixer_names,
                                 register_mixer)


def build_model(config, *, vocab_size: int | None = None, rngs: nnx.Rngs) -> nnx.Module:
  """The model a `ModelConfig` describes: a `RecurrentMemoryLM` around the layer pattern when
  ``recurrent_memory.slots > 0``, else an `LM`."""
  if config.recurrent_memory.slots > 0:
    return RecurrentMemoryLM(config, vocab_size=vocab_size, rngs=rngs)
  return LM(config, vocab_size=vocab_size, rngs=rngs)


__all__ = ["LM", "Block", "RecurrentMemoryCache", "RecurrentMemoryLM", "build_model",
           "count_params", "check_layer_pattern", "in_order_mixers", "make_mixer", "mixer_names",
           "register_mixer"]
