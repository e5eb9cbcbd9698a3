"""trainer.train as a library call: it learns, stops on a non-finite loss, starts from a checkpoint.

Tiny model on the embedded man-page data; references are the untrained model's retrieval
metrics (same code path), the checkpointed parameters themselves, and the step the loss broke.
"""

import importlib
import json
import os
import re

import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax import trainer
from samtone_jax.evaluation import runner
from samtone_jax.models import config as model_config
from samtone_jax.tasks import demo
from samtone_jax.tasks import eval_sets as eval_sets_lib

MODEL = model_config.DualEncoderConfig(
    encoder=model_config.T5Config(vocab_size=8000, d_model=64, d_ff=128, num_heads=4,
                                  num_layers=2, d_kv=16, dropout_rate=0.0),
    projection_dim=64, tower_sharing="sde")
LENGTHS = {"queries": 16, "passages": 32}


def _data(batch_size):
  return trainer.DataConfig(mixture_or_task_name=demo.TRAIN_TASK, task_feature_lengths=LENGTHS,
                            batch_size=batch_size)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_training_lowers_loss_and_beats_untrained_model(tmp_path, monkeypatch):
  metrics = ("mrr@10", "ndcg@10")
  # The eval set is read once and reused by both in-training evaluations (steps 30 and 60).
  loads = []
  importlib.import_module(trainer.DataConfig.tasks_module)  # registers the demo set, as train() does
  load = eval_sets_lib._EVAL_SETS[demo.TEST_EVAL_SET]  # pylint: disable=protected-access
  monkeypatch.setitem(eval_sets_lib._EVAL_SETS, demo.TEST_EVAL_SET,  # pylint: disable=protected-access
                      lambda: loads.append(1) or load())
  result = trainer.train(
      model_dir=str(tmp_path / "run"), model=MODEL, loss=losses.LossConfig(temperature=0.05),
      optimizer=optimizers.OptimizerConfig(name="adamw", learning_rate=2e-3, warmup_steps=10,
                                           decay="linear", decay_steps=60),
      data=_data(32),
      loop=trainer.LoopConfig(train_steps=60, log_period=10, checkpoint_period=60,
                              eval_period=30, eval_sets=(demo.TEST_EVAL_SET,),
                              eval_metrics=metrics, eval_feature_lengths=LENGTHS,
                              eval_embeddings_dir=str(tmp_path / "embeddings")),
      seed=0)
  assert len(loads) == 1
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train_losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(train_losses) == 6
  # Below the first window's mean and below chance: -log(1 / (2B - 1)) with SamToNe's 2B - 1
  # candidates per query.
  assert train_losses[-1] < 0.7 * train_losses[0], train_losses
  assert train_losses[-1] < np.log(2 * 32 - 1), train_losses
  for key in ("accuracy", "learning_rate", "grad_norm", "examples_per_second",
              "seconds_per_step"):
    assert key in records[0]
  # Called without gin, train still records its configuration: the arguments, as comments.
  with open(tmp_path / "run" / "config.gin") as f:
    config_lines = f.read().splitlines()
  assert config_lines[0] == "# trainer.train was called directly, not through gin; its arguments:"
  assert f"#   loss = {losses.LossConfig(temperature=0.05)!r}" in config_lines
  assert "#   seed = 0" in config_lines

  untrained = result.built.init_state(jax.random.PRNGKey(0))
  before = runner.evaluate_params(result.built.model, untrained.params, result.mesh,
                                   [demo.TEST_EVAL_SET], metrics=metrics,
                                   feature_lengths=LENGTHS)
  after = result.eval_metrics
  # Evaluated from shards on disk (EVAL_EMBEDDINGS_DIR): the in-memory evaluation's numbers.
  assert os.path.exists(tmp_path / "embeddings" / demo.TEST_EVAL_SET / "manifest.json")
  in_memory = runner.evaluate_params(result.built.model, result.state.params, result.mesh,
                                     [demo.TEST_EVAL_SET], metrics=metrics,
                                     feature_lengths=LENGTHS)
  assert in_memory == pytest.approx(after, abs=1e-6)
  key = f"{demo.TEST_EVAL_SET}/mrr@10"
  assert after[key] > before[key] + 0.02, (before, after)
  assert [r for r in records if r["kind"] == "eval"][-1][key] == after[key]

  # Multi-stage training: a second run starts from this run's parameters (not its optimizer).
  second = trainer.train(
      model_dir=str(tmp_path / "second"), model=MODEL, loss=losses.LossConfig(),
      optimizer=optimizers.OptimizerConfig(name="adafactor"), data=_data(32),
      loop=trainer.LoopConfig(train_steps=0), seed=1,
      initial_checkpoint_path=str(tmp_path / "run"))
  assert int(second.state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, _host(second.state.params["model"]),
               _host(result.state.params["model"]))


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
  model_dir = str(tmp_path / "diverges")
  # A learning rate of 1e30 without clipping overflows the parameters after the first step, so
  # the second step's loss is not finite.
  with pytest.raises(trainer.NonFiniteLossError) as error:
    trainer.train(
        model_dir=model_dir, model=MODEL, loss=losses.LossConfig(),
        optimizer=optimizers.OptimizerConfig(name="adamw", learning_rate=1e30, warmup_steps=0,
                                             decay="constant", grad_clip_norm=None),
        data=trainer.DataConfig(mixture_or_task_name=demo.TRAIN_TASK,
                                task_feature_lengths={"queries": 8, "passages": 16},
                                batch_size=8),
        loop=trainer.LoopConfig(train_steps=6, log_period=3, checkpoint_period=1), seed=0)
  message = str(error.value)
  match = re.search(r"Non-finite loss at step (\d+) .*Last good checkpoint: (\S+) \(step (\d+)\)",
                    message)
  assert match, message
  bad_step, good_dir, good_step = int(match[1]), match[2], int(match[3])
  assert bad_step == 1 and good_step == 1
  assert os.path.isdir(good_dir)
  # Nothing was saved after the bad step, and the last good checkpoint is finite.
  manager = checkpoints.create_manager(model_dir, read_only=True)
  assert manager.all_steps() == [1]
  abstract = {"model": ts.abstract_model_params_of(MODEL, partitioning.create_mesh())}
  params = checkpoints.restore_params(good_dir, abstract)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# bfloat16 activations may move MRR@10 on the demo test set by at most this much (absolute) after
