"""Token layouts of a sequence sharded over P devices, and moving a batch into and out of them.

A layout is a permutation of the T tokens applied once, to the batch, at the data/model boundary:
device r of the ``sequence`` axis holds slice ``r`` of the permuted sequence. Positions travel with
the tokens, so masks and RoPE see true positions and a loss summed over tokens is unchanged.

- ``contiguous``: device r holds tokens ``[r T/P, (r+1) T/P)``. Under a causal mask device P-1 does
  about 2P-1 times the work of device 0.
- ``zigzag``: the sequence is cut into 2P chunks; device r holds chunks r and 2P-1-r, so every
  device holds one early and one late chunk and does the same causal work.
- ``striped``: device r holds tokens r, r+P, r+2P, ...; balanced too, but every block spans the
  whole sequence, so no block of a causal hop can be skipped (zigzag's can).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout, owner: str = "layout"):
  if layout not in LAYOUTS:
    raise ValueError(f"{owner}: layout must be one of {LAYOUTS}, got {layout!r}")
  return layout


def layout_multiple(layout: str, shards: int) -> int:
  """What the sequence length must be a multiple of for ``layout`` over ``shards`` devices."""
  return 2 * shards if layout == "zigzag" else shards


def permutation(length: int, shards: int, layout: str) -> np.ndarray:
  """``perm`` [T] such that the laid-out sequence is ``x[:, perm]`` (it holds token ``perm[i]``
  at place i)."""
  check_layout(layout, "permutation")
  if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
    raise ValueError(f"permutation: shards must be a positive int, got {shards!r}")
  multiple = layout_multiple(layout, shards)
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1 or (
      length % multiple):
    raise ValueError(f"permutation: the sequence length must be a positive multiple of "
                     f"{multiple} for layout={layout!r} over {shards} devices, got {length!r}")
  index = np.arange(length, dtype=np.int32)
  if layout == "contiguous" or shards == 1:
    return index
  if layout == "striped":
    return index.reshape(length // shards, shards).T.reshape(-1)
  chunks = index.reshape(2 * shards, length // (2 * shards))
  return np.concatenate([np.concatenate([chunks[r], chunks[2 * shards - 1 - r]])
                         for r in range(shards)])


def inverse_permutation(length: int, shards: int, layout: str) -> np.ndarray:
  perm = permutation(length, shards, layout)
  inverse = np.empty_like(perm)
  inverse[perm] = np.arange(length, dtype=perm.dtype)
  return inverse


def _take(x, index, axis):
  if isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
    return jnp.take(x, index, axis=axis)
  return np.take(np.asarray(x), index, axis=axis)


def to_layout(tree, shards: int, layout: str, *, axis: int = 1):
  """Every array of ``tree`` permuted along ``axis`` (the sequence) into ``layout``. NumPy arrays
  stay NumPy (so positions stay known at trace time)."""
  if layout == "contiguous" or shards == 1:
    return tree
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return tree
  length = leaves[0].shape[axis]
  perm = permutation(length, shards, layout)
  return jax.tree.map(lambda x: _take(x, perm, axis), tree)


def from_layout(tree, shards: int, layout: str, *, axis: int = 1):
  """The inverse of `to_layout`: arrays back in sequence order."""
  if layout == "contiguous" or shards == 1:
    return tree
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return tree
  inverse = inverse_permutation(leaves[0].shape[axis], shards, layout)
  return jax.tree.map(lambda x: _take(x, inverse, axis), tree)
