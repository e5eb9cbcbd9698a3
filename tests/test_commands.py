"""The `samtone_jax.evaluate` and `samtone_jax.encode` commands, run as a user runs them.

A tiny demo model is trained in-process; each command then runs in a subprocess on its checkpoint.
References are independent of the commands' code paths: pytrec_eval scores the written run file,
and the written embeddings equal the trained parameters applied to sentencepiece's token ids.
"""

import gzip
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import pytrec_eval

from fixtures import tasks_data
from samtone_jax import gin_config
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/demo_samtone.gin"
EVAL_SET = "demo_manpages_test"
LENGTHS = '{"queries": 8, "passages": 16}'
MODEL_BINDINGS = ("config.T5Config.num_layers=1", f"TASK_FEATURE_LENGTHS={LENGTHS}")
TRAIN_BINDINGS = MODEL_BINDINGS + ("TRAIN_STEPS=3", "BATCH_SIZE=16", "EVAL_TASKS=[]",
                                   "WARMUP_STEPS=1", "trainer.LoopConfig.checkpoint_period=3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(run directory, TrainResult) of a 3-step tiny demo run."""
  model_dir = str(tmp_path_factory.mktemp("run"))
  result = gin_config.run_from_gin([EXPERIMENT], [f'MODEL_DIR = "{model_dir}"', *TRAIN_BINDINGS])
  return model_dir, result


def _run(module, model_dir, *bindings):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, "-m", module, f"--gin_file={EXPERIMENT}",
             f'--gin.CHECKPOINT_PATH="{model_dir}"', *[f"--gin.{b}" for b in MODEL_BINDINGS],
             *[f"--gin.{b}" for b in bindings]]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_run_from_gin_leaves_the_operative_config_in_the_run_directory(trained):
  """`trainer.train` writes config.gin itself, also when called in-process (`run_from_gin`)."""
  model_dir, _ = trained
  with open(os.path.join(model_dir, "config.gin")) as f:
    text = f.read()
  for expected in ("TRAIN_STEPS = 3", "BATCH_SIZE = 16", "config.T5Config.num_layers = 1",
                   f"MODEL_DIR = '{model_dir}'", "trainer.LoopConfig.checkpoint_period = 3"):
    assert expected in text, expected


def test_evaluate_command_metrics_equal_pytrec_eval_of_its_run_file(trained, tmp_path):
  """With EVAL_EMBEDDINGS_DIR: the corpus goes through shards on disk, same metrics as memory."""
  model_dir, train_result = trained
  output_dir, embeddings_dir = tmp_path / "eval", tmp_path / "embeddings"
  result = _run("samtone_jax.evaluate", model_dir, f"EVAL_TASKS=['{EVAL_SET}']",
                f'EVAL_OUTPUT_DIR="{output_dir}"', f"EVAL_FEATURE_LENGTHS={LENGTHS}",
                f'EVAL_EMBEDDINGS_DIR="{embeddings_dir}"')
  ids, shards = encoding.load_embedding_shards(str(embeddings_dir / EVAL_SET))
  assert len(ids) == sum(len(s) for s in shards) == 2579  # the whole man-page corpus
  with open(output_dir / "metrics.json") as f:
    metrics = json.load(f)
  assert set(metrics) == {f"{EVAL_SET}/{m}" for m in ("mrr@10", "recall@10", "ndcg@10")}
  for name, value in metrics.items():
    assert f"{name}: {value:.4f}" in result.stdout

  qrels = {}
  with open(os.path.join(REPO, "samtone_jax/tasks/data/manpages/qrels/test.tsv")) as f:
    next(f)
    for line in f:
      query_id, doc_id, score = line.rstrip("\n").split("\t")
      qrels.setdefault(query_id, {})[doc_id] = int(score)
  with open(output_dir / f"{EVAL_SET}.trec") as f:
    run = pytrec_eval.parse_run(f)
  per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_10"}).evaluate(run)
  mean = lambda m: sum(v[m] for v in per_query.values()) / len(qrels)
  assert metrics[f"{EVAL_SET}/ndcg@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-6)
  assert metrics[f"{EVAL_SET}/recall@10"] == pytest.approx(mean("recall_10"), abs=1e-6)
  assert metrics[f"{EVAL_SET}/ndcg@10"] > 0
  # The in-memory evaluation of the same parameters in this process gives the same numbers.
  in_memory = runner.evaluate_params(train_result.built.model, train_result.state.params,
                                     train_result.mesh, [EVAL_SET],
                                     metrics=["mrr@10", "recall@10", "ndcg@10"],
                                     feature_lengths={"queries": 8, "passages": 16})
  assert in_memory == pytest.approx(metrics, abs=1e-6)


def test_encode_command_writes_the_models_query_embeddings(trained, tmp_path):
  model_dir, train_result = trained
  output_dir = tmp_path / "queries"
  _run("samtone_jax.encode", model_dir, f'ENCODE_SET="{EVAL_SET}"', 'ENCODE_SIDE="queries"',
       f'ENCODE_OUTPUT_DIR="{output_dir}"', f"EVAL_FEATURE_LENGTHS={LENGTHS}")
  ids, shards = encoding.load_embedding_shards(str(output_dir))
  embeddings = np.concatenate(shards)

  queries = {}  # the test queries, read from the shipped files (not through the eval set)
  with open(os.path.join(REPO, "samtone_jax/tasks/data/manpages/qrels/test.tsv")) as f:
    next(f)
    test_ids = {line.split("\t")[0] for line in f}
  with gzip.open(os.path.join(REPO, "samtone_jax/tasks/data/manpages/queries.jsonl.gz"), "rt") as f:
    for line in f:
      row = json.loads(line)
      if row["_id"] in test_ids:
        queries[row["_id"]] = row["text"].strip()
  assert sorted(ids) == sorted(queries)

  sp = tasks_data.sp_processor()
  tokens = np.asarray([tasks_data.expected_ids(sp, queries[i], 8) for i in ids], np.int32)
  model = train_result.built.model
  params = jax.device_get(train_result.state.params["model"])
  expected = model.apply({"params": params}, tokens, method=model.encode_queries)
  np.testing.assert_allclose(embeddings, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_encode_command_stores_bfloat16_with_eval_embedding_dtype(trained, tmp_path):
  """EVAL_EMBEDDING_DTYPE="bfloat16": the float32 command's embeddings, rounded to bfloat16."""
  model_dir, _ = trained
  for dtype in ("float32", "bfloat16"):
    _run("samtone_jax.encode", model_dir, f'ENCODE_SET="{EVAL_SET}"', 'ENCODE_SIDE="queries"',
         f'ENCODE_OUTPUT_DIR="{tmp_path / dtype}"', f"EVAL_FEATURE_LENGTHS={LENGTHS}",
         f'EVAL_EMBEDDING_DTYPE="{dtype}"')
  ids32, shards32 = encoding.load_embedding_shards(str(tmp_path / "float32"))
  ids16, shards16 = encoding.load_embedding_shards(str(tmp_path / "bfloat16"))
  assert ids16 == ids32 and all(s.dtype == ml_dtypes.bfloat16 for s in shards16)
  np.testing.assert_array_equal(np.concatenate(shards16),
                                np.concatenate(shards32).astype(ml_dtypes.bfloat16))
