"""`python -m samtone_jax.probe`: the embedding probes of a trained demo checkpoint.

Reference: the top-1 distances recomputed here in numpy (float64 brute force over all pairs)
from the embeddings of the same checkpoint, loaded with `runner.load_model`.
"""

import json
import os
import subprocess
import sys

import gin
import matplotlib.image
import numpy as np
import pytest

from samtone_jax import gin_config
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/demo_samtone.gin"
EVAL_SET = "demo_manpages_test"
# A 2-step, 1-layer demo model (gin syntax, as after --gin.).
OVERRIDES = ("TRAIN_STEPS=2", "BATCH_SIZE=16", 'TASK_FEATURE_LENGTHS={"queries": 8, "passages": 16}',
             "EVAL_TASKS=[]", "WARMUP_STEPS=1", "config.T5Config.num_layers=1",
             "trainer.LoopConfig.checkpoint_period=2")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("probe") / "run")
  try:
    gin_config.run_from_gin([EXPERIMENT], [f'MODEL_DIR = "{model_dir}"', *OVERRIDES],
                            keep_config=True)
    model_config = gin.get_configurable("samtone_jax.models.config.DualEncoderConfig")()
    lengths = gin_config.gin_macro("TASK_FEATURE_LENGTHS")
  finally:
    gin.clear_config()
  return model_dir, model_config, lengths


def _brute_force(sources, targets, exclude_self=False):
  sources, targets = sources.astype(np.float64), targets.astype(np.float64)
  squared = (np.sum(sources ** 2, 1)[:, None] + np.sum(targets ** 2, 1)[None]
             - 2 * sources @ targets.T)
  if exclude_self:
    np.fill_diagonal(squared, np.inf)
  return np.sqrt(np.maximum(squared.min(axis=1), 0))


def test_probe_command_writes_pngs_and_summary_equal_to_numpy(trained_run, tmp_path):
  model_dir, model_config, lengths = trained_run
  output_dir = tmp_path / "probes"
  command = [sys.executable, "-m", "samtone_jax.probe", f"--gin_file={EXPERIMENT}",
             *[f"--gin.{o}" for o in OVERRIDES], f'--gin.CHECKPOINT_PATH="{model_dir}"',
             f'--gin.PROBE_SET="{EVAL_SET}"', f'--gin.PROBE_OUTPUT_DIR="{output_dir}"',
             "--gin.probe.probe.max_tsne_points=150"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert f"t-SNE: {output_dir / 'tsne.png'}" in result.stdout

  for name in ("tsne.png", "top1_distances.png"):
    image = matplotlib.image.imread(output_dir / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a drawn figure
  with open(output_dir / "probes.json") as f:
    summary = json.load(f)

  # The same checkpoint's embeddings: queries through the query tower, corpus through the
  # document tower, at the experiment's eval lengths.
  loaded = runner.load_model(model_dir, model_config)
  data = runner.get_eval_set(EVAL_SET, lengths)
  encode_queries, encode_documents = loaded.encode_fns()
  queries = encoding.encode_texts(list(data.queries.values()), encode_queries, data.vocabulary,
                                  data.query_length, mesh=loaded.mesh)
  documents = encoding.encode_texts(list(data.corpus.values()), encode_documents,
                                    data.vocabulary, data.document_length, mesh=loaded.mesh)
  assert (summary["num_queries"], summary["num_documents"]) == (len(queries), len(documents))
  expected = {"query_to_document": _brute_force(queries, documents),
              "query_to_query": _brute_force(queries, queries, exclude_self=True),
              "document_to_document": _brute_force(documents, documents, exclude_self=True)}
  for name, distances in expected.items():
    assert summary[f"mean_{name}"] == pytest.approx(distances.mean(), abs=1e-4)
    assert summary[f"median_{name}"] == pytest.approx(np.median(distances), abs=1e-4)


def test_probe_command_missing_checkpoint_exits_with_message(tmp_path):
  command = [sys.executable, "-m", "samtone_jax.probe", f"--gin_file={EXPERIMENT}",
             f'--gin.CHECKPOINT_PATH="{tmp_path / "nothing"}"', f'--gin.PROBE_SET="{EVAL_SET}"',
             f'--gin.PROBE_OUTPUT_DIR="{tmp_path / "out"}"']
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode != 0
  assert "No samtone_jax or t5x checkpoint under" in result.stderr
  assert not (tmp_path / "out").exists()  # nothing half-written
