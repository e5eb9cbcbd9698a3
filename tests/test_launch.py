"""launch/tpu.py: the exact gcloud commands of every step, dry-run and real (with a fake gcloud).

The fake `gcloud` is a small script first on PATH that appends its argv (one JSON list per line)
to a file, so the non-dry path is exercised end to end without a cloud account.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu.py"
LOC = ["--name=st", "--zone=us-west4-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "st", "--zone=us-west4-a", "--worker=all"]

FAKE_GCLOUD = r"""#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\n")
if sys.argv[1:5] == ["compute", "tpus", "queued-resources", "describe"]:
  # WAITING_FOR_RESOURCES on the first poll, ACTIVE afterwards.
  counter = os.environ["FAKE_GCLOUD_LOG"] + ".polls"
  polls = int(open(counter).read()) if os.path.exists(counter) else 0
  open(counter, "w").write(str(polls + 1))
  print("WAITING_FOR_RESOURCES" if polls == 0 else "ACTIVE")
"""


def run_script(*args: str, env=None) -> str:
  result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def dry_run(*args: str) -> list[str]:
  return run_script(*args, "--dry-run").splitlines()


@pytest.fixture
def fake_gcloud(tmp_path):
  """Runs the script (not dry) with a recording gcloud first on PATH; returns (run, calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud_calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_LOG=str(log))

  def run(*args: str) -> str:
    return run_script(*args, env=env)

  def calls() -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return run, calls


def test_create_dry_run_on_demand_and_spot():
  assert dry_run("create", *LOC, "--accelerator-type=v5litepod-16", "--spot") == [
      "+ gcloud compute tpus tpu-vm create st --zone=us-west4-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --spot"]
  assert dry_run("create", *LOC, "--project=proj", "--accelerator-type=v4-32") == [
      "+ gcloud compute tpus tpu-vm create st --zone=us-west4-a --project=proj "
      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]


def test_create_dry_run_queued():
  assert dry_run("create", *LOC, "--accelerator-type=v5p-64", "--queued", "--spot") == [
      "+ gcloud compute tpus queued-resources create st --node-id=st --zone=us-west4-a "
      "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot",
      "+ gcloud compute tpus queued-resources describe st --zone=us-west4-a "
      "'--format=value(state.state)'"]


def test_create_queued_waits_until_active(fake_gcloud):
  run, calls = fake_gcloud
  run("create", *LOC, "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--queued",
      "--poll-seconds=0")
  describe = ["compute", "tpus", "queued-resources", "describe", "st", "--zone=us-west4-a",
              "--format=value(state.state)"]
  assert calls() == [
      ["compute", "tpus", "queued-resources", "create", "st", "--node-id=st", "--zone=us-west4-a",
       "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e"],
      describe, describe]


def test_setup_copies_checkout_and_installs(fake_gcloud, tmp_path):
  install = ("python3 -m venv ~/samtone_venv && ~/samtone_venv/bin/pip install -q -U pip && "
             "~/samtone_venv/bin/pip install -q -e ~/samtone_jax 'jax[tpu]>=0.10,<0.11'")
  unpack = ("rm -rf ~/samtone_jax && mkdir -p ~/samtone_jax && "
            "tar -xzf ~/samtone_jax.tar.gz -C ~/samtone_jax")
  archive = tmp_path / "samtone_jax.tar.gz"
  expected_ssh = SSH + [f"--command=set -e; {unpack}; {install}"]
  assert dry_run("setup", *LOC, f"--tmp-dir={tmp_path}") == [
      f"+ git -C {REPO} archive --format=tar.gz --output={archive} HEAD",
      f"+ gcloud compute tpus tpu-vm scp {archive} 'st:~/samtone_jax.tar.gz' --zone=us-west4-a "
      "--worker=all",
      "+ " + shlex.join(expected_ssh)]
  run, calls = fake_gcloud
  run("setup", *LOC, f"--tmp-dir={tmp_path}")
  assert calls() == [
      ["compute", "tpus", "tpu-vm", "scp", str(archive), "st:~/samtone_jax.tar.gz",
       "--zone=us-west4-a", "--worker=all"],
      expected_ssh[1:]]
  # The archive really is the committed project.
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "samtone_jax/distributed.py", "launch/tpu.py"} <= names


