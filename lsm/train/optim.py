"""AdamW with linear warm-up and cosine (or constant) decay, and gradient clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
  """Warm-up from 0 over ``opt.warmup_steps`` updates, then cosine to ``min_lr_ratio``."""
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  if opt.schedule == "constant":
    after = optax.constant_schedule(opt.learning_rate)
  else:
    after = optax.cosine_decay_schedule(opt.learning_rate, max(total_steps - warmup, 1),
                                        alpha=opt.min_lr_ratio)
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt.learning_rate, warmup), after], [warmup])


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """``opt``: an `lsm.config.OptimizerConfig`. Weight decay skips 1-D parameters (norm scales)."""
  schedule = learning_rate_schedule(opt, total_steps)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=_decay_mask)
  if opt.grad_clip is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)


def _decay_mask(params):
  # Matrices decay; vectors (norm scales, biases) do not. Stacked layers add a leading axis, so a
  # vector of a stacked block is 2-D: the path names tell them apart.
  def decays(path, p):
    name = str(path[-1]) if path else ""
    return p.ndim >= 2 and "scale" not in name and "bias" not in name

  return jax.tree_util.tree_map_with_path(decays, params)
