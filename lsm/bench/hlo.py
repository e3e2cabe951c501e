"""Collectives of a compiled XLA module, read from its HLO text: how many of each kind, their
payload and the bytes each device sends (used by `lsm.bench context` to check the communication
of each context-parallel strategy against its formula)."""

from __future__ import annotations

import re

import numpy as np

_COLLECTIVE = re.compile(r"=\s*(?P<type>.+?)\s+(?P<op>collective-permute|all-gather|all-to-all|"
                         r"all-reduce|reduce-scatter)(?P<start>-start)?\(")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(%s)\[([\d,]*)\]" % "|".join(sorted(_ITEMSIZE, key=len, reverse=True)))
_GROUP_LIST = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_GROUP_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")

# Bytes one device sends for a result of n bytes over g devices (ring / pairwise algorithms).
_SENT = {
    "collective-permute": lambda n, g: n,
    "all-gather": lambda n, g: n * (g - 1) / g,  # result = the gathered array
    "all-to-all": lambda n, g: n * (g - 1) / g,  # keeps 1/g of its own
    "reduce-scatter": lambda n, g: n * (g - 1),  # result = one shard
    "all-reduce": lambda n, g: 2 * n * (g - 1) / g,  # reduce-scatter + all-gather
}


def _array_bytes(text: str) -> int:
  return sum(_ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in _ARRAY.findall(text))


_WHILE_BODY = re.compile(r"\bwhile\(.*?body=(%[\w.\-]+)")
_TRIP_COUNT = re.compile(r'known_trip_count":\{"n":"(\d+)"')


def _trip_counts(hlo: str) -> dict[str, int]:
  """Loop body computation -> its known trip count (the ring's hops are a fori_loop)."""
  trips = {}
  for line in hlo.splitlines():
    body, n = _WHILE_BODY.search(line), _TRIP_COUNT.search(line)
    if body and n:
      trips[body[1]] = int(n[1])
  return trips


def collectives(hlo: str, devices: int) -> dict:
  """Every collective of a compiled module: count, payload and bytes sent per device; one in a
  loop body with a known trip count counts that many times."""
  ops, computation, outside_entry, unparsed = [], "", set(), 0
  trips = _trip_counts(hlo)
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = line.split("(")[0].strip()
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    if m["start"]:  # async pairs: the CPU backend emits none; say so rather than guess
      unparsed += 1
      continue
    groups = _GROUP_LIST.search(line)
    iota = _GROUP_IOTA.search(line)
    g = len(groups[1].split(",")) if groups else int(iota[1]) if iota else devices
    payload = _array_bytes(m["type"])
    times = trips.get(computation, 1)
    ops.extend([dict(op=m["op"], payload=payload, sent=_SENT[m["op"]](payload, g), group=g)]
               * times)
    if not computation.startswith("ENTRY") and computation not in trips:
      outside_entry.add(computation)  # e.g. a conditional's branch: counted once, flagged
  counts = {}
  for o in ops:
    counts[o["op"]] = counts.get(o["op"], 0) + 1
  return dict(counts=counts, payload_bytes=sum(o["payload"] for o in ops),
              bytes_sent_per_device=sum(o["sent"] for o in ops),
              outside_entry=sorted(outside_entry), async_not_counted=unparsed)
