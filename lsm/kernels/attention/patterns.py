"""Static sparse-attention patterns, each a `Mask` of the attention op.

Every pattern is causal and evaluated on positions, like any `Mask`: packed documents (positions
restarting per document, segment ids) and decoding offsets need nothing more. With ``q``, ``k``
the query and key positions and ``d = q // block - k // block`` their block distance:

============  =================================  =================================================
pattern       paper                              ``allowed(q, k)``
============  =================================  =================================================
sink_window   StreamingLLM (Xiao et al., 2023)   ``k <= q`` and (``q - window <= k`` or
                                                 ``k < sink_tokens``)
lambda_shape  LM-Infinite (Han et al., 2023)     the same pairs, ``global_tokens`` for the sinks
                                                 (its distance cap is the mixer's, not the mask's)
bigbird       BigBird (Zaheer et al., 2020)      ``k <= q`` and ``layout[q // block, k // block]``:
                                                 local band ``0 <= d < num_local_blocks``, global
                                                 first blocks (as keys and as queries), and
                                                 ``num_random_blocks`` seeded random earlier
                                                 blocks per query block
strided       Sparse Transformer (Child et al.,  ``k <= q`` and (``d < local_blocks`` or
              2019)                              ``d % stride == 0``)
============  =================================  =================================================

The block patterns hold a static layout of ``ceil(max_length / block)`` blocks a side: positions
at or past ``max_length`` are outside it and see nothing (the op rejects default positions that
run past it). The op visits only the key blocks the layout allows (`visited_blocks`).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lsm.kernels.attention.blocks import BlockSizes, sink_split, visited_blocks
from lsm.kernels.attention.mask import Mask


def _count(owner: str, name: str, value, *, positive: bool) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < int(positive):
    allowed = "a positive int" if positive else "a non-negative int"
    raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
  return int(value)


def sink_window(window: int, sink_tokens: int) -> Mask:
  """StreamingLLM: a query at position p sees keys ``p - window .. p`` and the first
  ``sink_tokens`` positions (attention sinks)."""
  window = _count("sink_window", "window", window, positive=True)
  sink_tokens = _count("sink_window", "sink_tokens", sink_tokens, positive=False)
  return Mask(causal=True, window=(window, 0), sink_tokens=sink_tokens or None)


def lambda_shape(window: int, global_tokens: int) -> Mask:
  """LM-Infinite's Λ-shaped mask: the first ``global_tokens`` positions and the keys
  ``p - window .. p``. The pairs are `sink_window`'s; LM-Infinite also caps the distance the
  query sees the global tokens at, which `lsm.layers.SparseAttention` applies (``distance_cap``).
  """
  window = _count("lambda_shape", "window", window, positive=True)
  global_tokens = _count("lambda_shape", "global_tokens", global_tokens, positive=False)
  return Mask(causal=True, window=(window, 0), sink_tokens=global_tokens or None)


def _blocks(owner: str, block, max_length) -> tuple[int, int]:
  block = _count(owner, "block", block, positive=True)
  max_length = _count(owner, "max_length", max_length, positive=True)
  return block, -(-max_length // block)


def bigbird(block: int, num_local_blocks: int, num_global_blocks: int, num_random_blocks: int,
            max_length: int, seed: int = 0) -> Mask:
  """BigBird for a causal LM, on blocks of ``block`` positions.

  Query block ``i`` sees key block ``j <= i`` when ``i - j < num_local_blocks`` (its own block and
  the ``num_local_blocks - 1`` before it), when ``j < num_global_blocks`` (global blocks are seen
  by every query block; as queries they see every earlier block), or when ``j`` is one of the
  ``num_random_blocks`` blocks drawn for row ``i`` — without replacement from the earlier blocks
  not already visible, by ``numpy.random.default_rng(seed)`` row after row, so a longer
  ``max_length`` keeps the rows of a shorter one. Element-level causality applies on top.
  """
  block, n = _blocks("bigbird", block, max_length)
  num_local_blocks = _count("bigbird", "num_local_blocks", num_local_blocks, positive=True)
  num_global_blocks = _count("bigbird", "num_global_blocks", num_global_blocks, positive=False)
  num_random_blocks = _count("bigbird", "num_random_blocks", num_random_blocks, positive=False)
  seed = _count("bigbird", "seed", seed, positive=False)
  q_block, k_block = np.arange(n)[:, None], np.arange(n)[None, :]
  distance = q_block - k_block
  layout = (distance >= 0) & (distance < num_local_blocks)
  layout |= (k_block < num_global_blocks) | (q_block < num_global_blocks)
  rng = np.random.default_rng(seed)
  for row in range(n if num_random_blocks else 0):
    candidates = np.flatnonzero(~layout[row, :row + 1])
    if candidates.size:
      chosen = rng.choice(candidates, size=min(num_random_blocks, candidates.size), replace=False)
      layout[row, chosen] = True
  return Mask(causal=True, layout=layout, layout_block=(block, block))


def strided(block: int, local_blocks: int, stride: int, max_length: int) -> Mask:
  """Sparse Transformer's strided pattern on blocks: query block ``i`` sees key block ``j <= i``
  when ``i - j < local_blocks`` (the local part) or ``(i - j) % stride == 0`` (the strided
  part, every ``stride``-th block back). Element-level causality applies on top."""
  block, n = _blocks("strided", block, max_length)
  local_blocks = _count("strided", "local_blocks", local_blocks, positive=True)
  stride = _count("strided", "stride", stride, positive=True)
  distance = np.arange(n)[:, None] - np.arange(n)[None, :]
  layout = (distance >= 0) & ((distance < local_blocks) | (distance % stride == 0))
  return Mask(causal=True, layout=layout, layout_block=(block, block))


PATTERNS = {"sink_window": sink_window, "lambda": lambda_shape, "bigbird": bigbird,
            "strided": strided}


def pattern_mask(pattern: str, **params) -> Mask:
  """The `Mask` of the pattern named ``pattern`` (a key of `PATTERNS`) from its parameters, those
  of the function it names (``"lambda"``: `lambda_shape`)."""
  if pattern not in PATTERNS:
    raise ValueError(f"pattern_mask: pattern must be one of {tuple(PATTERNS)}, got {pattern!r}")
  parameters = inspect.signature(PATTERNS[pattern]).parameters
  for name in params:
    if name not in parameters:
      raise ValueError(f"pattern_mask: {name}={params[name]!r} is not a parameter of pattern "
                       f"{pattern!r}; it takes {', '.join(parameters)}")
  missing = [name for name, p in parameters.items() if p.default is p.empty and name not in params]
  if missing:
    raise ValueError(f"pattern_mask: pattern {pattern!r} needs {', '.join(missing)}, got "
                     f"{', '.join(params) or 'no parameters'}")
  return PATTERNS[pattern](**params)


_visited_blocks = jax.jit(visited_blocks, static_argnums=0, static_argnames="block_sizes")


class Density(NamedTuple):
  """How much of causal attention a mask keeps, over positions ``0 .. length - 1``."""

  pairs: float  # allowed (query, key) pairs / the length * (length + 1) / 2 causal pairs
  # key blocks the blockwise paths visit / those they visit for a plain causal mask; when the
  # sinks are split off a window (`blocks.sink_split`), their short call counts as its width
  # over the block size per query block
  blocks: float


def density(mask: Mask, length: int, *, block_sizes: BlockSizes = BlockSizes()) -> Density:
  """The `Density` of ``mask`` on one document of ``length`` tokens (for benchmarks).

  Counts pairs a slab of rows at a time in one compiled program, so long lengths need little
  memory (and ``length ** 2`` mask evaluations of time).
  """
  if not isinstance(mask, Mask):
    raise TypeError(f"density: mask must be an lsm Mask, got {type(mask).__name__}")
  length = _count("density", "length", length, positive=True)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"density: block_sizes must be a BlockSizes, got "
                    f"{type(block_sizes).__name__}")
  keys = np.arange(length, dtype=np.int32)
  rows = min(length, max(1, (1 << 22) // length))

  @jax.jit
  def count(queries):
    q, k = queries[:, None], jnp.asarray(keys)[None]
    return jnp.sum(mask.allowed(q, k) & (k <= q), dtype=jnp.int32)

  allowed = 0
  for start in range(0, length, rows):
    # The last slab is padded with position -1: no key is at or before it, it adds nothing.
    queries = np.full(rows, -1, np.int32)
    queries[:min(rows, length - start)] = keys[start:start + rows]
    allowed += int(count(queries))
  positions = keys[None]
  visited, causal = (int(np.sum(np.asarray(_visited_blocks(m, positions, positions,
                                                           block_sizes=block_sizes))))
                     for m in (mask, Mask(causal=True)))
  bq, bk = block_sizes.clipped(length, length)
  split = sink_split(mask, positions, positions, None, None, bq, bk)
  if split is not None:  # the op's main call, and the sinks' call as a fraction of a block
    visited = split.main_visits + -(-length // bq) * split.index.shape[1] / bk
  return Density(pairs=allowed / (length * (length + 1) / 2), blocks=visited / causal)
