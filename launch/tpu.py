#!/usr/bin/env python3
"""Cloud TPU VM lifecycle for samtone_jax: create, setup, train, logs, copy, delete.

One command per step; every step prints the exact commands it runs (`+ gcloud ...`), and with
`--dry-run` only prints them. The names of the TPU and of the queued resource are the same, so
`ssh` / `scp` / `delete` work for both ways of creating one.

  python launch/tpu.py create --name=st --zone=us-west4-a --accelerator-type=v5litepod-16 --spot
  python launch/tpu.py setup  --name=st --zone=us-west4-a            # copies this checkout (git HEAD)
  python launch/tpu.py train  --name=st --zone=us-west4-a \
      --gin_file=gin/experiments/X.gin --gin.MODEL_DIR="'gs://bucket/run1'" --gin.BATCH_SIZE=512
  python launch/tpu.py logs   --name=st --zone=us-west4-a
  python launch/tpu.py copy   --name=st --zone=us-west4-a --src=gs://bucket/run1 --dest=results/
  python launch/tpu.py delete --name=st --zone=us-west4-a

Only the standard library is used, so it runs on a laptop with just the gcloud CLI.
"""

import argparse
from collections.abc import Sequence
import os
import shlex
import subprocess
import sys
import time

# Where the project lives on every worker, its virtualenv, and the training log.
REMOTE_DIR = "~/samtone_jax"
REMOTE_VENV = "~/samtone_venv"
REMOTE_LOG = "~/samtone_train.log"
ARCHIVE = "samtone_jax.tar.gz"
# The jax version this project is pinned to (pyproject.toml), with the TPU runtime (libtpu).
DEFAULT_JAX_SPEC = "jax[tpu]>=0.10,<0.11"
# TPU software version per accelerator family (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_runtime_version(accelerator_type: str) -> str:
  """The JAX TPU software version for e.g. `v5litepod-16` -> `v2-alpha-tpuv5-lite`."""
  for prefix, version in RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix + "-"):
      return version
  raise SystemExit(f"No default --version for --accelerator-type={accelerator_type}; pass "
                   "--version (see https://cloud.google.com/tpu/docs/runtimes).")


class Runner:
  """Prints each command as `+ <shell-quoted argv>` and runs it unless this is a dry run."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, argv: Sequence[str], capture: bool = False) -> str:
    print("+ " + shlex.join(argv), flush=True)
    if self.dry_run:
      return ""
    result = subprocess.run(list(argv), check=False, text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode:
      raise SystemExit(f"Command failed with exit status {result.returncode}: {shlex.join(argv)}")
    return result.stdout or ""


def _location(args) -> list[str]:
  """`--zone=Z [--project=P]`, appended to every gcloud command."""
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def _ssh(args, remote_command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
          f"--worker={worker}", f"--command={remote_command}"]


def create(args, run: Runner) -> None:
  """Creates a TPU VM (slice); `--queued` goes through a queued resource and waits for it."""
  version = args.version or default_runtime_version(args.accelerator_type)
  provisioning = ["--spot"] if args.spot else []
  if not args.queued:
    run(["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
         f"--accelerator-type={args.accelerator_type}", f"--version={version}", *provisioning])
    return
  run(["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
       f"--node-id={args.name}", *_location(args), f"--accelerator-type={args.accelerator_type}",
       f"--runtime-version={version}", *provisioning])
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
              *_location(args), "--format=value(state.state)"]
  # A queued request may wait for capacity; the TPU exists once the request is ACTIVE.
  deadline = time.time() + args.wait_minutes * 60
  while True:
    state = run(describe, capture=True).strip()
    if run.dry_run or state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED") or time.time() > deadline:
      raise SystemExit(f"Queued resource {args.name} is {state or 'unknown'}; giving up.")
    print(f"  state {state}; waiting {args.poll_seconds}s", flush=True)
    time.sleep(args.poll_seconds)


def setup(args, run: Runner) -> None:
  """Puts the project on every worker and installs it with jax[tpu] into a virtualenv."""
  if args.repo_url:
    fetch = (f"rm -rf {REMOTE_DIR} && git clone --depth=1 --branch={shlex.quote(args.branch)} "
             f"{shlex.quote(args.repo_url)} {REMOTE_DIR}")
  else:
    # The committed state of this checkout (HEAD): exactly what `git log` says was run.
    archive = os.path.join(args.tmp_dir, ARCHIVE)
    run(["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
    run(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:~/{ARCHIVE}",
         *_location(args), "--worker=all"])
    fetch = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR}"
  install = (f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -U pip && "
             f"{REMOTE_VENV}/bin/pip install -q -e {REMOTE_DIR} {shlex.quote(args.jax_spec)}")
  run(_ssh(args, f"set -e; {fetch}; {install}"))


def train(args, run: Runner, gin_args: Sequence[str]) -> None:
  """Starts `python -m samtone_jax.main` on every worker in the background (nohup, log file)."""
  if not any(arg.startswith("--gin_file") for arg in gin_args):
    raise SystemExit("train needs at least one --gin_file=... (and usually --gin.MODEL_DIR=...).")
  # Each worker starts its own process; jax.distributed.initialize() finds the others. The
  # paths stay unquoted so that the remote shell expands `~`; the user's arguments are quoted.
  remote = (f"cd {REMOTE_DIR} && TF_CPP_MIN_LOG_LEVEL=2 nohup {REMOTE_VENV}/bin/python -m "
            f"samtone_jax.main {shlex.join(gin_args)} > {REMOTE_LOG} 2>&1 < /dev/null &")
  run(_ssh(args, remote))


def logs(args, run: Runner) -> None:
  """Streams the training log of one worker (process 0 by default) until interrupted."""
  run(_ssh(args, f"tail -n {args.lines} -F {REMOTE_LOG}", worker=args.worker))


def copy(args, run: Runner) -> None:
  """Copies results here: from GCS (model dir on gs://) or from one worker's disk."""
  if not run.dry_run:
    os.makedirs(args.dest, exist_ok=True)
  if args.src.startswith("gs://"):
    run(["gcloud", "storage", "cp", "--recursive", args.src, args.dest])
  else:
    run(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", f"{args.name}:{args.src}",
         args.dest, *_location(args), f"--worker={args.worker}"])


