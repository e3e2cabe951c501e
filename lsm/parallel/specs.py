"""Small sharding helpers shared by the shard_map entry points of `lsm.parallel`."""

from __future__ import annotations

import math

import jax

from lsm.log import log_once


def divisible_axes(mesh, names, size: int, what: str, owner: str):
  """The mesh axes among ``names`` (present, size > 1) as a spec entry, if their product divides
  ``size``; else None (replicated over them, logged once)."""
  axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
  if axes and size % math.prod(mesh.shape[a] for a in axes):
    log_once(f"{owner}: {what}={size} is not divisible by mesh axes {axes}; replicated over "
             f"them")
    return None
  return (axes[0] if len(axes) == 1 else axes) if axes else None


def resharded(mesh, args, specs):
  """Under a mesh with Explicit axes shard_map takes inputs only as the specs say: reshard them
  (None entries pass through)."""
  explicit = jax.sharding.AxisType.Explicit
  if not any(t == explicit for t in getattr(mesh, "axis_types", ())):
    return args
  return tuple(x if x is None else jax.sharding.reshard(x, spec) for x, spec in zip(args, specs))