def test_setup_from_git_url():
  command = ("--command=set -e; rm -rf ~/samtone_jax && git clone --depth=1 --branch=v1 "
             "https://example.com/r.git ~/samtone_jax; python3 -m venv ~/samtone_venv && "
             "~/samtone_venv/bin/pip install -q -U pip && ~/samtone_venv/bin/pip install -q -e "
             "~/samtone_jax 'jax[tpu]==0.10.2'")
  assert dry_run("setup", *LOC, "--repo-url=https://example.com/r.git", "--branch=v1",
                 "--jax-spec=jax[tpu]==0.10.2") == ["+ " + shlex.join(SSH + [command])]


def test_train_forwards_gin_flags_with_quoting(fake_gcloud):
  gin_args = ["--gin_file=gin/experiments/gtr_samtone.gin", "--gin.MODEL_DIR='gs://b/run 1'",
              "--gin.BATCH_SIZE=512"]
  run, calls = fake_gcloud
  run("train", *LOC, *gin_args)
  [call] = calls()
  assert call[:7] == SSH[1:]
  remote = call[7].removeprefix("--command=")
  assert remote == (
      "cd ~/samtone_jax && TF_CPP_MIN_LOG_LEVEL=2 nohup ~/samtone_venv/bin/python -m "
      "samtone_jax.main --gin_file=gin/experiments/gtr_samtone.gin "
      "'--gin.MODEL_DIR='\"'\"'gs://b/run 1'\"'\"'' --gin.BATCH_SIZE=512 "
      "> ~/samtone_train.log 2>&1 < /dev/null &")
  # The remote shell gives main.py back exactly the arguments typed here.
  words = shlex.split(remote)
  start = words.index("samtone_jax.main") + 1
  assert words[start:start + 3] == gin_args
  assert dry_run("train", *LOC, *gin_args) == ["+ " + shlex.join(["gcloud", *call])]


def test_logs_copy_delete(fake_gcloud):
  assert dry_run("logs", *LOC, "--worker=1", "--lines=5") == [
      "+ gcloud compute tpus tpu-vm ssh st --zone=us-west4-a --worker=1 "
      "'--command=tail -n 5 -F ~/samtone_train.log'"]
  assert dry_run("copy", *LOC, "--src=gs://b/run1", "--dest=results") == [
      "+ gcloud storage cp --recursive gs://b/run1 results"]
  assert dry_run("copy", *LOC, "--src=~/samtone_train.log", "--dest=results") == [
      "+ gcloud compute tpus tpu-vm scp --recurse 'st:~/samtone_train.log' results "
      "--zone=us-west4-a --worker=0"]
  assert dry_run("delete", *LOC) == [
      "+ gcloud compute tpus tpu-vm delete st --zone=us-west4-a --quiet"]
  assert dry_run("delete", *LOC, "--queued") == [
      "+ gcloud compute tpus queued-resources delete st --zone=us-west4-a --force --quiet"]
  run, calls = fake_gcloud
  run("delete", *LOC, "--project=p")
  assert calls() == [["compute", "tpus", "tpu-vm", "delete", "st", "--zone=us-west4-a",
                      "--project=p", "--quiet"]]


@pytest.mark.parametrize("args, message", [
    (("train", *LOC, "--gin.BATCH_SIZE=8"), "train needs at least one --gin_file"),
    (("logs", *LOC, "--gin.BATCH_SIZE=8"), "Unrecognised arguments for logs"),
    (("create", *LOC, "--accelerator-type=v9-8"), "No default --version"),
])
def test_bad_arguments_fail_clearly(args, message):
  result = subprocess.run([sys.executable, str(SCRIPT), *args, "--dry-run"], capture_output=True,
                          text=True, check=False)
  assert result.returncode != 0 and message in result.stderr
