"""Test-wide setup: 8 emulated CPU devices, float64 for the references, backend markers."""

import gc
import os

# Must happen before jax is imported anywhere, so multi-device tests run on one CPU.
# The suite is compile-bound (thousands of small programs): LLVM's backend optimisations are
# turned down (HLO passes, and so the programs' semantics, collectives and memory plans, are
# untouched), which cuts CPU compile time by about a fifth. Flags the caller set win.
_TEST_FLAGS = {"--xla_force_host_platform_device_count": "8",
               "--xla_backend_optimization_level": "0",
               "--xla_llvm_disable_expensive_passes": "true"}
_given = {flag.split("=")[0] for flag in os.environ.get("XLA_FLAGS", "").split()}
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *(f"{k}={v}" for k, v in _TEST_FLAGS.items()
                                        if k not in _given)]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import lsm  # noqa: E402, F401  (first, so its XLA workarounds precede any backend start)

# The float64 references need x64; lsm code under test keeps its own dtypes explicit.
jax.config.update("jax_enable_x64", True)

_BACKEND_MARKERS = ("gpu", "tpu")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees every test module's compiled programs when it ends. A pytest worker otherwise keeps
  thousands of XLA:CPU executables alive for the whole run, and on jaxlib 0.10.2 long-lived
  workers died in XLA (segfaults inside a later compile) after several hundred tests, never when
  the same tests ran in shorter processes."""
  yield
  jax.clear_caches()
  gc.collect()


def pytest_runtest_setup(item):
  backend = jax.default_backend()
  for marker in _BACKEND_MARKERS:
    if item.get_closest_marker(marker) is not None and backend != marker:
      pytest.skip(f"needs a {marker.upper()} backend; this run has '{backend}'")
