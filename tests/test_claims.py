"""`python -m lsm.claims`: the committed claim files load, the dry run prints the training
commands, errors name the field, and a tiny claim trains, evaluates and writes JSON + PNG."""

import json
import pathlib

import pytest
import yaml

from lsm import claims
from lsm.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLAIM_FILES = sorted((ROOT / "configs" / "claims").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # claim files name configs relative to the repository


def test_there_is_a_claim_file_for_each_claim():
  assert {p.stem for p in CLAIM_FILES} >= {"streaming_llm", "landmark_passkey",
                                          "mqar_state_size", "selective_copy",
                                          "length_extrapolation"}


@pytest.mark.parametrize("path", CLAIM_FILES, ids=[p.stem for p in CLAIM_FILES])
def test_claim_files_load_and_their_runs_build(path, tmp_path):
  claim = claims.load_claim(path)
  assert claim.name == path.stem
  for key in claim.runs:
    config = claims.run_config(claim, key, tmp_path)
    assert str(config.output_dir) == str(tmp_path / claim.name / key)
    if claim.corpus is not None:
      assert config.data.files == [str(tmp_path / claim.name / "corpus.txt")]


def test_dry_run_prints_every_training_command(capsys):
  assert claims.main(["configs/claims/streaming_llm.yaml", "--dry-run",
                      "--runs-dir", "/tmp/r"]) == 0
  out = capsys.readouterr().out
  command = [line for line in out.splitlines() if line.startswith("python -m lsm.train")]
  assert command == ["python -m lsm.train --config configs/claims/train/streaming_lm.yaml "
                     "'data.files=[/tmp/r/streaming_llm/corpus.txt]' name=streaming_llm-lm "
                     "train.output_dir=/tmp/r/streaming_llm/lm"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c["evaluation"].update(kind="bogus"), r"evaluation.kind: Input should be"),
    (lambda c: c["runs"]["a"].update(config="configs/nope.yaml"),
     r"runs.a.config: no such file 'configs/nope.yaml'"),
    (lambda c: c.update(extra=1), r"extra: Extra inputs are not permitted"),
    (lambda c: c["runs"]["a"].update(overrides=["model.bogus=1"]), r"model.bogus"),
], ids=["kind", "config", "unknown-field", "override"])
def test_bad_claim_files_name_the_field(tmp_path, change, message, capsys):
  tree = {"name": "t", "claim": "c", "source": "s",
          "runs": {"a": {"config": "configs/quickstart.yaml"}},
          "evaluation": {"kind": "lengths", "lengths": [128]}}
  change(tree)
  path = tmp_path / "t.yaml"
  path.write_text(yaml.safe_dump(tree))
  assert claims.main([str(path), "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and __import__("re").search(message, err), err


def test_missing_claim_file():
  with pytest.raises(ConfigError, match=r"claim file 'nope.yaml': no such file"):
    claims.load_claim("nope.yaml")


def test_corpus_is_the_stdlib_sources_written_once(tmp_path):
  claim = claims.Claim.model_validate({
      "name": "c", "claim": "", "source": "", "corpus": {"source": "python_stdlib",
                                                        "megabytes": 0.05},
      "runs": {"a": {"config": "configs/quickstart.yaml"}},
      "evaluation": {"kind": "lengths", "lengths": [8]}})
  path = claims.write_corpus(claim, tmp_path)
  text = path.read_text()
  assert len(text) <= int(0.05 * 2**20) + 2 * 50 and len(text) > 0.04 * 2**20
  assert "def " in text and "import" in text
  path.write_text("kept")
  assert claims.write_corpus(claim, tmp_path).read_text() == "kept"  # never rewritten


def test_a_tiny_claim_trains_evaluates_and_writes_json_and_png(tmp_path, capsys):
  """Two training steps of a tiny passkey model, evaluated over a swept task option at two
  lengths; a rerun finds the finished run instead of training again; the streaming evaluation
  of the same run writes one row per policy."""
  tree = {"name": "tiny", "claim": "c", "source": "s",
          "runs": {"lm": {"config": "configs/quickstart.yaml", "label": "tiny LM",
                          "overrides": ["model.d_model=16", "model.num_layers=1",
                                        "model.mlp_dim=32", "data.seq_len=32",
                                        "data.batch_size=8", "train.steps=2",
                                        "train.eval_every=2", "train.eval_batches=1",
                                        "train.log_every=1", "checkpoint.every=2",
                                        "data.task_options.num_digits=3"]}},
          "evaluation": {"kind": "lengths", "lengths": [32, 64], "examples": 8,
                         "batch_size": 8, "rope_scalings": ["none", "yarn"],
                         "sweep": [{"num_digits": 2}, {"num_digits": 3}], "x": "num_digits"}}
  path = tmp_path / "tiny.yaml"
  path.write_text(yaml.safe_dump(tree))
  args = [str(path), "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
  assert claims.main(args) == 0
  result = json.loads((tmp_path / "out" / "tiny.json").read_text())
  assert (tmp_path / "out" / "tiny.png").stat().st_size > 1000
  assert result["runs"]["lm"]["step"] == 2
  # 2 option values x (2 unscaled lengths + 1 scaled length past training)
  rows = [(r["task_options"]["num_digits"], r["scaling"], r["length"]) for r in result["rows"]]
  assert rows == [(2, "none", 32), (2, "none", 64), (2, "yarn", 64),
                  (3, "none", 32), (3, "none", 64), (3, "yarn", 64)]
  assert all(0 <= r["exact_match"] <= r["token_accuracy"] <= 1 for r in result["rows"])
  assert "| tiny LM | yarn | 64 | 3 |" in capsys.readouterr().out
  assert claims.main(args) == 0  # resumes: nothing left to train
  assert json.loads((tmp_path / "out" / "tiny.json").read_text())["runs"]["lm"]["step"] == 2

  claim = claims.load_claim(path)
  streaming = claim.model_copy(update={"evaluation": claims.Evaluation(
      kind="streaming", lengths=[64], streams=1, chunk=16, buckets=4,
      policies={"full": ["full"], "window 8": ["window", "decode.sink_window.window=8"]})})
  rows = claims.evaluate_streaming_claim(streaming, tmp_path / "runs", progress=lambda _: None)
  assert [r["policy"] for r in rows] == ["full", "window 8"]
  assert [len(r["buckets"]) for r in rows] == [4, 4]
  assert rows[1]["settings"]["window"] == 8
  assert claims.plot_streaming(streaming, rows, tmp_path / "s.png").stat().st_size > 1000
  assert "| all |" in claims.table_streaming(streaming, rows)
