"""Workarounds for known XLA bugs in the jaxlib releases lsm runs on, applied at `import lsm`.

jaxlib 0.10.2 and 0.11.0 send reductions and dots of high-rank arrays on CPU to YNNPACK fusions that
read past their shape descriptors: they segfault on an XLA worker thread (jax-ml/jax#39257, #40412)
or return wrong sums (jax-ml/jax#39103). lsm hits the segfault in the backward of `ssd`; with only
the reduce fusions off, a worker of lsm's test suite still died the same way in other programs
(whether a read past the end crashes depends on what lies there, so a program can pass alone and
crash after others). The crash is asynchronous, so its Python traceback points at whatever ran
next. lsm turns every YNNPACK fusion off on those releases; XLA's own CPU code runs instead.

XLA reads `XLA_FLAGS` once, when the first backend starts. `import lsm` before running anything
with jax, or set the flag yourself. Set `LSM_KEEP_XLA_FLAGS=1` to leave `XLA_FLAGS` untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from lsm.log import log_once

YNN_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="  # an empty list: no YNN fusion
YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
# The releases with the bug; the flag is known to parse in each of them (and from 0.10.1).
YNN_BAD_JAXLIB = ("0.10.2", "0.11.0")
OPT_OUT_ENV = "LSM_KEEP_XLA_FLAGS"


def _backends_started() -> bool:
  from jax._src import xla_bridge  # Private, so absence means "cannot tell": assume not started.
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def apply_ynn_workaround(
    jaxlib_version: str | None = None,
    environ: MutableMapping[str, str] | None = None,
    backends_started: bool | None = None,
) -> str:
  """Adds ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions) to ``XLA_FLAGS`` where
  needed.

  Returns what happened: ``"applied"``, ``"not needed"`` (another jaxlib), ``"user set"`` (the
  flag is already in ``XLA_FLAGS``), ``"opted out"`` (``LSM_KEEP_XLA_FLAGS`` is set) or
  ``"too late"`` (a backend already started; a warning says what to do).
  """
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  if jaxlib_version not in YNN_BAD_JAXLIB:
    return "not needed"
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return "opted out"
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG_NAME in flags:
    return "user set"
  if _backends_started() if backends_started is None else backends_started:
    log_once(
        f"jaxlib {jaxlib_version} has CPU fusions (YNNPACK) that crash or sum wrongly "
        f"(jax-ml/jax#39257, #39103) and a jax backend started before `import lsm`, so lsm "
        f"could not turn them off. Set XLA_FLAGS='{YNN_OFF_FLAG}' before starting python, "
        f"or import lsm before running anything with jax.", logging.WARNING)
    return "too late"
  environ["XLA_FLAGS"] = f"{flags} {YNN_OFF_FLAG}".strip()
  return "applied"
