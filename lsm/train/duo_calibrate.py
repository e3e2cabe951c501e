"""DuoAttention calibration: learn which KV heads need full attention (`lsm.layers.duo`).

Every `DuoAttention` layer gets gates (one ``alpha`` per KV head, ``alpha * full + (1 - alpha) *
streaming``), and only the gates are trained, on

    loss = sum over layers of mean_tokens ||y_gated - y_full||^2  +  l1 * sum |alpha|

with ``y_full`` each layer's own output with every head retrieval, and ``alpha`` projected back to
[0, 1] after every Adam step. Heads whose streaming output differs from full attention keep a
high alpha; the others are pulled to 0 by the l1 term. `lsm.layers.fix_head_types` then turns the
gates into head types::

    history = calibrate(model, passkey_batches(seq_len=1024, batch_size=8, seed=0),
                        steps=200, l1=0.05, lr=0.02)
    tables = fix_head_types(model, retrieval_fraction=0.5)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lsm import data as lsm_data
from lsm.layers.duo import DuoGate, distillation_loss, enable_gates, gate_l1


def passkey_batches(*, seq_len: int, batch_size: int, seed: int,
                    **difficulty) -> Iterator[dict]:
  """Endless batches of passkey examples in the training format: dicts of ``[batch_size,
  seq_len + 1]`` arrays (``tokens``, ``loss_mask``, ``segment_ids``, ``positions``).
  ``difficulty``: `lsm.data.PasskeyTask` knobs (e.g. ``num_digits=5``)."""
  source = lsm_data.synthetic_dataset("passkey", seq_len=seq_len + 1, seed=seed, **difficulty)
  return iter(lsm_data.make_dataset(source, batch_size=batch_size, seed=seed))


def lm_forward(model: nnx.Module, batch) -> None:
  """Runs ``model`` on a batch: a training-format dict (the inputs ``tokens[:, :-1]`` with their
  positions and segment ids) or a ``[B, T]`` token array."""
  if isinstance(batch, dict):
    tokens = jnp.asarray(batch["tokens"])[:, :-1]
    model(tokens, positions=jnp.asarray(batch["positions"])[:, :-1],
          segment_ids=jnp.asarray(batch["segment_ids"])[:, :-1])
  else:
    model(jnp.asarray(batch))


def _number(name: str, value, *, low: float, positive: bool) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
      not math.isfinite(value) or value < low or (positive and value <= low)):
    allowed = "a positive finite number" if positive else f"a finite number >= {low}"
    raise ValueError(f"calibrate: {name} must be {allowed}, got {value!r}")
  return float(value)


def calibrate(model: nnx.Module, batches: Iterable, *, steps: int, l1: float = 0.05,
              lr: float = 0.02, init: float = 1.0, forward: Callable | None = None,
              log_every: int | None = 10, log: Callable[[str], None] = print) -> dict:
  """Trains the gates of every `DuoAttention` of ``model`` in place (nothing else changes).

  Args:
    model: any module holding `DuoAttention` layers (e.g. an `lsm.models.LM`); layers without
      gates get gates of ``init`` (1: start from full attention, as DuoAttention does).
    batches: an iterable of at least ``steps`` batches (e.g. `passkey_batches`).
    steps: Adam steps; l1: weight of ``sum |alpha|``; lr: Adam's learning rate.
    forward: ``forward(model, batch)`` runs the model (default `lm_forward`).
    log_every: a progress line every that many steps (and at the last one); None: quiet.
    log: where progress lines go.

  Returns:
    ``{"loss": [steps], "distillation": [steps]}`` numpy arrays, per step (before its update).
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"calibrate: steps must be a positive int, got {steps!r}")
  l1 = _number("l1", l1, low=0.0, positive=False)
  lr = _number("lr", lr, low=0.0, positive=True)
  if log_every is not None and (isinstance(log_every, bool) or not isinstance(
      log_every, (int, np.integer)) or log_every < 1):
    raise ValueError(f"calibrate: log_every must be a positive int or None, got {log_every!r}")
  forward = lm_forward if forward is None else forward
  if not callable(forward):
    raise TypeError(f"calibrate: forward must be callable as forward(model, batch), got "
                    f"{type(forward).__name__}")
  if not isinstance(batches, Iterable):
    raise TypeError(f"calibrate: batches must be an iterable of batches, got "
                    f"{type(batches).__name__}")
  layers = enable_gates(model, init=init)
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(nnx.to_pure_dict(nnx.state(model, DuoGate)))

  @nnx.jit
  def step(model, opt_state, batch):
    def objective(model):
      forward(model, batch)
      distillation = distillation_loss(model)
      return distillation + l1 * gate_l1(model), distillation

    (loss, distillation), grads = nnx.value_and_grad(
        objective, argnums=nnx.DiffState(0, DuoGate), has_aux=True)(model)
    gates = nnx.state(model, DuoGate)
    alphas = nnx.to_pure_dict(gates)
    updates, opt_state = optimizer.update(nnx.to_pure_dict(grads), opt_state, alphas)
    alphas = jax.tree.map(lambda a: jnp.clip(a, 0.0, 1.0), optax.apply_updates(alphas, updates))
    nnx.replace_by_pure_dict(gates, alphas)
    nnx.update(model, gates)
    return loss, distillation, opt_state

  losses, distillations = [], []
  start = time.perf_counter()
  batch_iterator = iter(batches)
  for i in range(steps):
    batch = next(batch_iterator, None)
    if batch is None:
      raise ValueError(f"calibrate: batches ran out after {i} of steps={steps} batches")
    loss, distillation, opt_state = step(model, opt_state, batch)
    losses.append(loss)
    distillations.append(distillation)
    if log_every is not None and ((i + 1) % log_every == 0 or i + 1 == steps):
      alphas = np.concatenate([np.ravel(a) for a in jax.tree.leaves(
          nnx.to_pure_dict(nnx.state(model, DuoGate)))])
      log(f"duo calibrate step {i + 1}/{steps}: loss {float(loss):.4g} distillation "
          f"{float(distillation):.4g} alpha mean {alphas.mean():.3f} min {alphas.min():.3f} "
          f"max {alphas.max():.3f} ({layers} layers, {time.perf_counter() - start:.1f}s)")
  return {"loss": np.asarray(losses, np.float64),
          "distillation": np.asarray(distillations, np.float64)}

