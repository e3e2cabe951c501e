"""scripts/tpu_vm/: the gcloud command lines their --dry-run prints, their argument errors, and
train.sh's restart loop run against a fake `gcloud` (preemption -> re-create, deploy, rerun)."""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "tpu_vm"
WORKDIR = "gs://bucket/runs/{name}"
TRAIN = [".venv/bin/python", "-m", "lsm.train", "--config", "configs/tpu_1b_32k.yaml",
         f"train.output_dir={WORKDIR}", "train.steps=100", "data.files=[gs://bucket/data/*.jsonl]"]


def _run(script, *args, env=None):
  env = {k: v for k, v in (env or os.environ).items() if k != "DRY_RUN"}
  return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                        env=env, timeout=60)


def _commands(stderr: str) -> list[list[str]]:
  """The printed commands ("+ ..." lines), each as the argv the shell reads back."""
  return [shlex.split(line[2:]) for line in stderr.splitlines() if line.startswith("+ ")]


def _option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _train_argv(ssh_argv) -> list[str]:
  """The lsm.train argv inside the remote command of a train.sh ssh."""
  remote = _option(ssh_argv, "command")
  assert remote.startswith("cd ~/lsm && "), remote
  return shlex.split(remote.removeprefix("cd ~/lsm && ").split("; status=$?")[0])


def _dry(script, *args):
  result = _run(script, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  return _commands(result.stderr)


def test_create_prints_a_tpu_vm_or_a_queued_resource():
  [create] = _dry("create.sh", "--name=run1", "--zone=us-central1-a", "--spot",
                  "--project=my-project")
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "run1",
                    "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot",
                    "--zone=us-central1-a", "--project=my-project"]
  create, describe = _dry("create.sh", "--queued", "--accelerator-type", "v4-32")
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "lsm",
                    "--node-id=lsm", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-ubuntu2204-base", "--zone=us-west4-a"]
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "lsm"]
  [create] = _dry("create.sh", "--accelerator-type=v6e-8", "--version=my-version")
  assert "--version=my-version" in create


def test_deploy_copies_to_every_worker_and_installs():
  tar, scp, ssh = _dry("deploy.sh", "--python=3.11", "--data", "gs://bucket/data")
  assert tar[:2] == ["tar", "-czf"] and tar[2].endswith("lsm.tar.gz")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tar[2], "lsm:lsm.tar.gz"] and "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lsm"]
  assert "--worker=all" in ssh
  remote = _option(ssh, "command")
  assert "tar -xzf ~/lsm.tar.gz -C ~/lsm" in remote
  assert "uv venv --python 3.11 .venv" in remote
  assert "uv pip install --python .venv/bin/python -e '.[tpu]' gcsfs" in remote
  assert remote.endswith(" && gcloud storage rsync --recursive gs://bucket/data /data")


def test_delete():
  [delete] = _dry("delete.sh", "--name=run1")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "run1", "--quiet",
                    "--zone=us-west4-a"]
  [delete] = _dry("delete.sh", "--queued")
  assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


@pytest.mark.parametrize("queued", [False, True])
def test_train_dry_run_shows_the_run_a_recovery_and_the_rerun(queued):
  extra = ["--queued"] if queued else ["--spot"]
  commands = _dry("train.sh", f"--workdir={WORKDIR}", *extra, *TRAIN[-2:])
  verbs = [" ".join(c[3:5]) for c in commands if c[0] == "gcloud"]
  group = "queued-resources" if queued else "tpu-vm"
  expected = ["tpu-vm ssh", f"{group} describe", f"{group} delete", f"{group} create"]
  expected += [f"{group} describe"] if queued else []  # waits until the resource is ACTIVE
  assert verbs == [*expected, "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  first, rerun = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"] and "lsm.train" in str(c)]
  assert first == rerun and "--worker=all" in first
  assert _train_argv(first) == TRAIN


