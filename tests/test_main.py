"""End to end through `python -m samtone_jax.main` with the real gin files and tiny overrides.

One run is killed (SIGKILL) after its first checkpoint, restarted with the same command and
preempted (SIGTERM), then finished in-process; its final parameters must equal an uninterrupted
run's bit for bit. Subprocesses are slow (JAX + TF imports), so there are only three.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import gin
import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import cli
from samtone_jax import errors
from samtone_jax import gin_config
from samtone_jax.models import config as model_config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/demo_samtone.gin"
TRAIN_STEPS = 8
# Tiny overrides of the demo experiment (gin syntax, as after --gin.).
OVERRIDES = (
    f"TRAIN_STEPS={TRAIN_STEPS}",
    "BATCH_SIZE=16",
    'TASK_FEATURE_LENGTHS={"queries": 8, "passages": 16}',
    "EVAL_TASKS=[]",
    "DROPOUT_RATE=0.1",
    "WARMUP_STEPS=2",
    "config.T5Config.num_layers=1",
    "trainer.LoopConfig.log_period=1",
    "trainer.LoopConfig.checkpoint_period=2",
)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache shared by this process and its subprocesses (the same
  program is compiled once), and the same XLA options everywhere so that results are equal."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield env
  jax.config.update("jax_compilation_cache_dir", None)


def _command(model_dir, *extra, overrides=OVERRIDES):
  return [sys.executable, "-m", "samtone_jax.main", f"--gin_file={EXPERIMENT}",
          f'--gin.MODEL_DIR="{model_dir}"', *[f"--gin.{o}" for o in overrides], *extra]


def _start(command, env, log_path):
  stderr = open(log_path, "w")
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                             cwd=REPO)
  # A watchdog, so that a hung subprocess fails the test instead of blocking it.
  timer = threading.Timer(400, process.kill)
  timer.start()
  return process, timer


def _read_until(process, marker):
  """Reads stdout lines until one contains `marker`; returns everything read."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if marker in line:
      return "".join(lines)
  raise AssertionError(f"{marker!r} never printed; output:\n{''.join(lines)}")


def _train_in_process(model_dir, overrides=OVERRIDES):
  return gin_config.run_from_gin([EXPERIMENT], [f'MODEL_DIR = "{model_dir}"', *overrides])


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


# Gradient caching and loss row chunking on: 16 examples on 8 devices, 2 per device, encoded and
# taken as anchors one at a time (dropout is on, so masks must follow the example across resumes).
CACHED = ("EMBEDDING_CHUNK_SIZE=1", "LOSS_CHUNK_SIZE=1")
# PRNG_IMPL: the default is threefry2x32; rbg draws its bits with XLA's RngBitGenerator. (Not
# tested: rbg with gradient caching, whose executable read back from the persistent compilation
# cache deadlocks XLA:CPU's collectives on 8 devices; see train_step.DEFAULT_PRNG_IMPL.)
RBG = ('PRNG_IMPL="rbg"',)


@pytest.mark.parametrize("chunking", [(), CACHED, RBG],
                         ids=["plain_threefry", "gradient_cached_threefry", "plain_rbg"])
