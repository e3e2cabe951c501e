"""Rotary position embeddings from integer positions, with context-extension scalings.

Dimension pairs are the two halves of the head dim: ``(x[i], x[i + D/2])`` rotates by
``position * theta_i`` with ``theta_i = base ** (-2i / D)``. Scalings (``s = factor``):

- ``"linear"`` (position interpolation): ``theta_i / s``.
- ``"ntk"`` (NTK-aware): the base becomes ``base * s ** (D / (D - 2))``.
- ``"yarn"``: with ``L = original_length`` and ``r_i = L * theta_i / (2 pi)`` rotations of pair
  ``i`` over the original context, ``gamma_i = clip((r_i - beta_slow) / (beta_fast -
  beta_slow), 0, 1)`` and ``theta_i' = (1 - gamma_i) * theta_i / s + gamma_i * theta_i``: high
  frequencies are kept, low ones interpolated, a linear ramp between. The rotated q and k are
  both multiplied by ``0.1 * ln(s) + 1``, so the attention logits get the paper's temperature
  ``(0.1 * ln(s) + 1) ** 2``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lsm.layers import checks

ROPE_SCALING_KINDS = ("none", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary frequencies are stretched for contexts longer than the trained one."""

  kind: str = "none"
  factor: float = 1.0
  original_length: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f"RopeScaling: kind must be one of {ROPE_SCALING_KINDS}, got "
                       f"{self.kind!r}")
    factor = checks.positive_float("RopeScaling", "factor", self.factor)
    if self.kind == "none" and factor != 1.0:
      raise ValueError(f"RopeScaling: factor must be 1.0 with kind='none', got {self.factor!r}; "
                       f"choose kind 'linear', 'ntk' or 'yarn' to scale")
    if factor < 1.0:
      raise ValueError(f"RopeScaling: factor must be >= 1 (a context-extension ratio), got "
                       f"{self.factor!r}")
    original_length = checks.positive_int("RopeScaling", "original_length",
                                          self.original_length, allow_none=True)
    if self.kind == "yarn" and original_length is None:
      raise ValueError("RopeScaling: kind='yarn' needs original_length, the context length the "
                       "model was trained with, got None")
    beta_fast = checks.positive_float("RopeScaling", "beta_fast", self.beta_fast)
    beta_slow = checks.positive_float("RopeScaling", "beta_slow", self.beta_slow)
    if beta_slow >= beta_fast:
      raise ValueError(f"RopeScaling: beta_slow must be < beta_fast, got beta_slow="
                       f"{self.beta_slow!r} and beta_fast={self.beta_fast!r}")
    object.__setattr__(self, "factor", factor)
    object.__setattr__(self, "original_length", original_length)
    object.__setattr__(self, "beta_fast", beta_fast)
    object.__setattr__(self, "beta_slow", beta_slow)

  @property
  def attention_factor(self) -> float:
    """What the rotated q and k are multiplied by: YaRN's ``0.1 ln(s) + 1``, else 1."""
    return 0.1 * math.log(self.factor) + 1.0 if self.kind == "yarn" else 1.0


def rope_frequencies(head_dim: int, base: float = 10000.0,
                     scaling: RopeScaling = RopeScaling()) -> np.ndarray:
  """The angular frequencies ``theta_i`` [head_dim / 2] (float64 numpy) after ``scaling``."""
  head_dim = checks.positive_int("rope_frequencies", "head_dim", head_dim)
  if head_dim % 2:
    raise ValueError(f"rope_frequencies: head_dim must be even (dimensions rotate in pairs), "
                     f"got {head_dim}")
  base = checks.positive_float("rope_frequencies", "base", base)
  if not isinstance(scaling, RopeScaling):
    raise TypeError(f"rope_frequencies: scaling must be a RopeScaling, got "
                    f"{type(scaling).__name__}")
  s = scaling.factor
  if scaling.kind == "ntk":
    if head_dim == 2:
      raise ValueError("rope_frequencies: kind='ntk' scales the base by s ** (D / (D - 2)) and "
                       "needs head_dim > 2, got head_dim=2")
    base = base * s ** (head_dim / (head_dim - 2))
  theta = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling.kind == "linear":
    return theta / s
  if scaling.kind == "yarn":
    rotations = scaling.original_length * theta / (2 * np.pi)
    ramp = np.clip((rotations - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow),
                   0.0, 1.0)
    return (1.0 - ramp) * theta / s + ramp * theta
  return theta


def apply_rope(x, positions, *, base: float = 10000.0, scaling: RopeScaling = RopeScaling()):
  """Rotates x [B, T, H, D] by its integer ``positions`` ([B, T] or [T], any values).

  Angles are computed in float32; the result has x's dtype.
  """
  x = checks.float_array("apply_rope", "x", x, rank=4)
  b, t, _, d = x.shape
  if positions is None:
    raise ValueError("apply_rope: positions must be an integer array [B, T] or [T], got None")
  positions = checks.token_array("apply_rope", "positions", positions, b, t)
  theta = jnp.asarray(rope_frequencies(d, base, scaling), jnp.float32)
  angles_BTK = jnp.asarray(positions, jnp.float32)[..., None] * theta
  cos = jnp.cos(angles_BTK)[:, :, None, :]
  sin = jnp.sin(angles_BTK)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return (rotated * scaling.attention_factor).astype(x.dtype)