@pytest.mark.parametrize("args,message", [
    ([], "--workdir is required"),
    (["--workdir=/tmp/run"], "--workdir must be a gs:// path"),
    ([f"--workdir={WORKDIR}", "--config=configs/nope.yaml"], "--config: no file"),
    ([f"--workdir={WORKDIR}", "--max-restarts=x"], "--max-restarts must be an int"),
    ([f"--workdir={WORKDIR}", "train.output_dir=gs://b/x"], "with --workdir, not"),
    ([f"--workdir={WORKDIR}", "--frobnicate"], "unknown option '--frobnicate'"),
    ([f"--workdir={WORKDIR}", "--accelerator-type=tpu8"], "--accelerator-type must look like"),
    ([f"--workdir={WORKDIR}", "--python=3.10"], "--python must be 3.11 or newer"),
])
def test_train_argument_errors(args, message):
  result = _run("train.sh", "--dry-run", *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not _commands(result.stderr)


FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(args) + "\\n")
words = [a for a in args if not a.startswith("--")]
command = "".join(a for a in args if a.startswith("--command="))
if words[3] == "scp":
  shutil.copy(words[4], os.environ["FAKE_GCLOUD_ARCHIVE"])
elif words[3] == "describe":
  print(os.environ["FAKE_GCLOUD_STATE"])
elif "lsm.train" in command:
  attempts = sum("lsm.train" in line for line in open(log))
  statuses = os.environ["FAKE_GCLOUD_TRAIN"].split(",")
  for worker in range(2):  # like --worker=all on a 2-host slice; gcloud itself exits 0
    print(f"lsm.train exit status {{statuses[min(attempts, len(statuses)) - 1]}} on w{{worker}}")
"""


def _fake_gcloud(tmp_path, *, train_statuses, state):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (bin_dir / "gcloud").chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
              FAKE_GCLOUD_LOG=str(tmp_path / "calls.jsonl"),
              FAKE_GCLOUD_ARCHIVE=str(tmp_path / "deployed.tar.gz"),
              FAKE_GCLOUD_TRAIN=",".join(map(str, train_statuses)), FAKE_GCLOUD_STATE=state)


def _calls(tmp_path) -> list[str]:
  return [" ".join(json.loads(line)[2:4]) for line in
          (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_restart_loop_recreates_a_preempted_tpu_and_resumes(tmp_path):
  env = _fake_gcloud(tmp_path, train_statuses=[1, 0], state="PREEMPTED")
  result = _run("train.sh", f"--workdir={WORKDIR}", "--spot", "--backoff=0",
                "--data=gs://bucket/data", *TRAIN[-2:], env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert _calls(tmp_path) == ["tpu-vm ssh", "tpu-vm describe", "tpu-vm delete", "tpu-vm create",
                              "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
  assert "--spot" in calls[3]  # re-created like the first one, and its data copied again
  assert "gcloud storage rsync --recursive gs://bucket/data /data" in _option(calls[5], "command")
  assert _train_argv(calls[0]) == _train_argv(calls[6]) == TRAIN
  assert "lsm.train exited 0 on every worker" in result.stdout
  with tarfile.open(tmp_path / "deployed.tar.gz") as archive:
    names = set(archive.getnames())
  assert {"lsm/train/loop.py", "pyproject.toml", "scripts/tpu_vm/common.sh"} <= names
  assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)


def test_restart_loop_reruns_in_place_and_gives_up_after_max_restarts(tmp_path):
  env = _fake_gcloud(tmp_path, train_statuses=[1], state="READY")
  result = _run("train.sh", f"--workdir={WORKDIR}", "--backoff=0", "--max-restarts=2", env=env)
  assert result.returncode == 1 and "giving up after 3 attempts" in result.stderr
  assert _calls(tmp_path) == ["tpu-vm ssh", "tpu-vm describe"] * 2 + ["tpu-vm ssh"]


def test_restart_loop_stops_on_a_config_error(tmp_path):
  env = _fake_gcloud(tmp_path, train_statuses=[2], state="READY")
  result = _run("train.sh", f"--workdir={WORKDIR}", "--backoff=0", env=env)
  assert result.returncode == 2 and "lsm.train exited 2" in result.stderr
  assert _calls(tmp_path) == ["tpu-vm ssh"]
