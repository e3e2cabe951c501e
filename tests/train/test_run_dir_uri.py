"""A run directory in a bucket (``train.output_dir=gs://bucket/...``) keeps its ``//`` all the
way to the writers, without network: gs:// is served by an in-memory fsspec filesystem."""

import json

import orbax.checkpoint as ocp
import pytest
import tensorboardX
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from lsm.config import is_uri, load_config, to_yaml
from lsm.train import checkpoint as checkpoint_lib
from lsm.train.metrics import JsonlLog, Reporter
from lsm.train.restore import load_run

RUN = "gs://bucket/runs/uri"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs:// in memory; the working directory is an empty folder, so a URI collapsed into a local
  path (pathlib turns gs://b into gs:/b) would show up there."""

  class InMemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]

  fs = InMemoryGCS()
  monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", lambda self, path: fs)
  monkeypatch.chdir(tmp_path)
  yield fs
  assert list(tmp_path.iterdir()) == [], "a gs:// path was written to the local disk"


def _config(*overrides):
  return load_config(None, ["name=uri", "train.output_dir=gs://bucket/runs/{name}", *overrides])


def test_output_dir_keeps_the_scheme_and_local_paths_are_unchanged():
  out = _config().output_dir
  assert str(out) == RUN and is_uri(out)
  assert str(out / "checkpoints") == f"{RUN}/checkpoints"
  local = load_config(None, ["name=uri"]).output_dir
  assert str(local) == "runs/uri" and not is_uri(local)
  assert str(load_config(None, ["train.output_dir=/tmp/x/{name}"]).output_dir) == "/tmp/x/run"


def test_reporter_writes_the_log_and_tensorboard_to_the_bucket(bucket, monkeypatch):
  logdirs = []

  class Writer:
    def __init__(self, logdir):
      logdirs.append(logdir)

    def add_scalar(self, *args):
      pass

    def close(self):
      pass

  monkeypatch.setattr(tensorboardX, "SummaryWriter", Writer)
  reporter = Reporter(_config().output_dir, total_steps=3, flops_per_token=1.0, peak_flops=1.0)
  reporter.log(1, "train", {"loss": 2.0})
  reporter.log(2, "train", {"loss": 1.5})
  assert not bucket.exists(f"{RUN}/metrics.jsonl")  # objects cannot be appended to: kept
  reporter.close()
  assert logdirs == [f"{RUN}/tensorboard"]
  assert str(reporter.jsonl) == f"{RUN}/metrics.jsonl"
  # A rerun (resuming) keeps the earlier lines and adds its own.
  resumed = Reporter(_config().output_dir, total_steps=3, flops_per_token=1.0, peak_flops=1.0,
                     tensorboard=False)
  resumed.log(3, "train", {"loss": 1.0})
  resumed.close()
  lines = bucket.cat_file(f"{RUN}/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_jsonl_log_rewrites_a_bucket_file_when_due(bucket):
  log = JsonlLog(f"{RUN}/log.jsonl", rewrite_seconds=0.0)
  log.append('{"a": 1}')
  assert bucket.cat_file(f"{RUN}/log.jsonl") == b'{"a": 1}\n'
  log.append('{"a": 2}')
  assert bucket.cat_file(f"{RUN}/log.jsonl") == b'{"a": 1}\n{"a": 2}\n'


def test_checkpoints_hand_orbax_the_uri(bucket, monkeypatch):
  given = []

  class Manager:
    def __init__(self, directory, **kwargs):
      given.append(directory)

  monkeypatch.setattr(ocp, "CheckpointManager", Manager)
  ckpt = checkpoint_lib.Checkpoints(_config().output_dir / "checkpoints", every=1, keep=1,
                                    async_save=False)
  assert str(ckpt.directory) == f"{RUN}/checkpoints"
  assert [str(d) for d in given] == [f"{RUN}/checkpoints"]
  local = checkpoint_lib.Checkpoints("runs/x/checkpoints", every=1, keep=1, async_save=False)
  assert local.directory.is_absolute() and str(local.directory).endswith("/runs/x/checkpoints")


def test_load_config_and_load_run_read_from_the_bucket(bucket, monkeypatch):
  config = _config("model.d_model=48")
  bucket.pipe_file(f"{RUN}/config.yaml", to_yaml(config).encode())
  assert load_config(f"{RUN}/config.yaml").model.d_model == 48
  opened = []
  monkeypatch.setattr(checkpoint_lib.Checkpoints, "__init__",
                      lambda self, directory, **kwargs: opened.append(str(directory)))
  monkeypatch.setattr(checkpoint_lib.Checkpoints, "restore_latest", lambda self, state: None)
  monkeypatch.setattr(checkpoint_lib.Checkpoints, "close", lambda self: None)
  with pytest.raises(ValueError, match="no readable checkpoint"):
    load_run(RUN)
  assert opened == [f"{RUN}/checkpoints"]
