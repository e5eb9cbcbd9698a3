"""The encoder-decoder through the one trainer: kill + SIGTERM + resume ends bit-identical to an
uninterrupted run (the pattern of test_main's dual-encoder test, with the real SKILL demo gin
file); the jitted seq2seq step on a (4, 2) mesh equals one device's; the QA eval's exact match
equals `qa_metrics` on fixed predictions; a dual encoder starts from an encoder-decoder
checkpoint's encoder."""

import gzip
import os
import signal
import sys

import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import gin_config
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import train_step as ts
from samtone_jax.evaluation import closed_book_qa
from samtone_jax.evaluation import qa_metrics
from samtone_jax.models import config as model_config
from samtone_jax.models import encoder_decoder as ed
from samtone_jax.models import hf_import
from samtone_jax.models import seq2seq_model
from samtone_jax.tasks import skill
from samtone_jax.tasks import vocab

from test_main import _read_until, _start, compile_cache  # pylint: disable=g-bad-import-order,unused-import

EXPERIMENT = "experiments/skill_wordnet_demo.gin"
TRAIN_STEPS = 8
OVERRIDES = (
    f"TRAIN_STEPS={TRAIN_STEPS}",
    "BATCH_SIZE=16",
    'TASK_FEATURE_LENGTHS={"inputs": 16, "targets": 8}',
    "EVAL_TASKS=[]",
    "DROPOUT_RATE=0.1",
    "WARMUP_STEPS=2",
    "config.T5Config.num_layers=1",
    "trainer.LoopConfig.log_period=1",
    "trainer.LoopConfig.checkpoint_period=2",
)
T5 = model_config.T5Config(vocab_size=96, d_model=16, d_ff=32, num_heads=4, num_layers=1,
                           d_kv=4, relative_attention_num_buckets=8,
                           relative_attention_max_distance=16, dropout_rate=0.1)


def _command(model_dir):
  return [sys.executable, "-m", "samtone_jax.main", f"--gin_file={EXPERIMENT}",
          f'--gin.MODEL_DIR="{model_dir}"', *[f"--gin.{o}" for o in OVERRIDES]]


def _train_in_process(model_dir):
  return gin_config.run_from_gin([EXPERIMENT], [f'MODEL_DIR = "{model_dir}"', *OVERRIDES])


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_encoder_decoder_kill_sigterm_resume_equals_uninterrupted_run(tmp_path, compile_cache):
  reference_result = _train_in_process(str(tmp_path / "reference"))
  assert isinstance(reference_result.built.model, seq2seq_model.EncoderDecoderModel)
  assert "decoder" in reference_result.state.params["model"]
  reference = _params(reference_result.state)

  model_dir = str(tmp_path / "interrupted")
  # 1. Killed without warning once its first checkpoint is written.
  process, timer = _start(_command(model_dir), compile_cache, tmp_path / "run1.log")
  _read_until(process, "Saved checkpoint step 2")
  process.kill()
  process.wait()
  timer.cancel()
  first_kill_step = checkpoints.create_manager(model_dir, read_only=True).latest_step()
  assert first_kill_step is not None and first_kill_step < TRAIN_STEPS
  with open(os.path.join(model_dir, "config.gin")) as f:
    config_text = f.read()
  assert "trainer.train.model = @seq2seq_model.EncoderDecoderModel()" in config_text
  assert "'inputs': 16" in config_text

  # 2. The same command resumes; SIGTERM makes it checkpoint and exit cleanly.
  process, timer = _start(_command(model_dir), compile_cache, tmp_path / "run2.log")
  _read_until(process, f"Resuming from checkpoint step {first_kill_step}")
  _read_until(process, f"step {first_kill_step + 1}/{TRAIN_STEPS}")
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate()
  timer.cancel()
  log = (tmp_path / "run2.log").read_text()
  assert process.returncode == 0, output + log[-3000:]
  assert "(preempted)" in output, output
  preempted_step = checkpoints.create_manager(model_dir, read_only=True).latest_step()
  assert first_kill_step < preempted_step < TRAIN_STEPS, output

  # 3. Finish in-process: exactly the parameters of the uninterrupted run.
  resumed = _train_in_process(model_dir)
  assert int(resumed.state.step) == TRAIN_STEPS
  jax.tree.map(np.testing.assert_array_equal, _params(resumed.state), reference)


