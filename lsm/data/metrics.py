"""Answer accuracy of next-token predictions on the loss-mask positions (host-side, numpy)."""

from __future__ import annotations

import numpy as np


def answer_accuracy(predictions, tokens, loss_mask) -> dict[str, np.ndarray]:
  """Per-example exact match and token accuracy over the answer (loss-mask) positions.

  Args:
    predictions: [B, T-1] integer token ids; ``predictions[:, i]`` is the model's guess for
      ``tokens[:, i + 1]`` (the argmax of the logits of a model run on ``tokens[:, :-1]``).
    tokens: [B, T] the batch's ``tokens``.
    loss_mask: [B, T] the batch's ``loss_mask``, aligned with ``tokens`` (nonzero = answer).

  Returns:
    ``exact_match`` float32 [B]: 1.0 where every answer token is right, else 0.0;
    ``token_accuracy`` float32 [B]: the fraction of answer tokens that are right;
    ``answer_tokens`` int32 [B]: how many answer tokens each example has. Both accuracies are
    NaN for an example without answer tokens.
  """
  predictions, tokens, loss_mask = (np.asarray(x) for x in (predictions, tokens, loss_mask))
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"answer_accuracy: tokens must have shape [B, T] with T >= 2, got "
                     f"{tokens.shape}")
  b, t = tokens.shape
  if loss_mask.shape != (b, t):
    raise ValueError(f"answer_accuracy: loss_mask must have the shape of tokens {(b, t)}, got "
                     f"{loss_mask.shape}")
  if predictions.shape != (b, t - 1):
    raise ValueError(f"answer_accuracy: predictions must have shape [B, T-1] = {(b, t - 1)} "
                     f"(one guess per target tokens[:, 1:]), got {predictions.shape}")
  for name, array in (("predictions", predictions), ("tokens", tokens)):
    if not np.issubdtype(array.dtype, np.integer):
      raise TypeError(f"answer_accuracy: {name} must hold integer token ids, got {array.dtype}")
  answer = loss_mask[:, 1:] != 0
  correct = (predictions == tokens[:, 1:]) & answer
  answer_tokens = answer.sum(axis=1)
  wrong = (answer & ~correct).any(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    token_accuracy = correct.sum(axis=1) / answer_tokens
  undefined = answer_tokens == 0
  return {"exact_match": np.where(undefined, np.nan, ~wrong).astype(np.float32),
          "token_accuracy": token_accuracy.astype(np.float32),
          "answer_tokens": answer_tokens.astype(np.int32)}
