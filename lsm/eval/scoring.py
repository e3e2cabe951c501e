"""Scoring a model's answers to a synthetic task, teacher-forced: in one forward pass, or decoded
with a KV cache (the prompt prefilled in one call, then one answer token per step).

The answer tokens are those the task's loss mask marks. Each step feeds the true previous token,
and an example counts as exact when every answer token is the argmax — what greedy decoding
produces when the answer is right. The forward pass and decoding with the dense cache give the
same scores; decoding with a fixed-budget policy (`lsm.layers.kv_policies`) shows what the policy
drops.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.decode import cache_policy_of, landmark_layout
from lsm.decode.generate import prefill_call, step_call
from lsm.layers import CACHE_POLICIES
from lsm.train.step import loss_sums, shifted


@dataclasses.dataclass
class Scores:
  """Sums over the examples scored so far."""

  examples: int = 0
  exact: int = 0
  correct: float = 0.0
  count: float = 0.0  # answer tokens
  loss_sum: float = 0.0

  def add(self, examples, exact, correct, count, loss_sum) -> None:
    self.examples += int(examples)
    self.exact += int(exact)
    self.correct += float(correct)
    self.count += float(count)
    self.loss_sum += float(loss_sum)

  def row(self) -> dict:
    """exact match, per-token accuracy and mean NLL of the answer tokens."""
    return {"examples": self.examples, "exact_match": self.exact / max(self.examples, 1),
            "token_accuracy": self.correct / max(self.count, 1.0),
            "loss": self.loss_sum / max(self.count, 1.0)}


# Jitted once per model structure (graphdef) and shapes, shared by every evaluation.


@functools.partial(jax.jit, static_argnums=0)
def _forward_sums(graphdef, state, batch):
  return loss_sums(nnx.merge(graphdef, state), batch)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _init_cache(graphdef, state, batch_size, max_length, policy):
  return nnx.merge(graphdef, state).init_cache(batch_size, max_length, jnp.float32,
                                               policy=policy)


def empty_cache(model: nnx.Module, batch_size: int, max_length: int, policy=None):
  """``model.init_cache`` (float32) built under `jax.jit`: every leaf its own buffer, so the
  decoding steps can donate them all (an eager cache may share one zeros array between
  leaves), and sharded as the current mesh says."""
  graphdef, state = nnx.split(model)
  return _init_cache(graphdef, state, batch_size, max_length, policy)




def _answer_start(weights) -> int:
  """The first answer position, the same in every row (every task puts its answer last)."""
  first = np.argmax(weights > 0, axis=1)
  if not np.all(weights.sum(1) > 0) or np.any(first != first[0]):
    raise ValueError("Scoring: decoding needs the answers to start at one position in every "
                     "example (the synthetic tasks put them last); these batches' do not")
  return int(first[0])


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How answers are scored: ``decode=False`` in one teacher-forced forward pass; ``decode=True``
  by decoding with ``policy`` (one of `lsm.layers.CACHE_POLICIES`; None: each mixer's own cache,
  dense for attention)."""

  decode: bool = False
  policy: object = None

  def __post_init__(self):
    if not isinstance(self.decode, bool):
      raise TypeError(f"Scoring: decode must be a bool, got {self.decode!r}")
    if self.policy is not None and not isinstance(self.policy, CACHE_POLICIES):
      names = ", ".join(p.__name__ for p in CACHE_POLICIES)
      raise TypeError(f"Scoring: policy must be one of {names} or None, got "
                      f"{type(self.policy).__name__}")
    if self.policy is not None and not self.decode:
      raise ValueError(f"Scoring: a cache policy ({self.policy}) needs decode=True")

  @classmethod
  def of_config(cls, config) -> Scoring:
    """The forward pass for ``decode.cache_policy=full``, else decoding with that policy."""
    if config.decode.cache_policy == "full":
      return cls()
    return cls(decode=True, policy=cache_policy_of(config.decode))

  @property
  def name(self) -> str:
    if not self.decode:
      return "forward"
    return "decode (dense cache)" if self.policy is None else f"decode ({self.policy})"

  def __call__(self, model: nnx.Module, batches: list[dict], *, mesh=None) -> Scores:
    """The scores of ``model`` on ``batches`` (rows of ``[B, T + 1]`` tokens); ``mesh``: run
    with it set (context parallelism when it has a ``sequence`` axis)."""
    if self.decode and landmark_layout(model) is not None:
      raise ValueError("Scoring: landmark models keep their own cache and insert landmarks; "
                       "score them with the forward pass (decode.cache_policy=full)")
    graphdef, state = nnx.split(model)
    run = self._decoded if self.decode else self._forward
    if mesh is None:
      return run(graphdef, state, batches)
    with jax.set_mesh(mesh):
      return run(graphdef, state, batches)

  def _forward(self, graphdef, state, batches) -> Scores:
    scores = Scores()
    for batch in batches:
      loss_sum, count, correct, exact = jax.device_get(_forward_sums(graphdef, state, batch))
      scores.add(exact.shape[0], exact.sum(), correct, count, loss_sum)
    return scores

  def _decoded(self, graphdef, state, batches) -> Scores:
    scores = Scores()
    for batch in batches:
      inputs, targets, weights, positions, _ = (np.asarray(x) for x in shifted(batch))
      start = _answer_start(weights)
      stop = int(np.max(np.nonzero(weights.any(0))[0])) + 1  # past the last answer token
      b, length = inputs.shape
      cache = _init_cache(graphdef, state, b, length, self.policy)
      logits, cache = prefill_call(graphdef, state, jnp.asarray(inputs[:, :start + 1]),
                                   jnp.asarray(positions[:, :start + 1]), cache)
      right = np.ones(b, bool)
      correct = loss_sum = 0.0
      for i in range(start, stop):
        if i > start:
          logits, cache = step_call(graphdef, state, jnp.asarray(inputs[:, i]),
                                    jnp.asarray(positions[:, i]), cache)
        logits = np.asarray(logits, np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        answer = weights[:, i] > 0
        ok = np.argmax(logits, axis=-1) == targets[:, i]
        right &= ok | ~answer
        correct += float(np.sum(ok & answer))
        loss_sum -= float(np.sum(np.take_along_axis(logp, targets[:, i, None], 1)[:, 0] * answer))
      scores.add(b, right.sum(), correct, weights[:, start:stop].astype(bool).sum(), loss_sum)
    return scores
