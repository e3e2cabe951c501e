"""The jitted pieces of training: loss, the update step with accumulation and a NaN guard, eval.

Parameters travel as a pure dict of arrays (``nnx.to_pure_dict``), so optax and orbax see plain
pytrees; `Functional` turns them back into the model inside the traced functions.

Batches are dicts of [B, T + 1] arrays: ``tokens``, ``loss_mask``, ``segment_ids``,
``positions``. The model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]`` where
``loss_mask[:, 1:]`` is set and the target is in the same document as its input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lsm.parallel.layout import to_layout


@dataclasses.dataclass(frozen=True)
class Functional:
  """A model as (graphdef, abstract params): pure params dict -> module."""

  graphdef: object
  abstract: object  # nnx.State of the params (abstract or not), for the dict structure

  @classmethod
  def of(cls, model: nnx.Module):
    graphdef, params = nnx.split(model, nnx.Param)
    # Shapes only: the real arrays must not be closed over by traced functions.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return cls(graphdef, abstract), nnx.to_pure_dict(params)

  def module(self, params: dict) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.abstract)  # a copy to fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def shifted(batch: dict):
  """(inputs, targets, weights, positions, segment_ids) of a [B, T + 1] batch."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  same_doc = seg[:, 1:] == seg[:, :-1]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32) * same_doc
  return tokens[:, :-1], tokens[:, 1:], weights, batch["positions"][:, :-1], seg[:, :-1]


def loss_sums(model: nnx.Module, batch: dict):
  """(sum of weighted NLL, sum of weights, weighted correct argmax, per-row all-correct)."""
  inputs, targets, weights, positions, segment_ids = shifted(batch)
  # Context parallelism: every per-token array goes into the token layout together (sums over
  # tokens do not change; the model sees true positions).
  layout, shards = model.token_layout(inputs.shape[1])
  inputs, targets, weights, positions, segment_ids = to_layout(
      (inputs, targets, weights, positions, segment_ids), shards, layout)
  logits = model(inputs, positions=positions, segment_ids=segment_ids)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  # A row is "exact" when every weighted target is right (the task's answer, teacher-forced,
  # which equals greedy decoding of the answer when it is right).
  exact = jnp.all((correct == weights) | (weights == 0), axis=-1) & (jnp.sum(weights, -1) > 0)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct), exact


def make_train_step(fn: Functional, optimizer: optax.GradientTransformation, grad_accum: int):
  """``step(state, batch) -> (state, metrics)``; state = dict(step, params, opt_state, skipped,
  skipped_in_a_row). A non-finite loss or gradient skips the update and is counted."""

  def micro(params, batch):
    def objective(params):
      loss_sum, count, correct, _ = loss_sums(fn.module(params), batch)
      return loss_sum, (count, correct)

    (loss_sum, (count, correct)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, loss_sum, count, correct

  def step(state, batch):
    params = state["params"]
    if grad_accum == 1:
      grads, loss_sum, count, correct = micro(params, batch)
    else:
      micro_batches = jax.tree.map(
          lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def body(carry, mb):
        grads, loss_sum, count, correct = micro(params, mb)
        return jax.tree.map(jnp.add, carry, (grads, loss_sum, count, correct)), None

      zeros = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0, 0.0)
      (grads, loss_sum, count, correct), _ = jax.lax.scan(body, zeros, micro_batches)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
    skipped = (~finite).astype(jnp.int32)
    new_state = dict(
        step=state["step"] + 1, params=keep(new_params, params),
        opt_state=keep(new_opt, state["opt_state"]), skipped=state["skipped"] + skipped,
        skipped_in_a_row=jnp.where(finite, 0, state["skipped_in_a_row"] + 1))
    metrics = dict(loss=loss, accuracy=correct / denom, grad_norm=grad_norm,
                   tokens=count, finite=finite)
    return new_state, metrics

  return step


def make_eval_step(fn: Functional):
  """``eval(params, batch) -> dict`` of summed loss, weights, correct and exact-row counts."""

  def evaluate(params, batch):
    loss_sum, count, correct, exact = loss_sums(fn.module(params), batch)
    return dict(loss_sum=loss_sum, count=count, correct=correct,
                exact=jnp.sum(exact), rows=jnp.asarray(exact.shape[0], jnp.float32))

  return evaluate


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> dict:
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
              skipped=jnp.zeros((), jnp.int32), skipped_in_a_row=jnp.zeros((), jnp.int32))