def _batch(batch_size=8, input_length=12, target_length=6, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, T5.vocab_size, (batch_size, input_length)).astype(np.int32)
  targets = rng.integers(2, T5.vocab_size, (batch_size, target_length)).astype(np.int32)
  for row in range(batch_size):  # ragged, EOS-terminated, 0-padded
    inputs[row, 3 + row % 8:] = 0
    inputs[row, 2 + row % 8] = ed.EOS_ID
    targets[row, 1 + row % 5:] = 0
    targets[row, row % 5] = ed.EOS_ID
  return {seq2seq_model.ENCODER_INPUT_TOKENS: inputs,
          seq2seq_model.DECODER_INPUT_TOKENS: np.asarray(ed.shift_right(targets)),
          seq2seq_model.DECODER_TARGET_TOKENS: targets,
          seq2seq_model.DECODER_LOSS_WEIGHTS: (targets > 0).astype(np.int32)}


@pytest.mark.usefixtures("fast_compile")
def test_seq2seq_step_on_4x2_mesh_equals_one_device():
  model = seq2seq_model.EncoderDecoderModel(model_config.EncoderDecoderConfig(t5=T5))
  # A small step: Adam divides each gradient by its own scale, so float-summation noise in a
  # near-zero gradient moves a parameter by up to ~learning_rate.
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=0)
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                 partitioning.MESH_AXES)
  host_batch = _batch()
  results = []
  for mesh in (one_device, partitioning.create_mesh(4, 2)):
    spec = model.batch_spec(8, {"inputs": 12, "targets": 6})
    built = ts.build(model, losses.LossConfig(), optimizer, mesh, spec)
    assert built.model is model  # train_step.build handed it to seq2seq_step.build
    state = built.init_state(jax.random.PRNGKey(0))
    rng = jax.device_put(jax.random.PRNGKey(1), built.rng_sharding)
    step_metrics = []
    for _ in range(2):
      state, metrics = built.train_step(state, ts.as_global_batch(host_batch,
                                                                  built.batch_shardings), rng)
      step_metrics.append(jax.device_get(metrics))
    results.append((_params(state), step_metrics))
    if mesh.shape["model"] == 2:
      assert state.params["model"]["decoder"]["logits_dense"]["kernel"].sharding.spec == (
          jax.sharding.PartitionSpec(None, "model"))
  (params, metrics), (s_params, s_metrics) = results
  for m, s in zip(metrics, s_metrics):
    assert set(m) == set(s) and "temperature" not in m
    for k in m:
      np.testing.assert_allclose(s[k], m[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s_params,
               params)


def test_eval_exact_match_equals_qa_metrics_on_fixed_predictions():
  skill.register_demo()
  vocabulary = vocab.wordnet_vocabulary()
  examples = list(closed_book_qa.qa_examples(skill.DEMO_QA_TASK, "dev", 32))[:23]
  # The gold answers, read from the file itself (first 23 lines of qa_dev.txt).
  with gzip.open(os.path.join(vocab.WORDNET_DATA_DIR, "qa_dev.txt.gz"), "rt") as f:
    file_answers = [line.rstrip("\n").split("\t")[1].split("|") for line in f][:23]
  assert [e["answers"] for e in examples] == file_answers
  # Fixed predictions: a gold answer (with an article and punctuation: SQuAD normalisation), the
  # first gold answer, or a wrong one; all spelled in the demo vocabulary's pieces, so that they
  # decode back to themselves.
  predictions = []
  for i, answers in enumerate(file_answers):
    predictions.append({0: f"the {answers[-1]}.", 1: answers[0], 2: "mammal genus"}[i % 3])
  assert all(vocabulary.decode(vocabulary.encode(p)) == p for p in predictions)
  by_question = {tuple(e["inputs"]): vocabulary.encode(p) + [ed.EOS_ID]
                 for e, p in zip(examples, predictions)}

  def decode_batch(inputs):  # [5, 32] -> [5, 40], 0 after EOS; empty padding rows decode to ""
    out = np.zeros([inputs.shape[0], 40], np.int32)
    for r, row in enumerate(inputs):
      ids = by_question[tuple(row)] if row.any() else [ed.EOS_ID]
      out[r, :len(ids)] = ids
    return out

  rows = closed_book_qa.predict_rows(examples, decode_batch, vocabulary, batch_size=5)
  assert len(rows) == 23
  expected = qa_metrics.exact_match(predictions, file_answers)
  assert 0 < expected < 1
  assert closed_book_qa.exact_match_of(rows) == pytest.approx(expected, abs=1e-12)
  assert [r["correct"] for r in rows] == [qa_metrics.exact_match_one(p, a)
                                         for p, a in zip(predictions, file_answers)]


@pytest.mark.usefixtures("fast_compile")
def test_dual_encoder_initial_checkpoint_takes_the_encoder_of_an_encoder_decoder(tmp_path):
  mesh = partitioning.create_mesh()
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=0)
  model = seq2seq_model.EncoderDecoderModel(model_config.EncoderDecoderConfig(t5=T5))
  built = ts.build(model, losses.LossConfig(), optimizer, mesh,
                   model.batch_spec(8, {"inputs": 12, "targets": 6}))
  state = built.init_state(jax.random.PRNGKey(3))
  state, _ = built.train_step(state, ts.as_global_batch(_batch(), built.batch_shardings),
                              jax.device_put(jax.random.PRNGKey(4), built.rng_sharding))
  manager = checkpoints.create_manager(str(tmp_path / "skill"))
  checkpoints.save(manager, 1, state, {"step": 1, "seed": 0})
  ed_params = _params(state)["model"]
  assert checkpoints.is_encoder_decoder_checkpoint(str(tmp_path / "skill"))

  de_config = model_config.DualEncoderConfig(encoder=T5, projection_dim=8, tower_sharing="ade")
  de_built = ts.build(de_config, losses.LossConfig(), optimizer, mesh,
                      ts.batch_spec(8, {"queries": 8, "passages": 8}))
  fresh = de_built.init_state(jax.random.PRNGKey(5))
  fresh_host = _params(fresh)
  loaded = checkpoints.load_initial_params(str(tmp_path / "skill"), fresh.params, de_config)
  loaded_host = jax.tree.map(np.asarray, jax.device_get(loaded))
  for side in ("query", "document"):
    jax.tree.map(np.testing.assert_array_equal, loaded_host["model"][f"{side}_encoder"],
                 ed_params["encoder"])
    np.testing.assert_array_equal(loaded_host["model"][f"{side}_token_embedder"]["embedding"],
                                  ed_params["token_embedder"]["embedding"])
    # The projection is not in the encoder-decoder: it keeps its fresh initialisation.
    jax.tree.map(np.testing.assert_array_equal, loaded_host["model"][f"{side}_projection"],
                 fresh_host["model"][f"{side}_projection"])
  # Placed like the fresh params (sharded, ready for the step).
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh.params)):
    assert a.sharding == b.sharding


