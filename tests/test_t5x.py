"""The t5x integration (samtone_jax/t5x_model.py, gin/t5x/): our dual encoder under t5x itself.

t5x is not on PyPI; these tests run where it is installed from its source (docs/t5x.md) and are
skipped otherwise. They check, against our own trainer and against numpy:
  * t5x partitions the parameters exactly as our trainer does, and Adafactor factors them;
  * t5x's partitioned `loss_fn` equals our trainer's jitted `train_step` loss (same params, same
    batch, 4x2 mesh);
  * `python -m t5x.train --gin_file=gin/t5x/demo.gin` trains on 1 CPU device, resumes from its
    checkpoint on 8 fake devices with NUM_PARTITIONS=2 (a 4x2 mesh), and the loss on the same
    batches falls;
  * `python -m t5x.infer` in score mode writes, for every example, the cosine similarity of the
    checkpoint's query and passage embeddings.
"""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip(
    "t5x", reason="t5x is optional and not on PyPI: install it from its source (docs/t5x.md) to "
    "run the t5x integration tests")

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
from t5x import adafactor
from t5x import train_state as t5x_train_state

from samtone_jax import checkpoints
from samtone_jax import evaluate
from samtone_jax import losses
from samtone_jax import optimizers
from samtone_jax import partitioning
from samtone_jax import t5x_model
from samtone_jax import train_step
from samtone_jax.models import config as config_lib
from samtone_jax.evaluation import runner
from samtone_jax.models import dual_encoder
from samtone_jax.tasks import feature_converter
from samtone_jax.tasks import features
import samtone_jax.tasks.all  # noqa: F401  (registers the demo task)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The end-to-end runs (gin/t5x/demo.gin with these overrides).
LENGTHS = {"queries": 16, "passages": 64}
LENGTHS_GIN = "{'queries': 16, 'passages': 64}"
BATCH = 16
NUM_CHECKED_SCORES = 16
# The in-process tests: a global batch of 8 on a (data 4, model 2) mesh.
_SHAPES = {features.QUERIES: (8, 6), features.PASSAGES: (8, 10), features.QUERY_IDS: (8,),
           features.PASSAGE_IDS: (8,)}


def _tiny_config() -> config_lib.DualEncoderConfig:
  return config_lib.DualEncoderConfig(
      encoder=config_lib.T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                  num_heads=2, dropout_rate=0.0),
      projection_dim=8)


def _random_batch(rng: np.random.Generator, batch: int, lq: int, lp: int) -> dict[str, np.ndarray]:
  """Token ids with padding tails, and one repeated query so the id masking is exercised."""
  queries = rng.integers(2, 128, (batch, lq)).astype(np.int32)
  passages = rng.integers(2, 128, (batch, lp)).astype(np.int32)
  queries[:, lq - 2:] = 0
  passages[:, lp - 3:] = 0
  queries[1] = queries[0]
  query_ids = np.arange(batch, dtype=np.int32)
  query_ids[1] = query_ids[0]
  return {features.QUERIES: queries, features.PASSAGES: passages,
          features.QUERY_IDS: query_ids,
          features.PASSAGE_IDS: np.arange(100, 100 + batch, dtype=np.int32)}


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def partitioned():
  """A t5x model, its train state and t5x's partitioner on a (data 4, model 2) mesh."""
  assert jax.device_count() == 8, "tests/conftest.py provides 8 fake CPU devices"
  loss_config = losses.LossConfig(temperature=0.05, same_tower_negatives=True,
                                  bidirectional=True)
  # min_dim_size_to_factor=4: factor even these tiny kernels (t5x default: dims >= 128).
  optimizer_def = adafactor.Adafactor(min_dim_size_to_factor=4,
                                      logical_factor_rules=t5x_model.adafactor_factor_rules())
  model = t5x_model.DualEncoderModel(_tiny_config(), loss_config, optimizer_def)
  partitioner = t5x_model.PjitPartitioner(num_partitions=2,
                                          logical_axis_rules=t5x_model.logical_axis_rules())
  variables = model.get_initial_variables(jax.random.PRNGKey(0), _SHAPES)
  state = t5x_train_state.FlaxOptimTrainState.create(optimizer_def, variables)
  return model, partitioner, state


