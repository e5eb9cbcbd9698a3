"""The encoder-decoder refuses the dual encoder's options instead of ignoring them.

Gradient caching / loss row chunking (ChunkConfig), a non-default contrastive LossConfig (a loss
file, hard negatives) and the retrieval-eval options of LoopConfig mean nothing to the seq2seq
step; `train_step.build` and `trainer.train` raise naming each binding, and the command exits with
status 1 and one message before anything is compiled or written. The defaults still build.
"""

import os
import subprocess
import sys

import jax
import pytest

from samtone_jax import errors
from samtone_jax import gin_config
from samtone_jax import losses
from samtone_jax import model_kinds
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax import trainer
from samtone_jax.models import config as model_config
from samtone_jax.models import seq2seq_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/skill_wordnet_demo.gin"
T5 = model_config.T5Config(vocab_size=96, d_model=16, d_ff=32, num_heads=4, num_layers=1, d_kv=4,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16)
OPTIMIZER = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=0)


def _model():
  return seq2seq_model.EncoderDecoderModel(model_config.EncoderDecoderConfig(t5=T5))


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunks=ts.ChunkConfig(embedding_chunk_size=2)),
     "EMBEDDING_CHUNK_SIZE = 2 (train_step.ChunkConfig.embedding_chunk_size)"),
    (dict(chunks=ts.ChunkConfig(loss_chunk_size=1)),
     "LOSS_CHUNK_SIZE = 1 (train_step.ChunkConfig.loss_chunk_size)"),
    (dict(loss_config=losses.LossConfig(use_hard_negatives=True)),
     "losses.LossConfig.use_hard_negatives = True"),
    (dict(loss_config=losses.LossConfig(same_tower_negatives=False, temperature=0.05)),
     "losses.LossConfig.temperature = 0.05"),
])
def test_build_refuses_dual_encoder_options(kwargs, message):
  model = _model()
  spec = model.batch_spec(8, {"inputs": 12, "targets": 6})
  arguments = {"loss_config": losses.LossConfig(), "chunks": ts.ChunkConfig(), **kwargs}
  with pytest.raises(ValueError) as raised:
    ts.build(model, arguments["loss_config"], OPTIMIZER, partitioning.create_mesh(), spec,
             arguments["chunks"])
  assert message in str(raised.value)
  assert "EncoderDecoderModel" in str(raised.value)


def test_every_refused_binding_is_named_once():
  kind = model_kinds.of(_model())
  loop = trainer.LoopConfig(train_steps=1, eval_metrics=["mrr@10"], eval_embeddings_dir="/tmp/e",
                            eval_embedding_dtype="bfloat16", eval_ignore_identical_ids=True)
  with pytest.raises(ValueError) as raised:
    kind.check_options(losses.LossConfig(bidirectional=True, learn_temperature=True),
                       ts.ChunkConfig(embedding_chunk_size=4, loss_chunk_size=2), loop)
  lines = str(raised.value).splitlines()[1:]
  assert [line.split(" = ")[0].strip() for line in lines] == [
      "EMBEDDING_CHUNK_SIZE", "LOSS_CHUNK_SIZE", "losses.LossConfig.learn_temperature",
      "losses.LossConfig.bidirectional", "EVAL_METRICS", "EVAL_IGNORE_IDENTICAL_IDS",
      "EVAL_EMBEDDINGS_DIR", "EVAL_EMBEDDING_DTYPE"]
  # The defaults, including gin's list spelling of EVAL_METRICS, pass; the dual encoder takes all.
  kind.check_options(losses.LossConfig(), ts.ChunkConfig(),
                     trainer.LoopConfig(train_steps=1, eval_metrics=[]))
  model_kinds.of(model_config.DualEncoderConfig()).check_options(
      losses.LossConfig(use_hard_negatives=True), ts.ChunkConfig(embedding_chunk_size=4), loop)


def test_defaults_build_and_step():
  model = _model()
  spec = model.batch_spec(8, {"inputs": 12, "targets": 6})
  built = ts.build(model, losses.LossConfig(), OPTIMIZER, partitioning.create_mesh(), spec,
                   ts.ChunkConfig())
  assert built.model is model
  # Shapes only: the abstract state has the model's params and no loss params.
  assert built.abstract_state.params["loss"] == {}
  assert jax.tree.leaves(built.abstract_state.params["model"])


def test_trainer_refuses_before_writing_anything(tmp_path):
  model_dir = str(tmp_path / "run")
  with pytest.raises(errors.ConfigError, match=r"LOSS_CHUNK_SIZE = 2 \(train_step"):
    gin_config.run_from_gin([EXPERIMENT], [f'MODEL_DIR = "{model_dir}"', "LOSS_CHUNK_SIZE = 2"])
  assert not os.path.exists(model_dir)


def test_command_exits_with_one_message(tmp_path):
  model_dir = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("SAMTONE_DEBUG", None)
  result = subprocess.run(
      [sys.executable, "-m", "samtone_jax.main", f"--gin_file={EXPERIMENT}",
       f'--gin.MODEL_DIR="{model_dir}"', "--gin.EMBEDDING_CHUNK_SIZE=4",
       "--gin.losses.LossConfig.use_hard_negatives=True"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Error: The encoder-decoder (seq2seq_model.EncoderDecoderModel) does not use" in (
      result.stderr), result.stderr[-3000:]
  assert "EMBEDDING_CHUNK_SIZE = 4 (train_step.ChunkConfig.embedding_chunk_size)" in result.stderr
  assert "losses.LossConfig.use_hard_negatives = True" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(model_dir)


def test_architecture_files_are_refused_at_the_gin_boundary():
  """An architecture file (ADE-FTE: a frozen token embedder) binds DualEncoderConfig, which an
  encoder-decoder run never builds: parsing refuses it; the dual encoder's run takes it."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    with pytest.raises(errors.ConfigError, match=(
        r"config.DualEncoderConfig.tower_sharing = 'ade_fte', "
        r"config.DualEncoderConfig.pooling = 'first': a dual-encoder architecture")):
      gin_config.parse_gin([EXPERIMENT, "architectures/ade_fte.gin"],
                           ['MODEL_DIR = "/unused"', 'config.DualEncoderConfig.pooling = "first"'])
    gin.clear_config()
    gin_config.parse_gin([EXPERIMENT, "architectures/sde.gin"], ['MODEL_DIR = "/unused"'])
    gin.clear_config()
    gin_config.parse_gin(["experiments/demo_samtone.gin", "architectures/ade_fte.gin"],
                         ['MODEL_DIR = "/unused"'])
    assert gin.query_parameter("config.DualEncoderConfig.tower_sharing") == "ade_fte"
  finally:
    gin.clear_config()


def test_aot_compile_refuses_before_compiling(tmp_path):
  """launch/aot_compile.py compiles the configured run's step: the same refusal, status 1."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  env.pop("SAMTONE_DEBUG", None)
  report = tmp_path / "report.json"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "aot_compile.py"), "--topology=v5e:2x2",
       f"--gin_file={EXPERIMENT}", "--gin.LOSS_CHUNK_SIZE=4", f"--json_output={report}"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Error: The encoder-decoder" in result.stderr
  assert "LOSS_CHUNK_SIZE = 4 (train_step.ChunkConfig.loss_chunk_size)" in result.stderr
  assert "Traceback" not in result.stderr and not report.exists()