@pytest.mark.usefixtures("fast_compile")
def test_encoder_decoder_initial_checkpoint_imports_hugging_face_t5(tmp_path):
  from test_encoder_decoder import random_hf_t5, save  # pylint: disable=g-import-not-at-top
  hf = random_hf_t5("gated-gelu", tied=False, seed=7)
  save(hf, tmp_path / "hf")
  config, _ = hf_import.import_t5_encoder_decoder(tmp_path / "hf")
  model = seq2seq_model.EncoderDecoderModel(config)
  optimizer = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=0)
  built = ts.build(model, losses.LossConfig(), optimizer, partitioning.create_mesh(),
                   model.batch_spec(8, {"inputs": 12, "targets": 6}))
  state = built.init_state(jax.random.PRNGKey(0))
  params = checkpoints.load_initial_params(str(tmp_path / "hf"), state.params, model)
  # The reference: HF's own tensors, by name (lm_head is the untied head, stored transposed).
  host = jax.tree.map(np.asarray, jax.device_get(params["model"]))
  np.testing.assert_array_equal(host["token_embedder"]["embedding"],
                                hf.shared.weight.detach().numpy())
  np.testing.assert_array_equal(host["decoder"]["logits_dense"]["kernel"],
                                hf.lm_head.weight.detach().numpy().T)
  np.testing.assert_array_equal(
      host["decoder"]["layers_0"]["self_attention"]["query"]["kernel"],
      hf.decoder.block[0].layer[0].SelfAttention.q.weight.detach().numpy().T)