def test_partitioner_mesh_honours_num_partitions(partitioned):
  _, partitioner, _ = partitioned
  assert dict(partitioner.mesh.shape) == {"data": 4, "model": 2}


def _flat_specs(tree) -> dict[str, tuple]:
  """{"a/b/kernel": spec as a tuple without trailing Nones} for a tree of PartitionSpecs."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  result = {}
  for path, spec in flat.items():
    spec = tuple(spec)
    while spec and spec[-1] is None:
      spec = spec[:-1]
    result[path] = spec
  return result


def test_params_shard_like_our_trainer_and_adafactor_factors_them(partitioned):
  model, partitioner, state = partitioned
  mesh = partitioning.create_mesh(data=4, model=2)
  built = train_step.build(model.model_config, model.loss_config, optimizers.OptimizerConfig(),
                           mesh, train_step.batch_spec(8, {"queries": 6, "passages": 10}))
  ours = _flat_specs(jax.tree.map(lambda s: s.spec, built.state_shardings.params["model"]))
  theirs = _flat_specs(partitioner.get_mesh_axes(state).params["model"])
  assert theirs == ours
  # Spot checks against the rules: heads, mlp and vocab on 'model', embed replicated.
  assert theirs["encoder/layers_0/mlp/wi_0/kernel"] == (None, "model")
  assert theirs["encoder/layers_0/attention/out/kernel"] == ("model",)
  assert theirs["token_embedder/embedding"] == ("model",)
  assert theirs["projection/kernel"] == ()
  # Adafactor: its factor map needs a rule for every axis name (t5x's standard rules lack
  # 'projection'), and the [d, P] projection kernel gets factored moments ([d] and [P] vectors,
  # no full [d, P] one); t5x factors rank-2 kernels along their two largest dims.
  with pytest.raises(KeyError, match="projection"):
    t5x_train_state.FlaxOptimTrainState.create(
        adafactor.Adafactor(logical_factor_rules=adafactor.standard_logical_factor_rules()),
        model.get_initial_variables(jax.random.PRNGKey(0), _SHAPES))
  projection_state = state.param_states["model"]["projection"]["kernel"]
  assert sorted([projection_state.v_row.shape, projection_state.v_col.shape]) == [(8,), (16,)]
  assert projection_state.v.shape == (1,)


def test_scanned_layers_shard_like_our_trainer_with_per_layer_adafactor():
  """T5Config.scan_layers under t5x: the stacked 'layers' axis is replicated, as in our trainer,
  and t5x's Adafactor keeps one set of factored statistics per layer (its BATCH factor dim)."""
  cfg = _tiny_config()
  cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, num_layers=2,
                                                             scan_layers=True))
  optimizer_def = adafactor.Adafactor(min_dim_size_to_factor=4,
                                      logical_factor_rules=t5x_model.adafactor_factor_rules())
  model = t5x_model.DualEncoderModel(cfg, losses.LossConfig(temperature=0.05), optimizer_def)
  partitioner = t5x_model.PjitPartitioner(num_partitions=2,
                                          logical_axis_rules=t5x_model.logical_axis_rules())
  state = t5x_train_state.FlaxOptimTrainState.create(
      optimizer_def, model.get_initial_variables(jax.random.PRNGKey(0), _SHAPES))
  mesh = partitioning.create_mesh(data=4, model=2)
  built = train_step.build(cfg, model.loss_config, optimizers.OptimizerConfig(), mesh,
                           train_step.batch_spec(8, {"queries": 6, "passages": 10}))
  ours = _flat_specs(jax.tree.map(lambda s: s.spec, built.state_shardings.params["model"]))
  theirs = _flat_specs(partitioner.get_mesh_axes(state).params["model"])
  assert theirs == ours
  assert theirs["encoder/layers/mlp/wi_0/kernel"] == (None, None, "model")
  wi = state.param_states["model"]["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert sorted([wi.v_row.shape, wi.v_col.shape]) == [(2, 16), (2, 32)]


def test_t5x_loss_equals_our_trainer_loss(partitioned):
  """Same params, same batch: t5x's partitioned loss_fn vs our trainer's jitted train_step."""
  model, partitioner, state = partitioned
  batch = _random_batch(np.random.default_rng(1), 8, 6, 10)
  axes = partitioner.get_mesh_axes(state)
  t5x_loss_fn = partitioner.partition(
      lambda params, batch: model.loss_fn(params, batch, None)[0],
      in_axis_resources=(axes.params, partitioner.data_partition_spec),
      out_axis_resources=None)
  t5x_loss = float(t5x_loss_fn(state.params, batch))

  mesh = partitioning.create_mesh(data=4, model=2)
  built = train_step.build(model.model_config, model.loss_config, optimizers.OptimizerConfig(),
                           mesh, train_step.batch_spec(8, {"queries": 6, "passages": 10}))
  params = {"model": jax.tree.map(np.asarray, flax.core.unfreeze(state.params["model"])),
            "loss": {}}
  own_state = train_step.TrainState(step=np.zeros((), np.int32), params=params,
                                    opt_state=built.tx.init(params))
  own_state = jax.device_put(own_state, built.state_shardings)
  global_batch = train_step.as_global_batch(batch, built.batch_shardings)
  _, metrics = built.train_step(own_state, global_batch, jax.random.PRNGKey(0))
  own_loss = float(metrics["loss_sum"] / metrics["num_examples"])
  assert np.isfinite(t5x_loss) and t5x_loss > 0
  np.testing.assert_allclose(t5x_loss, own_loss, rtol=1e-5)


def test_score_batch_is_the_cosine_of_the_tower_embeddings(partitioned):
  model, _, state = partitioned
  batch = _random_batch(np.random.default_rng(2), 8, 6, 10)
  scores, embeddings = model.score_batch(state.params, batch, return_intermediates=True)
  variables = {"params": state.params["model"]}
  q = np.asarray(model.module.apply(variables, batch[features.QUERIES],
                                    method=dual_encoder.DualEncoder.encode_queries), np.float64)
  p = np.asarray(model.module.apply(variables, batch[features.PASSAGES],
                                    method=dual_encoder.DualEncoder.encode_documents), np.float64)
  cosine = np.sum(q * p, 1) / np.linalg.norm(q, axis=1) / np.linalg.norm(p, axis=1)
  np.testing.assert_allclose(np.asarray(scores), cosine, atol=1e-6)
  predictions, aux = model.predict_batch_with_aux(state.params, {"passages": batch["passages"]})
  np.testing.assert_allclose(np.asarray(predictions), p, atol=1e-6)
  assert set(aux) == {"document_embeddings"} and set(embeddings) == {"query_embeddings",
                                                                       "document_embeddings"}


def test_ade_fte_embedder_stays_frozen_under_t5x_adafactor():
  """ADE-FTE: one t5x Adafactor step moves the towers but not the shared frozen embedder."""
  config = _tiny_config()
  config = config_lib.DualEncoderConfig(encoder=config.encoder, tower_sharing="ade_fte",
                                        projection_dim=config.projection_dim)
  optimizer_def = adafactor.Adafactor(min_dim_size_to_factor=4,
                                      logical_factor_rules=t5x_model.adafactor_factor_rules())
  model = t5x_model.DualEncoderModel(config, losses.LossConfig(), optimizer_def)
  state = t5x_train_state.FlaxOptimTrainState.create(
      optimizer_def, model.get_initial_variables(jax.random.PRNGKey(0), _SHAPES))
  batch = _random_batch(np.random.default_rng(3), 8, 6, 10)
  grads = jax.jit(jax.grad(lambda params: model.loss_fn(params, batch, None)[0]))(state.params)
  new_state = jax.jit(lambda s, g: s.apply_gradient(g, learning_rate=0.1))(state, grads)
  before, after = state.params["model"], new_state.params["model"]
  np.testing.assert_array_equal(after["token_embedder"]["embedding"],
                                before["token_embedder"]["embedding"])
  assert not np.allclose(after["query_projection"]["kernel"], before["query_projection"]["kernel"])
  with pytest.raises(ValueError, match="weight_decay_rate"):
    t5x_model.DualEncoderModel(config, losses.LossConfig(),
                               adafactor.Adafactor(weight_decay_rate=1e-3))


# ----------------------------- python -m t5x.train / t5x.infer -----------------------------------


def _run_t5x(script: str, args: list[str], *, devices: int, log_path: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with open(log_path, "w") as log:
    result = subprocess.run([sys.executable, "-m", f"t5x.{script}", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
  with open(log_path) as log:
    text = log.read()
  assert result.returncode == 0, f"t5x.{script} failed (log {log_path}):\n{text[-4000:]}"
  return text


def _train_metrics(model_dir: str) -> dict[str, dict[int, float]]:
  """{"loss": {step: value}, ...} from t5x's TensorBoard summaries in model_dir/train."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  metrics = {}
  for path in glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("tensor") and value.tensor.dtype == tf.float32.as_datatype_enum:
          metrics.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return metrics


def _restore_numpy(state_dir: str) -> dict:
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                              is_leaf=lambda x: hasattr(x, "shape"))
  return checkpointer.restore(state_dir, restore_args=restore_args)


@pytest.fixture(scope="module")
def t5x_runs(tmp_path_factory):
  """Train 4 steps on 1 device, resume to 8 on a 4x2 mesh of 8 devices, then score."""
  root = tmp_path_factory.mktemp("t5x")
  model_dir = str(root / "model")
  common = ["--gin_file=gin/t5x/demo.gin", f'--gin.MODEL_DIR="{model_dir}"',
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS_GIN}", f"--gin.BATCH_SIZE={BATCH}",
            "--gin.RANDOM_SEED=0",
            # A fixed data order: the resumed run restarts the input at the same batches.
            "--gin.train/utils.DatasetConfig.seed=0",
            "--gin.utils.SaveCheckpointConfig.period=2",
            "--gin.utils.create_learning_rate_scheduler.warmup_steps=1"]
  first = _run_t5x("train", common + ["--gin.TRAIN_STEPS=4"], devices=1,
                   log_path=str(root / "train_1.log"))
  first_metrics = _train_metrics(model_dir)
  resumed = _run_t5x("train", common + ["--gin.TRAIN_STEPS=8", "--gin.NUM_PARTITIONS=2"],
                     devices=8, log_path=str(root / "train_2.log"))
  scores_dir = str(root / "scores")
  _run_t5x("infer", ["--gin_file=gin/t5x/demo_score.gin",
                     f"--gin.TASK_FEATURE_LENGTHS={LENGTHS_GIN}",
                     f'--gin.CHECKPOINT_PATH="{model_dir}/checkpoint_8"',
                     f'--gin.INFER_OUTPUT_DIR="{scores_dir}"',
                     "--gin.utils.DatasetConfig.batch_size=64"],
           devices=1, log_path=str(root / "infer.log"))
  return dict(model_dir=model_dir, scores_dir=scores_dir, first_log=first, resumed_log=resumed,
              first_metrics=first_metrics, all_metrics=_train_metrics(model_dir))


def test_t5x_train_resumes_on_a_4x2_mesh_and_the_loss_falls(t5x_runs):
  model_dir = t5x_runs["model_dir"]
  assert sorted(t5x_runs["first_metrics"]["loss"]) == [2, 4]
  assert f"Restoring checkpoint from {model_dir}/checkpoint_4" in t5x_runs["resumed_log"]
  loss = t5x_runs["all_metrics"]["loss"]
  assert sorted(loss) == [2, 4, 6, 8]
  # Steps 4-5 see the batches of steps 0-1 again (fixed seed, input restarted on resume).
  assert loss[6] < 0.5 * loss[2], loss
  assert all(np.isfinite(v) for v in loss.values())
  # The resumed run trained on t5x's (data 4, model 2) mesh: its checkpoint says so.
  tree = ocp.PyTreeCheckpointer().metadata(
      os.path.join(model_dir, "checkpoint_8", "state")).item_metadata.tree
  kernel = tree["target"]["model"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert list(kernel.sharding.shape) == [4, 2]
  assert tuple(kernel.sharding.partition_spec) == (None, "model")
  restored = _restore_numpy(os.path.join(model_dir, "checkpoint_8", "state"))
  assert int(restored["state"]["step"]) == 8


def test_t5x_infer_scores_are_the_checkpoint_similarities(t5x_runs):
  path = os.path.join(t5x_runs["scores_dir"], "demo_manpages-score.jsonl-00000-of-00001")
  with open(path) as f:
    scores = [json.loads(line)["score"] for line in f]
  task = seqio.get_mixture_or_task("demo_manpages")
  dataset = task.get_dataset(LENGTHS, split="train", shuffle=False, num_epochs=1,
                             use_cached=False)
  converted = feature_converter.DualEncoderFeatureConverter()(dataset, LENGTHS)
  assert len(scores) == sum(1 for _ in dataset)
  first = next(iter(converted.batch(NUM_CHECKED_SCORES).as_numpy_iterator()))

  params = _restore_numpy(os.path.join(t5x_runs["model_dir"], "checkpoint_8", "state"))
  params = params["target"]["model"]
  config = config_lib.DualEncoderConfig(
      encoder=config_lib.T5Config(vocab_size=8000, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                  num_heads=4, dropout_rate=0.0),
      projection_dim=64)  # gin/models/tiny.gin with the demo vocabulary (gin/t5x/demo.gin)
  module = dual_encoder.DualEncoder(config)
  q = module.apply({"params": params}, first[features.QUERIES],
                   method=dual_encoder.DualEncoder.encode_queries)
  p = module.apply({"params": params}, first[features.PASSAGES],
                   method=dual_encoder.DualEncoder.encode_documents)
  q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
  cosine = np.sum(q * p, 1) / np.linalg.norm(q, axis=1) / np.linalg.norm(p, axis=1)
  np.testing.assert_allclose(scores[:NUM_CHECKED_SCORES], cosine, atol=1e-5)
  assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)


def test_t5x_checkpoint_evaluates_like_our_checkpoint_with_the_same_params(t5x_runs, tmp_path):
  """samtone-evaluate (and encode / export, which load the same way) read t5x's checkpoint: the
  params are t5x's as orbax restores them, and the metrics equal those of our own checkpoint
  holding the same params."""
  model_dir = t5x_runs["model_dir"]
  t5x_params = _restore_numpy(os.path.join(model_dir, "checkpoint_8", "state"))["target"]["model"]
  config = config_lib.DualEncoderConfig(
      encoder=config_lib.T5Config(vocab_size=8000, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                  num_heads=4, dropout_rate=0.0),
      projection_dim=64)  # gin/models/tiny.gin with the demo vocabulary (gin/t5x/demo.gin)
  for path in (model_dir, os.path.join(model_dir, "checkpoint_8")):
    loaded = runner.load_model(path, config)
    assert loaded.step_dir == os.path.join(model_dir, "checkpoint_8")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params["model"]),
                 t5x_params)

  ours = str(tmp_path / "ours")
  manager = checkpoints.create_manager(ours)
  checkpoints.save(manager, 8, {"params": {"model": jax.device_put(t5x_params)}}, {"step": 8})
  manager.close()
  common = dict(model=config, eval_sets=["demo_manpages_test"], feature_lengths=LENGTHS)
  theirs_metrics = evaluate.evaluate(checkpoint_path=model_dir, **common)
  our_metrics = evaluate.evaluate(checkpoint_path=ours, **common)
  assert theirs_metrics and all(name.startswith("demo_manpages_test/") for name in theirs_metrics)
  assert theirs_metrics == our_metrics


def test_converted_gtr_checkpoint_restores_in_t5x_train_to_the_bit(tmp_path):
  """A GTR-layout directory (sentence-transformers) converted by `samtone-export
  --gin.EXPORT_FORMAT="t5x"` is the initial checkpoint of `python -m t5x.train` with
  gin/t5x/initial_checkpoint.gin: t5x's own restore reads it, and the checkpoint t5x saves before
  its first step holds the GTR parameters to the bit with a fresh (all-zero) Adafactor state.
  Resuming that run restores t5x's own optimizer state: the assignment map is not applied."""
  from samtone_jax import export as export_entry  # pylint: disable=g-import-not-at-top
  from samtone_jax import exporting  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import vocab  # pylint: disable=g-import-not-at-top
  config = config_lib.DualEncoderConfig(  # gin/models/tiny.gin with the demo vocabulary
      encoder=config_lib.T5Config(vocab_size=8000, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                  num_heads=4, dropout_rate=0.0),
      projection_dim=64)
  tokens = np.ones((1, 4), np.int32)
  params = flax.linen.unbox(dual_encoder.DualEncoder(config).init(
      jax.random.PRNGKey(5), tokens, tokens)["params"])
  rng = np.random.default_rng(5)  # perturb every leaf (layer norms start at exactly 1)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32)
                        + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  gtr_dir = tmp_path / "gtr"
  exporting.export_model(config, params, step_dir=str(tmp_path / "none"),
                         sentencepiece_model=vocab.demo_vocabulary().sp_model,
                         max_seq_lengths=LENGTHS, export_dir=str(gtr_dir))
  export_entry.export(checkpoint_path=str(gtr_dir), model=config,
                      export_dir=str(tmp_path / "t5x_init"), task="demo_manpages",
                      feature_lengths=LENGTHS, export_format="t5x")

  model_dir = str(tmp_path / "model")
  common = ["--gin_file=gin/t5x/demo.gin", "--gin_file=gin/t5x/initial_checkpoint.gin",
            f'--gin.MODEL_DIR="{model_dir}"',
            f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/t5x_init/checkpoint_0"',
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS_GIN}", f"--gin.BATCH_SIZE={BATCH}",
            "--gin.RANDOM_SEED=0", "--gin.utils.create_learning_rate_scheduler.warmup_steps=1"]
  first = _run_t5x("train", common + ["--gin.TRAIN_STEPS=1"], devices=1,
                   log_path=str(tmp_path / "train_1.log"))
  assert f"Initializing parameters from specific T5X checkpoint {tmp_path}/t5x_init" in first
  assert "Skipping optimizer param=state/param_states" in first  # the assignment map ran

  # t5x saved the restored state before its first step: the GTR parameters, bit for bit.
  restored = _restore_numpy(os.path.join(model_dir, "checkpoint_0", "state"))
  assert int(restored["state"]["step"]) == 0
  got, want = restored["target"]["model"], params
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32),
                                  np.asarray(b, np.float32).view(np.uint32),
                                  err_msg=jax.tree_util.keystr(path))
  moments = jax.tree.leaves(restored["state"]["param_states"])
  assert moments and all(not np.any(m) for m in moments)  # t5x's fresh Adafactor state
  after_one = _restore_numpy(os.path.join(model_dir, "checkpoint_1", "state"))
  assert int(after_one["state"]["step"]) == 1
  assert any(np.any(m) for m in jax.tree.leaves(after_one["state"]["param_states"]))

  resumed = _run_t5x("train", common + ["--gin.TRAIN_STEPS=2"], devices=1,
                     log_path=str(tmp_path / "train_2.log"))
  assert f"Restoring checkpoint from {model_dir}/checkpoint_1" in resumed
  assert "Skipping optimizer param" not in resumed  # optimizer state restored, not re-created
  assert "Initializing param=" not in resumed
  assert os.path.isdir(os.path.join(model_dir, "checkpoint_2"))
