"""The device mesh, the logical-axis rules table, and shardings derived from them.

Axes ``("data", "fsdp", "sequence", "tensor")``; any may have size 1. Parameters and activations
name their dimensions logically (``batch, length, embed, heads, kv_heads, head_dim, mlp, vocab,
state, layers``) and `RULES` — the one table — maps each name to mesh axes. A dimension the mesh
axes do not divide is replicated instead (logged once).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lsm.log import log_once

AXES = ("data", "fsdp", "sequence", "tensor")

RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": None,
    "state": None,
    "conv": None,
    "rank": None,
    "layers": None,
}


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with axes `AXES` of the given sizes (Auto axis types: jit propagates shardings)."""
  sizes = tuple(shape[a] for a in AXES)
  devices = jax.devices() if devices is None else devices
  if math.prod(sizes) != len(devices):
    raise ValueError(f"make_mesh: axis sizes {dict(zip(AXES, sizes))} need {math.prod(sizes)} "
                     f"devices, {len(devices)} available")
  return jax.make_mesh(sizes, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def logical_to_spec(names, shape, mesh: jax.sharding.Mesh, *, what: str = "") -> PartitionSpec:
  """PartitionSpec for a value whose dimensions carry logical ``names``."""
  if names is None:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f"{what}: logical axes {names} do not match shape {shape}")
  used, spec = set(), []
  for name, size in zip(names, shape):
    if name is not None and name not in RULES:
      raise ValueError(f"{what}: unknown logical axis {name!r}; known: {', '.join(RULES)}")
    axes = tuple(a for a in (RULES.get(name) or ()) if mesh.shape[a] > 1 and a not in used)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
      log_once(f"sharding: {what} dimension {name}={size} is not divisible by mesh axes {axes} "
               f"({math.prod(mesh.shape[a] for a in axes)}); replicated instead")
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh):
  """The nnx ``state`` with every Variable's value replaced by its NamedSharding, from the
  logical axis names the Variable carries (``out_sharding`` metadata); works on abstract states
  from `nnx.eval_shape`. `nnx.to_pure_dict` of the result is a plain tree of shardings."""
  from flax import nnx  # noqa: PLC0415 — keeps the rest of this module free of flax

  def one(path, variable):
    names = getattr(variable, "out_sharding", None)
    where = "/".join(str(p) for p in path)
    return variable.replace(NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh,
                                                                what=where)))

  return jax.tree_util.tree_map_with_path(one, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def data_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, length: int | None = None
                  ) -> NamedSharding:
  """[batch, length, ...] arrays: batch over data x fsdp, length over sequence — unless
  ``length`` is given and the sequence axis does not divide it (training batches hold T + 1
  tokens): then the length is replicated and the model shards its activations itself."""
  batch = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None
  seq = tuple(a for a in RULES["length"] if mesh.shape[a] > 1) or None
  if seq and length is not None and length % math.prod(mesh.shape[a] for a in seq):
    seq = None
  return NamedSharding(mesh, PartitionSpec(batch, seq, *([None] * (ndim - 2))))


def activation_spec(mesh, shape, names=("batch", "length", None)) -> PartitionSpec:
  """The PartitionSpec of an activation with logical ``names`` under ``mesh`` (abstract too)."""
  return logical_to_spec(names, shape, mesh, what="activation")


def in_mesh(mesh, fn):
  """``fn`` called with ``mesh`` set (``jax.set_mesh``): layers find it with
  ``get_abstract_mesh`` (context parallelism over its ``sequence`` axis). Model construction
  stays outside: nnx would read the logical axis names as mesh axes."""

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return call


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def host_batch_to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Per-process numpy batches -> global jax arrays sharded by `data_sharding`."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = data_sharding(mesh, value.ndim, value.shape[1] if value.ndim > 1 else None)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
