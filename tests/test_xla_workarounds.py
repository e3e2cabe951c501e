"""`import lsm` turns off the YNNPACK fusions of the jaxlib releases where they are broken."""

import logging
import os
import subprocess
import sys

import jaxlib
import pytest

from lsm import log, xla_workarounds
from lsm.xla_workarounds import YNN_OFF_FLAG, apply_ynn_workaround

BAD = xla_workarounds.YNN_BAD_JAXLIB[0]

# jax-ml/jax#40412 (segfault on an XLA worker thread) and #39103 (wrong sums), each checked against
# numpy in a fresh process that imports lsm before anything runs.
_PROGRAM = """
import os, sys
import lsm
import jax, jax.numpy as jnp, numpy as np
shape = (3, 1, 2, 2, 8, 8, 8)
u = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float64)
v = np.asarray(jax.random.normal(jax.random.key(1), shape), np.float64)
got = jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(u.astype(np.float32), v.astype(np.float32))
np.testing.assert_allclose(np.asarray(got), (u * v).sum(3), rtol=1e-5, atol=1e-5)
i = jnp.arange(32_769, dtype=jnp.float32)
rows = jnp.stack([i, jnp.zeros_like(i), jnp.zeros_like(i)], axis=1)
norms = jax.jit(jax.vmap(lambda r: jnp.sum((jnp.eye(3) @ r) ** 2)))(rows)
assert float(norms[-1]) == 32_768.0 ** 2, float(norms[-1])
print(os.environ.get("XLA_FLAGS", ""))
"""


def test_known_bad_programs_run_right_after_import_lsm():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LSM_KEEP_XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  applied = jaxlib.__version__ in xla_workarounds.YNN_BAD_JAXLIB
  assert (YNN_OFF_FLAG in done.stdout) == applied


def test_appends_the_flag_and_keeps_the_users_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert apply_ynn_workaround(BAD, environ, backends_started=False) == "applied"
  assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                          YNN_OFF_FLAG]
  empty = {}
  assert apply_ynn_workaround(BAD, empty, backends_started=False) == "applied"
  assert empty["XLA_FLAGS"] == YNN_OFF_FLAG


@pytest.mark.parametrize("environ, version, outcome", [
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, BAD, "user set"),
    ({"LSM_KEEP_XLA_FLAGS": "1"}, BAD, "opted out"),
    ({}, "0.10.1", "not needed"),
])
def test_leaves_xla_flags_alone(environ, version, outcome):
  before = dict(environ)
  assert apply_ynn_workaround(version, environ, backends_started=False) == outcome
  assert environ == before


def test_says_what_to_do_when_a_backend_already_started(monkeypatch, caplog):
  monkeypatch.setattr(log, "_said", set())
  environ = {}
  with caplog.at_level(logging.WARNING, logger="lsm"):
    assert apply_ynn_workaround(BAD, environ, backends_started=True) == "too late"
  assert environ == {}
  assert YNN_OFF_FLAG in caplog.text and "import lsm" in caplog.text
