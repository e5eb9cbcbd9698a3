"""A run file's `X = %gin.REQUIRED` macro left unset is one ConfigError naming it, not a TypeError
from deep inside the command (gin hands the unset macro to the function as a sentinel object)."""

import os
import re
import subprocess
import sys

import gin
import pytest

from samtone_jax import errors
from samtone_jax import gin_config
from samtone_jax.evaluation import mining

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(files, bindings, fn, **kwargs):
  gin.clear_config()
  try:
    gin_config.parse_gin(files, bindings)
    return gin_config.call_configured(fn, **kwargs)
  finally:
    gin.clear_config()


def test_unset_required_macros_are_named():
  # runs/mine.gin alone: CHECKPOINT_PATH, MINE_TASK, MINE_OUTPUT_DIR and the experiment's
  # TASK_FEATURE_LENGTHS are declared %gin.REQUIRED and nothing sets them.
  with pytest.raises(errors.ConfigError) as raised:
    _call(["runs/mine.gin"], ['MINE_TASK = "demo_manpages_train"'], mining.mine_to_directory)
  message = str(raised.value)
  assert "required macros CHECKPOINT_PATH (for mining.mine_to_directory.checkpoint_path)" in message
  assert "MINE_OUTPUT_DIR (for mining.mine_to_directory.output_dir)" in message
  assert "TASK_FEATURE_LENGTHS (for mining.mine_to_directory.feature_lengths)" in message
  assert "MINE_TASK" not in message  # bound on the command line
  assert "--gin.CHECKPOINT_PATH=..." in message


def test_an_argument_the_caller_passes_is_not_required_from_gin():
  gin.clear_config()
  try:
    gin_config.parse_gin(["runs/mine.gin"], [])
    with pytest.raises(errors.ConfigError, match="required macros CHECKPOINT_PATH"):
      gin_config.check_required_macros(mining.mine_to_directory)
    # Every unset argument given by the caller: nothing is refused.
    gin_config.check_required_macros(
        mining.mine_to_directory,
        given={"checkpoint_path", "task", "output_dir", "feature_lengths"})
  finally:
    gin.clear_config()


def test_command_without_checkpoint_path_exits_1_naming_the_macro():
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "samtone_jax.evaluate", "--gin_file=experiments/demo_samtone.gin",
       '--gin.EVAL_TASKS=["demo_manpages_test"]'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error in the gin configuration: required macro CHECKPOINT_PATH "
                         "(for evaluate.evaluate.checkpoint_path) is not set"), last
  assert "Traceback" not in result.stderr


def test_a_chain_of_macros_names_the_unset_one():
  from samtone_jax import encode  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_config.parse_gin(["runs/encode.gin"], [
        'CHECKPOINT_PATH = "/tmp/run"', 'ENCODE_SET = "demo_manpages_test"',
        'ENCODE_OUTPUT_DIR = "/tmp/out"', "EVAL_FEATURE_LENGTHS = %TASK_FEATURE_LENGTHS",
        "TASK_FEATURE_LENGTHS = %gin.REQUIRED"])
    with pytest.raises(errors.ConfigError, match=re.escape(
        "required macro TASK_FEATURE_LENGTHS (for encode.encode.feature_lengths) is not set")):
      gin_config.check_required_macros(encode.encode)
  finally:
    gin.clear_config()


def test_references_are_not_evaluated_by_the_check():
  # runs/predict.gin alone binds model = @seq2seq_model.EncoderDecoderModel() with no config:
  # evaluating it would raise a TypeError. The check reads the bindings without calling anything
  # and names the experiment's macro that is missing.
  from samtone_jax import predict  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=re.escape(
      "required macro TASK_FEATURE_LENGTHS (for predict.predict.feature_lengths) is not set")):
    _call(["runs/predict.gin"], ['CHECKPOINT_PATH = "/tmp/run"'], predict.predict)