def test_kill_sigterm_resume_equals_uninterrupted_run(tmp_path, compile_cache, chunking):
  overrides = OVERRIDES + chunking
  reference = _params(_train_in_process(str(tmp_path / "reference"), overrides).state)

  model_dir = str(tmp_path / "interrupted")
  # 1. Killed without warning once its first checkpoint is written.
  process, timer = _start(_command(model_dir, overrides=overrides), compile_cache,
                          tmp_path / "run1.log")
  _read_until(process, "Saved checkpoint step 2")
  process.kill()
  process.wait()
  timer.cancel()
  manager = checkpoints.create_manager(model_dir, read_only=True)
  first_kill_step = manager.latest_step()
  assert first_kill_step is not None and first_kill_step < TRAIN_STEPS

  # The operative config carries every override.
  with open(os.path.join(model_dir, "config.gin")) as f:
    config_text = f.read()
  for expected in [f"TRAIN_STEPS = {TRAIN_STEPS}", "BATCH_SIZE = 16", "DROPOUT_RATE = 0.1",
                   "config.T5Config.num_layers = 1", "trainer.LoopConfig.checkpoint_period = 2",
                   f"'{model_dir}'", "'passages': 16",
                   *[o.replace("=", " = ").replace('"', "'") for o in chunking]]:
    assert expected in config_text, expected
  # The checkpoint records the PRNG implementation its dropout keys came from.
  with open(os.path.join(model_dir, "checkpoints", str(first_kill_step), "meta",
                         "metadata")) as f:
    assert json.load(f)["prng_impl"] == ("rbg" if RBG[0] in chunking else "threefry2x32")

  # 2. The same command resumes; SIGTERM (preemption) makes it checkpoint and exit cleanly.
  process, timer = _start(_command(model_dir, overrides=overrides), compile_cache,
                          tmp_path / "run2.log")
  _read_until(process, f"Resuming from checkpoint step {first_kill_step}")
  _read_until(process, f"step {first_kill_step + 1}/{TRAIN_STEPS}")
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate()
  timer.cancel()
  log = (tmp_path / "run2.log").read_text()
  assert process.returncode == 0, output + log[-3000:]
  assert "(preempted)" in output, output
  manager = checkpoints.create_manager(model_dir, read_only=True)
  preempted_step = manager.latest_step()
  assert first_kill_step < preempted_step < TRAIN_STEPS, output
  # The preemption checkpoint restores (right step, all finite).
  from samtone_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from samtone_jax import partitioning  # pylint: disable=g-import-not-at-top
  from samtone_jax.models import config as model_config  # pylint: disable=g-import-not-at-top
  abstract_params = {"model": ts.abstract_model_params_of(
      model_config.DualEncoderConfig(encoder=model_config.T5Config(
          vocab_size=8000, d_model=64, d_ff=128, num_heads=4, num_layers=1, d_kv=16),
          projection_dim=64), partitioning.create_mesh())}
  params = checkpoints.restore_params(model_dir, abstract_params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert set(params["model"]) == set(reference["model"])

  # 3. Finish in-process: exactly the parameters of the uninterrupted run.
  resumed = _train_in_process(model_dir, overrides)
  assert int(resumed.state.step) == TRAIN_STEPS
  jax.tree.map(np.testing.assert_array_equal, _params(resumed.state), reference)


def test_bad_binding_exits_with_gins_message(tmp_path, compile_cache):
  result = subprocess.run(
      _command(str(tmp_path / "bad"), "--gin.losses.LossConfig.temprature=0.5"),
      capture_output=True, text=True, env=compile_cache, cwd=REPO, timeout=300)
  assert result.returncode != 0
  assert "temprature" in result.stderr
  assert "Error in the gin configuration" in result.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_missing_gin_file_and_flag_rewriting():
  with pytest.raises(errors.ConfigError,
                     match="Error in the gin configuration: .*no_such_experiment.gin"):
    gin_config.parse_gin(["experiments/no_such_experiment.gin"], [])
  gin.clear_config()
  assert cli.rewrite_gin_args(
      ["prog", "--gin.MODEL_DIR=\"/x=y\"", "--gin_file=a.gin", "--gin.A.b=[1, 2]"]) == [
          "prog", "--gin_bindings=MODEL_DIR = \"/x=y\"", "--gin_file=a.gin",
          "--gin_bindings=A.b = [1, 2]"]


# gin/losses/'s 2x3 grid written out: (same_tower_negatives, bidirectional, use_hard_negatives).
LOSS_FILES = {"samtone": (True, False, False), "samtone_bidirectional": (True, True, False),
              "samtone_hard_negatives": (True, False, True), "in_batch": (False, False, False),
              "in_batch_bidirectional": (False, True, False),
              "in_batch_hard_negatives": (False, False, True)}


@pytest.mark.parametrize("name", sorted(LOSS_FILES))
def test_loss_files_bind_only_what_they_change(name):
  """Each gin/losses/ file gives its cell of the grid; the rest are LossConfig's defaults."""
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "gin", "losses", f"{name}.gin")
  with open(path) as f:
    bound = [line.split("=")[0].strip() for line in f
             if line.startswith("losses.LossConfig.")]
  gin.clear_config()
  try:
    gin_config.parse_gin([f"losses/{name}.gin"], [])
    loss = gin.get_configurable(losses.LossConfig)()
  finally:
    gin.clear_config()
  same_tower, bidirectional, hard_negatives = LOSS_FILES[name]
  assert loss == losses.LossConfig(temperature=0.01, learn_temperature=False,
                                   same_tower_negatives=same_tower, bidirectional=bidirectional,
                                   use_hard_negatives=hard_negatives, mask_duplicates=True)
  defaults = losses.LossConfig()
  changed = [f"losses.LossConfig.{field}" for field in ("same_tower_negatives", "bidirectional",
                                                         "use_hard_negatives")
             if getattr(loss, field) != getattr(defaults, field)]
  assert bound == changed


