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
