"""The commands' persistent compilation cache: where it lives, how it is turned off, and that a
second run of the same training command compiles nothing (every program is read from the cache).
"""

import os
import subprocess
import sys

import pytest

from samtone_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag, env, expected", [
    (None, {}, os.path.expanduser("~/.cache/samtone_jax/jax_cache")),
    (None, {"SAMTONE_COMPILATION_CACHE_DIR": "/tmp/a"}, "/tmp/a"),
    ("/tmp/b", {"SAMTONE_COMPILATION_CACHE_DIR": "/tmp/a"}, "/tmp/b"),
    ("", {"SAMTONE_COMPILATION_CACHE_DIR": "/tmp/a"}, None),
    (None, {"SAMTONE_COMPILATION_CACHE_DIR": "off"}, None),
    ("gs://bucket/cache", {}, "gs://bucket/cache"),
])
def test_cache_directory_precedence_and_off(flag, env, expected):
  directory, explicit = compilation_cache.resolve_dir(flag, env)
  assert directory == expected
  assert explicit == (flag is not None or bool(env))


def _entries(directory):
  return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def test_second_training_run_reads_every_program_from_the_default_cache(tmp_path):
  home = tmp_path / "home"
  env = dict(os.environ, HOME=str(home), PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  for name in ("SAMTONE_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(name, None)  # the built-in default: $HOME/.cache/samtone_jax/jax_cache

  def train(model_dir):
    command = [sys.executable, "-m", "samtone_jax.main",
               "--gin_file=experiments/demo_samtone.gin", f'--gin.MODEL_DIR="{model_dir}"',
               "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.EVAL_TASKS=[]",
               '--gin.TASK_FEATURE_LENGTHS={"queries": 8, "passages": 16}',
               "--gin.config.T5Config.num_layers=1"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

  cache = home / ".cache" / "samtone_jax" / "jax_cache"
  train(tmp_path / "first")
  written = _entries(cache)
  # The train step and the initialiser compile for over JAX's 1 s threshold, so are written.
  assert len(written) >= 1, written
  # A new run directory (nothing to resume): the same programs, all read back, none written.
  train(tmp_path / "second")
  assert _entries(cache) == written


# Runs a demo's real main (flags, set-up) with the function that trains replaced by a report of
# JAX's cache directory at the moment training would start.
_DEMO_MAIN = """
import importlib, sys
import jax
from samtone_jax import cli
entry, owner, function = sys.argv[1:4]
def report(*args, **kwargs):
  print("CACHE_DIR=" + str(jax.config.jax_compilation_cache_dir), flush=True)
  sys.exit(0)
setattr(importlib.import_module(owner), function, report)
module = importlib.import_module(entry)
sys.argv = [entry, *sys.argv[4:]]
cli.run(module.main)
"""
_DEMOS = [("samtone_jax.demo", "samtone_jax.demo", "run_demo"),
          ("samtone_jax.demo_mining", "samtone_jax.demo_mining", "run_demo"),
          ("samtone_jax.demo_skill", "samtone_jax.skill_demo", "run_skill_demo")]


def _run_demo_main(demo, *flags_):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  for name in ("SAMTONE_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
    env.pop(name, None)
  return subprocess.run([sys.executable, "-c", _DEMO_MAIN, *demo, *flags_], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("demo", _DEMOS, ids=[d[0] for d in _DEMOS])
def test_demos_train_with_the_compilation_cache_of_their_flag(demo, tmp_path):
  result = _run_demo_main(demo, f"--compilation_cache_dir={tmp_path / 'cache'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"CACHE_DIR={tmp_path / 'cache'}" in result.stdout.splitlines()


def test_demo_refuses_gin_flags_it_would_drop():
  result = _run_demo_main(_DEMOS[0], "--gin.LEARNING_RATE=0.1")
  assert result.returncode == 1
  assert "--binding='NAME = VALUE'" in result.stderr and "not --gin.LEARNING_RATE=0.1." in result.stderr