def delete(args, run: Runner) -> None:
  """Deletes the TPU (and, with --queued, its queued resource)."""
  if args.queued:
    run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_location(args),
         "--force", "--quiet"])
  else:
    run(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args), "--quiet"])


def _parser() -> argparse.ArgumentParser:
  # No abbreviations: unknown --gin... flags are forwarded, so prefixes must not match ours.
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="TPU (and queued resource) name.")
  common.add_argument("--zone", required=True, help="e.g. us-west4-a, us-central2-b.")
  common.add_argument("--project", default=None, help="GCP project (default: gcloud config).")
  common.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  commands = parser.add_subparsers(dest="command", required=True)

  p = commands.add_parser("create", parents=[common], allow_abbrev=False, help=create.__doc__)
  p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32, v5p-64.")
  p.add_argument("--version", default=None,
                 help="TPU software version (default: the JAX one for the accelerator family).")
  p.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")
  p.add_argument("--queued", action="store_true", help="Create through a queued resource.")
  p.add_argument("--wait-minutes", type=float, default=120, help="--queued: wait this long.")
  p.add_argument("--poll-seconds", type=float, default=30, help="--queued: poll interval.")

  p = commands.add_parser("setup", parents=[common], allow_abbrev=False, help=setup.__doc__)
  p.add_argument("--repo-url", default=None,
                 help="git clone this URL on the workers instead of copying this checkout.")
  p.add_argument("--branch", default="main", help="--repo-url: branch or tag.")
  p.add_argument("--jax-spec", default=DEFAULT_JAX_SPEC, help="pip spec of jax with libtpu.")
  p.add_argument("--tmp-dir", default="/tmp", help="Where the local archive is written.")

  commands.add_parser("train", parents=[common], allow_abbrev=False, help=train.__doc__ +
                      " Pass --gin_file=... and --gin.X=Y exactly as to samtone_jax.main.")

  p = commands.add_parser("logs", parents=[common], allow_abbrev=False, help=logs.__doc__)
  p.add_argument("--worker", default="0", help="Worker index (or 'all').")
  p.add_argument("--lines", type=int, default=100, help="Lines of history before following.")

  p = commands.add_parser("copy", parents=[common], allow_abbrev=False, help=copy.__doc__)
  p.add_argument("--src", required=True, help="gs://... or a path on the worker.")
  p.add_argument("--dest", required=True, help="Local directory.")
  p.add_argument("--worker", default="0", help="Worker to copy from (non-GCS --src).")

  p = commands.add_parser("delete", parents=[common], allow_abbrev=False, help=delete.__doc__)
  p.add_argument("--queued", action="store_true", help="It was created with --queued.")
  return parser


# Flags of samtone_jax.main that `train` forwards unchanged.
_FORWARDED_PREFIXES = ("--gin_file", "--gin.", "--gin_search_paths")


def main(argv: Sequence[str]) -> None:
  args, unknown = _parser().parse_known_args(argv)
  forwarded = [arg for arg in unknown if arg.startswith(_FORWARDED_PREFIXES)]
  rejected = [arg for arg in unknown if not arg.startswith(_FORWARDED_PREFIXES)]
  if rejected or (forwarded and args.command != "train"):
    raise SystemExit(f"Unrecognised arguments for {args.command}: {rejected or forwarded}")
  run = Runner(args.dry_run)
  if args.command == "train":
    train(args, run, forwarded)
  else:
    {"create": create, "setup": setup, "logs": logs, "copy": copy,
     "delete": delete}[args.command](args, run)


if __name__ == "__main__":
  main(sys.argv[1:])
