"""The tiny model every evaluation test shares, and a stand-in for `lsm.train.restore.load_run`
so the CLI evaluates it without a checkpoint."""

import pytest

from lsm.config import apply_overrides, from_dict
from tests.eval.helpers import tiny_config, tiny_model


@pytest.fixture(scope="session")
def tiny():
  """(model, config) of `tests.eval.helpers.tiny_config`."""
  config = tiny_config()
  return tiny_model(config), config


@pytest.fixture
def fake_runs(monkeypatch):
  """``fake_runs({run_dir: (model, config)})``: `load_run` then returns that model and the
  config with the caller's overrides applied (the model stays as built), at step 7. Returns the
  list of calls ``(run_dir, overrides)``."""

  def install(runs: dict) -> list:
    calls = []

    def load_run(run, overrides=()):
      calls.append((str(run), list(overrides)))
      model, config = runs[str(run)]
      return model, from_dict(apply_overrides(config.model_dump(), list(overrides))), 7

    monkeypatch.setattr("lsm.train.restore.load_run", load_run)
    return calls

  return install
