"""The entry points as a user runs them: train, evaluate, generate, and their error exits."""

import json

import jax

from lsm import evaluate as evaluate_cli
from lsm import generate as generate_cli
from lsm.train import __main__ as train_cli

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=64", "data.seq_len=32", "data.batch_size=8", "train.steps=4",
        "train.log_every=2", "train.eval_batches=1", "data.task_options.num_digits=3",
        "checkpoint.async_save=false", "parallel.data=8"]


def test_train_then_evaluate_then_generate(tmp_path, capsys):
  run = tmp_path / "cli"
  assert train_cli.main(["--config", "configs/quickstart.yaml", f"train.output_dir={run}",
                         *TINY]) == 0
  out = capsys.readouterr().out
  assert "train step 4/4" in out and f"checkpoint: {run}/checkpoints" in out
  assert evaluate_cli.main(["--run", str(run), "--lengths", "32,64", "--examples", "8"]) == 0
  out = capsys.readouterr().out
  assert "| 64 | 2 | yarn |" in out
  rows = json.loads((run / "eval-passkey.json").read_text())["rows"]
  assert [r["length"] for r in rows] == [32, 64]
  assert generate_cli.main(["--run", str(run), "--prompt", "1 2 3", "--prompt", "1 5",
                            "decode.max_new_tokens=3"]) == 0
  out = capsys.readouterr().out
  assert out.count("--- ") == 2 and "tokens/s" in out
  assert jax.device_count() == 8
  # Context parallelism at evaluation and generation: the same answers with the sequence (and
  # the KV caches) sharded over 8 devices.
  assert evaluate_cli.main(["--run", str(run), "--lengths", "32,64", "--examples", "8",
                            "parallel.data=1", "parallel.sequence=8",
                            "model.attention.context_parallel.layout=contiguous"]) == 0
  capsys.readouterr()
  sharded = json.loads((run / "eval-passkey.json").read_text())["rows"]
  for a, b in zip(rows, sharded):
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) and a["exact_match"] == b[
        "exact_match"]
  assert generate_cli.main(["--run", str(run), "--prompt", "1 2 3", "--prompt", "1 5",
                            "decode.max_new_tokens=3", "decode.max_length=16",
                            "parallel.data=1", "parallel.sequence=8"]) == 0
  assert capsys.readouterr().out.split("# step")[0] == out.split("# step")[0]


def test_errors_exit_2_with_the_key_named(tmp_path, capsys):
  assert train_cli.main(["--config", "configs/quickstart.yaml", "model.bogus=1"]) == 2
  assert "config key 'model.bogus': unknown key" in capsys.readouterr().err
  assert evaluate_cli.main(["--run", str(tmp_path / "nothing")]) == 2
  assert "no config.yaml there" in capsys.readouterr().err
