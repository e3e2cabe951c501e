"""The test environment conftest.py promises: 8 CPU devices, x64, backend markers."""

import jax
import jax.numpy as jnp
import pytest


def test_eight_emulated_cpu_devices():
  assert len(jax.devices("cpu")) == 8
  if jax.default_backend() == "cpu":
    assert len(jax.devices()) == 8


def test_x64_enabled_for_references():
  assert jnp.asarray(1.0, jnp.float64).dtype == jnp.float64


@pytest.mark.gpu
def test_gpu_marker_runs_only_on_gpu():
  assert jax.default_backend() == "gpu"


@pytest.mark.tpu
def test_tpu_marker_runs_only_on_tpu():
  assert jax.default_backend() == "tpu"
