"""Shared by the evaluation tests: a tiny untrained LM on the synthetic vocabulary, and a scorer
apart from `lsm.eval.scoring` (the training loss sums under `nnx.jit`) to compare evaluators
against."""

import jax
from flax import nnx

from lsm import data as lsm_data
from lsm.config import Config
from lsm.models import LM
from lsm.train.step import loss_sums

LENGTH = 48  # the tiny model's training length


def tiny_config(**model) -> Config:
  """2 layers of attention, d_model 32, trained (by its config) on 3-digit passkeys."""
  return Config.model_validate({
      "model": dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, **model),
      "data": dict(task="passkey", seq_len=LENGTH, task_options=dict(num_digits=3))})


def tiny_model(config: Config) -> LM:
  with nnx.use_eager_sharding(False):
    return LM(config.model, vocab_size=lsm_data.SYNTHETIC_VOCAB_SIZE, rngs=nnx.Rngs(0))


_loss_sums = nnx.jit(loss_sums)


def reference_scores(model, batches) -> dict:
  """exact match, token accuracy and loss of the answers, from `loss_sums` batch by batch."""
  examples = exact = correct = count = loss = 0.0
  for batch in batches:
    loss_sum, n, c, e = jax.device_get(_loss_sums(model, batch))
    examples, exact, correct = examples + e.size, exact + e.sum(), correct + c
    count, loss = count + n, loss + loss_sum
  return {"examples": int(examples), "exact_match": exact / examples,
          "token_accuracy": correct / count, "loss": loss / count}
