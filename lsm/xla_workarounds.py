"""Workarounds for known XLA bugs in the jaxlib releases lsm runs on, applied at `import lsm`.

jaxlib 0.10.2 and 0.11.0 send some reductions on CPU to YNNPACK fusions that segfault on an XLA
worker thread (jax-ml/jax#39257, #40412) or return wrong sums (jax-ml/jax#39103). lsm's chunked
scans hit the segfault (the backward of `ssd` on small shapes). The crash is asynchronous, so its
Python traceback points at whatever ran next. Turning the YNNPACK reduce fusions off avoids both bugs
and leaves the other YNNPACK fusions on.

XLA reads `XLA_FLAGS` once, when the first backend starts. `import lsm` before running anything
with jax, or set the flag yourself. Set `LSM_KEEP_XLA_FLAGS=1` to leave `XLA_FLAGS` untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from lsm.log import log_once

YNN_REDUCE_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# The releases with the bug; the flag is known to parse in each of them (and from 0.10.1).
YNN_REDUCE_BAD_JAXLIB = ("0.10.2", "0.11.0")
OPT_OUT_ENV = "LSM_KEEP_XLA_FLAGS"


def _backends_started() -> bool:
  from jax._src import xla_bridge  # Private, so absence means "cannot tell": assume not started.
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def apply_ynn_reduce_workaround(
    jaxlib_version: str | None = None,
    environ: MutableMapping[str, str] | None = None,
    backends_started: bool | None = None,
) -> str:
  """Adds ``--xla_cpu_experimental_ynn_fusion_type=-reduce`` to ``XLA_FLAGS`` where needed.

  Returns what happened: ``"applied"``, ``"not needed"`` (another jaxlib), ``"user set"`` (the
  flag is already in ``XLA_FLAGS``), ``"opted out"`` (``LSM_KEEP_XLA_FLAGS`` is set) or
  ``"too late"`` (a backend already started; a warning says what to do).
  """
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  if jaxlib_version not in YNN_REDUCE_BAD_JAXLIB:
    return "not needed"
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return "opted out"
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG_NAME in flags:
    return "user set"
  if _backends_started() if backends_started is None else backends_started:
    log_once(
        f"jaxlib {jaxlib_version} has CPU reductions that crash or sum wrongly "
        f"(jax-ml/jax#39257, #39103) and a jax backend started before `import lsm`, so lsm "
        f"could not turn them off. Set XLA_FLAGS='{YNN_REDUCE_FLAG}' before starting python, "
        f"or import lsm before running anything with jax.", logging.WARNING)
    return "too late"
  environ["XLA_FLAGS"] = f"{flags} {YNN_REDUCE_FLAG}".strip()
  return "applied"