# the same 60 steps: per-query reciprocal ranks are 0, 1/10 .. 1, so on its ~300 queries a few
# rank swaps between near-tied documents move the mean by ~0.01.
BFLOAT16_MRR_TOLERANCE = 0.03


def test_bfloat16_activations_train_the_demo_to_float32_mrr(tmp_path):
  """The accelerator experiments' bfloat16 activations (parameters, optimizer state and loss in
  float32) reach float32's retrieval quality on a short demo run."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  key = f"{demo.TEST_EVAL_SET}/mrr@10"
  results = {}
  for dtype in ("float32", "bfloat16"):
    model = dataclasses.replace(MODEL, encoder=dataclasses.replace(MODEL.encoder, dtype=dtype))
    result = trainer.train(
        model_dir=str(tmp_path / dtype), model=model, loss=losses.LossConfig(temperature=0.05),
        optimizer=optimizers.OptimizerConfig(name="adamw", learning_rate=2e-3, warmup_steps=10,
                                             decay="linear", decay_steps=60),
        data=_data(32),
        loop=trainer.LoopConfig(train_steps=60, log_period=60, checkpoint_period=60,
                                eval_sets=(demo.TEST_EVAL_SET,), eval_metrics=("mrr@10",),
                                eval_feature_lengths=LENGTHS),
        seed=0)
    # Parameters stay float32 whatever the activations.
    assert {x.dtype for x in jax.tree.leaves(result.state.params)} == {np.dtype("float32")}
    results[dtype] = result.eval_metrics[key]
  print(results)
  assert results["float32"] > 0.05, results  # the run learned something to compare
  assert abs(results["bfloat16"] - results["float32"]) <= BFLOAT16_MRR_TOLERANCE, results
