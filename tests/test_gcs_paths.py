"""Run, output and embedding directories on a non-local file system (gs:// on TPU pods).

No network: TensorFlow's gfile has an in-memory file system, `ram://`, which takes the same code
path as gs:// (a URL that Python's `open`/`os.makedirs` cannot handle). Each test writes through
the project's code into `ram://...`, reads the files back through gfile and compares them with an
independent reference: the same writer on a local directory, gin's own config string, the values
written. The working directory is a fresh tmp_path that must stay empty (old code silently made a
local `ram:/...` directory there).
"""

import json
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from samtone_jax import checkpoints
from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax import trainer
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import retrieval
from samtone_jax.tasks import eval_sets

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch, request):
  """Runs each test in an empty directory and checks that nothing local was created there."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield
  assert not os.listdir(cwd), f"{request.node.name} wrote locally: {os.listdir(cwd)}"


def _ram_dir(name: str) -> str:
  path = f"ram://samtone_test/{name}"
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)
  return path


def _read(path: str, mode: str = "r"):
  with tf.io.gfile.GFile(path, mode) as f:
    return f.read()


def _encode_fn(tokens):
  """A fixed bag-of-tokens embedding: tokens int32 [b, L] -> float32 [b, 6] (numpy, no jit)."""
  table = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
  return table[np.asarray(tokens)].sum(axis=1)


def _eval_set() -> eval_sets.EvalSet:
  rng = np.random.default_rng(1)
  corpus = {f"doc{i}": " ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for i in range(13)}
  queries = {f"q{i}": " ".join(rng.choice(WORDS, size=3)) for i in range(4)}
  qrels = {f"q{i}": {f"doc{(3 * i) % 13}": 1, f"doc{(3 * i + 1) % 13}": 2} for i in range(4)}
  return eval_sets.EvalSet(name="ram_fixture", queries=queries, corpus=corpus, qrels=qrels,
                           vocabulary=seqio.ByteVocabulary(), query_length=8,
                           document_length=12, protocol="beir")


def test_path_helpers():
  assert io_utils.is_local("/tmp/x") and io_utils.is_local("rel/x")
  assert io_utils.is_local("file:///tmp/x")
  assert not io_utils.is_local("gs://bucket/run") and not io_utils.is_local("ram://x")
  assert io_utils.abspath("gs://bucket/run") == "gs://bucket/run"
  assert io_utils.abspath("rel") == os.path.join(os.getcwd(), "rel")
  # Orbax gets MODEL_DIR/checkpoints as given: abspath used to turn it into <cwd>/gs:/bucket/...
  assert checkpoints.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"


def test_write_config_to_ram():
  model_dir = _ram_dir("config") + "/run"
  gin.clear_config()
  try:
    gin.parse_config([f"MODEL_DIR = '{model_dir}'", "BATCH_SIZE = 64"])
    path = trainer.write_config(model_dir, gin.config_str())
    assert path == model_dir + "/config.gin"
    expected = gin.config_str()
  finally:
    gin.clear_config()
  text = _read(path)
  assert text == expected
  assert f"MODEL_DIR = '{model_dir}'" in text and "BATCH_SIZE = 64" in text


def test_trainer_metrics_log_to_ram(monkeypatch):
  # clu's TensorBoard writer makes its directory with etils.epath, which knows gs:// (via
  # tf.io.gfile) but not ram://; here it logs only, and metrics.jsonl (our code) goes to ram://.
  create_writer = trainer.metric_writers.create_default_writer
  monkeypatch.setattr(trainer.metric_writers, "create_default_writer",
                      lambda logdir, **kwargs: create_writer(logdir, **{**kwargs,
                                                                        "just_logging": True}))
  model_dir = _ram_dir("metrics") + "/run"
  io_utils.makedirs(model_dir)
  log = trainer._MetricsLog(model_dir)  # pylint: disable=protected-access
  log.write("train", 10, {"loss": 0.5, "accuracy": 0.25})
  log.write("eval", 10, {"demo/mrr@10": 0.75})
  log.write("train", 20, {"loss": 0.125, "accuracy": 0.5})
  log.close()
  lines = _read(model_dir + "/metrics.jsonl").splitlines()
  assert [json.loads(line) for line in lines] == [
      {"kind": "train", "step": 10, "loss": 0.5, "accuracy": 0.25},
      {"kind": "eval", "step": 10, "demo/mrr@10": 0.75},
      {"kind": "train", "step": 20, "loss": 0.125, "accuracy": 0.5}]


def test_resolve_checkpoint_dir_on_ram():
  run = _ram_dir("ckpt") + "/run"
  for step in (5, 12):
    io_utils.makedirs(f"{run}/checkpoints/{step}/{checkpoints.STATE_ITEM}")
  step_dir = f"{run}/checkpoints/12"
  for path in (run, f"{run}/checkpoints", step_dir):
    assert checkpoints.resolve_step_dir(path) == step_dir
  assert not checkpoints.is_samtone_checkpoint(_ram_dir("empty"))


def test_embedding_shards_on_ram_equal_in_memory_encoding(tmp_path):
  eval_set = _eval_set()
  ids = list(eval_set.corpus)
  texts = [eval_set.corpus[i] for i in ids]
  expected = encoding.encode_texts(texts, _encode_fn, eval_set.vocabulary, 12, batch_size=4)
  directory = _ram_dir("shards")
  paths = encoding.encode_to_shards(ids, texts, _encode_fn, eval_set.vocabulary, 12, directory,
                                    shard_size=5, batch_size=4)
  assert paths == [f"{directory}/embeddings-{s:05d}.npy" for s in range(3)]
  assert json.loads(_read(directory + "/manifest.json")) == {
      "num_documents": 13, "dim": 6, "dtype": "float32", "process_count": 1,
      "shard_sizes": [5, 5, 3], "shard_processes": [0, 0, 0]}
  assert json.loads(_read(directory + "/ids-00002.json")) == ids[10:]
  loaded_ids, shards = encoding.load_embedding_shards(directory)
  assert loaded_ids == ids
  assert not any(isinstance(s, np.memmap) for s in shards)  # remote: read into memory
  np.testing.assert_array_equal(np.concatenate(shards), expected)

  # The same shards written locally are byte-identical and memory-mapped.
  local = str(tmp_path / "local_shards")
  encoding.encode_to_shards(ids, texts, _encode_fn, eval_set.vocabulary, 12, local,
                            shard_size=5, batch_size=4)
  for name in sorted(os.listdir(local)):
    with open(os.path.join(local, name), "rb") as f:
      assert _read(f"{directory}/{name}", "rb") == f.read(), name
  assert all(isinstance(s, np.memmap) for s in encoding.load_embedding_shards(local)[1])

  with pytest.raises(errors.EmbeddingShardError, match="manifest.json is missing"):
    encoding.load_embedding_shards(_ram_dir("no_shards"))


def test_retrieval_results_and_run_file_on_ram(tmp_path):
  eval_set = _eval_set()
  output_dir = _ram_dir("results") + "/eval"
  kwargs = dict(k=5, batch_size=4, ignore_identical_ids=False)
  results = retrieval.evaluate_eval_set(eval_set, _encode_fn, _encode_fn, output_dir=output_dir,
                                        embeddings_dir=_ram_dir("results_embeddings"), **kwargs)
  # Reference: the same evaluation in memory, written to a local directory.
  local_dir = tmp_path / "local_results"
  local_results = retrieval.evaluate_eval_set(eval_set, _encode_fn, _encode_fn,
                                              output_dir=str(local_dir), **kwargs)
  assert results == local_results
  run = retrieval.retrieve(eval_set, _encode_fn, _encode_fn, **kwargs)
  run_path = f"{output_dir}/ram_fixture.trec"
  assert retrieval.read_trec_run(run_path) == run
  with open(local_dir / "ram_fixture.trec") as f:
    assert _read(run_path) == f.read()
  with open(local_dir / "ram_fixture.json") as f:
    local_json = json.load(f)
  written = json.loads(_read(f"{output_dir}/ram_fixture.json"))
  assert written["run_file"] == run_path
  assert written == {**local_json, "run_file": run_path}
  assert written["metrics"] == results and written["num_queries"] == 4

  # write_trec_run / read_trec_run on their own: the file read back equals the run.
  other = {"q1": {"d2": 0.5, "d1": 0.5, "d3": -1.25}, "q0": {"d9": 3.0}}
  path = _ram_dir("trec") + "/other.trec"
  io_utils.makedirs(os.path.dirname(path))
  retrieval.write_trec_run(path, other, tag="t")
  assert retrieval.read_trec_run(path) == other
  assert _read(path) == ("q1 Q0 d2 1 0.5 t\nq1 Q0 d1 2 0.5 t\nq1 Q0 d3 3 -1.25 t\n"
                         "q0 Q0 d9 1 3.0 t\n")