def test_old_loss_spelling_binds_the_same_config_with_a_warning(tmp_path):
  """`train_step.LossConfig.X` (deprecated for one release), in a gin file or a --gin. binding,
  and `losses.LossConfig.X` are one configurable: every spelling in one config applies."""
  from samtone_jax import losses  # pylint: disable=g-import-not-at-top
  old_file = tmp_path / "old_loss.gin"
  old_file.write_text("from __gin__ import dynamic_registration\n"
                      "from samtone_jax import train_step\n"
                      "train_step.LossConfig.bidirectional = True\n")
  gin.clear_config()
  try:
    with pytest.warns(FutureWarning, match="spell it losses.LossConfig"):
      gin_config.parse_gin(["losses/in_batch.gin", str(old_file), "runs/pretrain.gin"], [
          "train_step.LossConfig.temperature = 0.05"])
    loss = gin.get_configurable(losses.LossConfig)()
  finally:
    gin.clear_config()
  assert (loss.temperature, loss.same_tower_negatives, loss.bidirectional) == (0.05, False, True)


@pytest.mark.parametrize("size,num_layers,d_model", [("base", 12, 768), ("large", 24, 1024),
                                                     ("xl", 24, 2048), ("xxl", 24, 4096)])
def test_scan_remat_gin_applies_to_every_size(size, num_layers, d_model):
  """`--gin_file=models/scan_remat.gin` after a size file keeps the size and scans its layers."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_config.parse_gin([f"models/{size}.gin", "models/scan_remat.gin", "architectures/ade.gin",
                        "losses/samtone.gin", "runs/pretrain.gin"],
                       ["MIXTURE_OR_TASK_NAME = 'unused'", "MODEL_DIR = '/tmp/unused'"])
    bound = gin_config.configured_arguments(trainer.train)
    model = bound["model"]
  finally:
    gin.clear_config()
  assert (model.encoder.num_layers, model.encoder.d_model) == (num_layers, d_model)
  assert (model.encoder.scan_layers, model.encoder.remat, model.encoder.remat_policy) == (
      True, True, "full")
  assert isinstance(model, model_config_lib.DualEncoderConfig)
  assert model.tower_sharing == "ade" and model.projection_dim == 768


@pytest.mark.parametrize("experiment", ["msmarco", "multireqa"])
@pytest.mark.parametrize("size,num_layers,d_model", [(None, 12, 768), ("small", 8, 512),
                                                     ("large", 24, 1024), ("xl", 24, 2048)])
def test_experiment_size_is_one_more_gin_file(experiment, size, num_layers, d_model):
  """One experiment per dataset: GTR-Base by default, a models/<size>.gin after it sets the size."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  files = [f"experiments/{experiment}.gin"] + ([f"models/{size}.gin"] if size else [])
  try:
    gin_config.parse_gin(files, ["MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = None"])
    bound = gin_config.configured_arguments(trainer.train)
    model, data = bound["model"], bound["data"]
  finally:
    gin.clear_config()
  assert (model.encoder.num_layers, model.encoder.d_model) == (num_layers, d_model)
  assert model.tower_sharing == "sde" and model.projection_dim == 768
  assert data.batch_size == 512 and dict(data.task_feature_lengths) == {"queries": 64,
                                                                       "passages": 256}
  # Accelerator defaults survive the size file: bfloat16 activations, one-hot lookup.
  assert model.encoder.dtype == "bfloat16" and model.encoder.one_hot_embedding


# (The *_mined stage-2 files carry the same two lines; parsing them needs a mined negatives file.)
@pytest.mark.parametrize("experiment", ["msmarco", "multireqa", "beir_samtone"])
def test_accelerator_experiments_train_bfloat16_and_cpu_ones_float32(experiment):
  """Every pod/GPU experiment trains bfloat16 activations with one-hot lookup; the rest of the
  run configuration (PRNG_IMPL, attention dropout = dropout) is the run file's."""
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_config.parse_gin([f"experiments/{experiment}.gin"],
                         ["MODEL_DIR = '/tmp/unused'", "ATTENTION_DROPOUT_RATE = 0.0"])
    bound = gin_config.configured_arguments(trainer.train)
    model = bound["model"]
    gin.clear_config()
    gin_config.parse_gin(["experiments/demo_samtone.gin"], ["MODEL_DIR = '/tmp/unused'"])
    demo_model = gin_config.configured_arguments(trainer.train)["model"]
  finally:
    gin.clear_config()
  assert model.encoder.dtype == "bfloat16" and model.encoder.one_hot_embedding
  assert model.encoder.attention_dropout == 0.0 and model.encoder.dropout_rate == 0.1
  assert bound["prng_impl"] == "threefry2x32"
  assert demo_model.encoder.dtype == "float32" and not demo_model.encoder.one_hot_embedding
  assert demo_model.encoder.attention_dropout == demo_model.encoder.dropout_rate
