"""The config schema: YAML + dotted overrides, and every start-up error names its key."""

import pathlib

import pytest

from lsm.config import Config, ConfigError, load_config, to_yaml
from lsm.models import check_layer_pattern

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_name_known_mixers(path):
  config = load_config(path)
  check_layer_pattern(config.model.layer_pattern)
  assert load_config(None, []).model_dump() != {}  # defaults load too


def test_overrides_are_typed_and_nested(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("name: x\nmodel:\n  d_model: 64\n  num_heads: 4\n")
  config = load_config(path, ["model.num_layers=6", "model.layer_pattern=[attention, attention]",
                              "optimizer.learning_rate=2e-4", "model.rope.scaling=yarn",
                              "model.rope.original_length=128", "data.task_options.num_digits=3"])
  assert config.model.d_model == 64 and config.model.num_layers == 6
  assert config.model.layer_pattern == ["attention", "attention"]
  assert config.optimizer.learning_rate == 2e-4
  assert config.model.rope.scaling == "yarn"
  assert config.data.task_options == {"num_digits": 3}
  assert load_config(None, []).model.d_model == Config().model.d_model
  # The saved form loads back to the same config.
  again = tmp_path / "again.yaml"
  again.write_text(to_yaml(config))
  assert load_config(again) == config


@pytest.mark.parametrize("overrides,match", [
    (["model.bogus=1"], r"config key 'model.bogus': unknown key"),
    (["bogus.key=1"], r"config key 'bogus': unknown key"),
    (["train.steps=abc"], r"config key 'train.steps': .*integer.*given: 'abc'"),
    (["train.steps=0"], r"config key 'train.steps': .*greater than 0"),
    (["model.num_heads=6"], r"model.num_heads=6 must be a multiple of model.num_kv_heads=4"),
    (["model.d_model=100", "model.num_heads=8", "model.num_kv_heads=8"],
     r"model.d_model=100 must be a multiple of model.num_heads=8"),
    (["model.num_layers=3", "model.layer_pattern=[attention, attention]"],
     r"model.num_layers=3 must be a multiple of the length of model.layer_pattern"),
    (["data.seq_len=255", "parallel.sequence=2"],
     r"data.seq_len=255 must be divisible by parallel.sequence=2"),
    (["data.batch_size=6", "train.grad_accum=4"],
     r"data.batch_size=6 must be divisible by train.grad_accum=4"),
    (["data.task=text"], r"data.files must list text files"),
    (["model.rope.scaling=bogus"], r"config key 'model.rope.scaling'"),
    (["model.attention.window=0"], r"config key 'model.attention.window'"),
    (["parallel.data=0"], r"parallel.data must be positive or -1"),
    (["model=3"], r"config key 'model'"),
    (["no_equals_sign"], r"override 'no_equals_sign' must look like section.key=value"),
    (["model.d_model=64", "model.d_model.x=1"], r"'model.d_model' is not a section"),
])
def test_bad_configs_name_the_key(overrides, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, overrides)


def test_unknown_mixer_names_its_position():
  config = load_config(None, ["model.layer_pattern=[attention, mamba9]", "model.num_layers=2"])
  with pytest.raises(ValueError, match=r"model.layer_pattern\[1\]='mamba9' is not a known mixer"):
    check_layer_pattern(config.model.layer_pattern)


def test_mesh_shape_must_use_every_device():
  config = load_config(None, ["parallel.fsdp=2", "parallel.tensor=2"])
  assert config.parallel.shape(8) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
  with pytest.raises(ConfigError, match=r"do not multiply to the 6 devices"):
    config.parallel.shape(6)


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(ConfigError, match=r"--config '.*nope.yaml': no such file"):
    load_config(tmp_path / "nope.yaml")
