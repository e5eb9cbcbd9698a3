"""`python -m samtone_jax.mine` end to end on a BEIR-layout fixture, and the mined file read back.

A tiny checkpoint (the demo experiment with one layer, random weights) mines a fixture with planted
duplicates of positives (the same text under another id; a text that differs only after the
passage length) and a query with two positives. Checked: the command's bytes equal an in-process
run's; the negatives equal the brute-force reference (tests/test_mining.py) over the model's
embeddings; bad input exits 1 with a message and writes nothing; the file read by the seqio task
gives batches whose negatives are the SentencePiece tokens of the expected texts.
"""

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import gin_config
from samtone_jax import losses
from samtone_jax import partitioning
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import mining
from samtone_jax.evaluation import runner
from samtone_jax.models import config as model_config_lib
from samtone_jax.models import dual_encoder
from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import hard_negatives
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab

import test_mining  # the brute-force reference  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.usefixtures("fast_compile")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/demo_samtone.gin"
LENGTHS = {"queries": 8, "passages": 16}
BINDINGS = (f"TASK_FEATURE_LENGTHS={json.dumps(LENGTHS)}", "config.T5Config.num_layers=1",
            "mining.MiningConfig.num_negatives=3", "mining.MiningConfig.range_max=8")
TASK = "beir_fixture_train"
TOPICS = ("copy a string to a buffer", "compare two strings", "open a file descriptor",
          "close a file descriptor", "read from a socket", "write to a socket",
          "allocate memory on the heap", "free allocated memory", "print formatted output",
          "parse command line options", "commit changes to the repository",
          "show the working tree status", "create a new branch", "merge two branches",
          "encrypt data with a cipher", "compute a message digest", "sort lines of text",
          "search text for a pattern")
LONG = " and then the text goes on for many more words than the passage length keeps"


def write_fixture(root):
  """BEIR layout: 18 documents + 2 planted duplicates of doc0, 9 train queries (q1 has 2
  positives)."""
  os.makedirs(root / "qrels")
  corpus = {f"doc{i}": f"This page explains how to {t}." + (LONG if i == 0 else "")
            for i, t in enumerate(TOPICS)}
  corpus["dup_same_text"] = corpus["doc0"]
  corpus["dup_after_cut"] = corpus["doc0"] + " A tail far beyond the cut."
  with open(root / "corpus.jsonl", "w") as f:
    for doc_id, text in corpus.items():
      f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
  with open(root / "queries.jsonl", "w") as f:
    for i, topic in enumerate(TOPICS[:9]):
      f.write(json.dumps({"_id": f"q{i}", "text": f"how to {topic}"}) + "\n")
  with open(root / "qrels" / "train.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for i in range(9):
      f.write(f"q{i}\tdoc{i}\t1\n")
    f.write("q1\tdoc17\t1\nq2\tdoc16\t0\n")
  return corpus


def parse(bindings):
  gin.clear_config()
  gin_config.parse_gin(["runs/mine.gin", EXPERIMENT], list(bindings))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("mine")
  corpus = write_fixture(root / "data" / "beir" / "fixture")
  vocabulary = vocab.t5_vocabulary(vocab.DEMO_VOCAB_PATH)
  beir.register_beir_dataset("fixture", str(root / "data" / "beir" / "fixture"),
                             vocabulary=vocabulary)
  parse(BINDINGS)
  model_config = gin.get_configurable(model_config_lib.DualEncoderConfig)()
  gin.clear_config()
  mesh = partitioning.create_mesh(-1, 1)
  model = dual_encoder.DualEncoder(model_config)
  tokens = np.ones((1, 8), np.int32)
  params, _ = partitioning.sharded_init(lambda rng: model.init(rng, tokens, tokens), mesh,
                                        jax.random.key(1))
  checkpoint = str(root / "stage1")
  checkpoints.save(checkpoints.create_manager(checkpoint), 0,
                   {"params": {"model": params["params"]}, "step": np.int32(0)}, {"step": 0})
  env = dict(os.environ, PYTHONPATH=REPO, SAMTONE_DATA_DIR=str(root / "data"),
             SAMTONE_VOCAB_PATH=vocab.DEMO_VOCAB_PATH, TF_CPP_MIN_LOG_LEVEL="2",
             # The same XLA options as this process (fast_compile), so the floats are the same.
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return root, checkpoint, model_config, corpus, env


def mine_in_process(checkpoint, output_dir, *extra):
  return gin_config.run_from_gin(
      ["runs/mine.gin", EXPERIMENT], [*BINDINGS, f'CHECKPOINT_PATH="{checkpoint}"',
                                      f'MINE_TASK="{TASK}"', f'MINE_OUTPUT_DIR="{output_dir}"',
                                      *extra], mining.mine_to_directory)


def command(checkpoint, output_dir, task=TASK, *extra):
  return [sys.executable, "-m", "samtone_jax.mine", f"--gin_file={EXPERIMENT}",
          f'--gin.CHECKPOINT_PATH="{checkpoint}"', f'--gin.MINE_TASK="{task}"',
          f'--gin.MINE_OUTPUT_DIR="{output_dir}"', *[f"--gin.{b}" for b in BINDINGS], *extra]


@pytest.fixture(scope="module")
def mined(setup):
  root, checkpoint, _, _, _ = setup
  output_dir = str(root / "in_process")
  manifest = mine_in_process(checkpoint, output_dir)
  with open(os.path.join(output_dir, "hard_negatives.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return output_dir, manifest, lines


def test_command_writes_the_same_bytes_as_an_in_process_run(setup, mined):
  root, checkpoint, _, _, env = setup
  output_dir = str(root / "command")
  result = subprocess.run(command(checkpoint, output_dir), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("hard_negatives.jsonl", "manifest.json"):
    with open(os.path.join(output_dir, name), "rb") as a, open(os.path.join(mined[0], name),
                                                             "rb") as b:
      assert a.read() == b.read(), name
  assert sorted(os.listdir(output_dir)) == ["hard_negatives.jsonl", "manifest.json"]


def test_mined_negatives_equal_reference_over_the_models_embeddings(setup, mined):
  _, checkpoint, model_config, corpus, _ = setup
  _, manifest, lines = mined
  data = runner.get_eval_set(TASK, LENGTHS)
  loaded = runner.load_model(checkpoint, model_config)
  encode_queries, encode_documents = loaded.encode_fns()
  corpus_ids = list(data.corpus)
  query_ids = [line["query_id"] for line in lines]
  assert query_ids == [f"q{i}" for i in range(9)]  # q2's grade-0 judgement is not a positive
  queries = encoding.encode_texts([data.queries[q] for q in query_ids], encode_queries,
                                  data.vocabulary, 8, mesh=loaded.mesh)
  documents = encoding.encode_texts([data.corpus[d] for d in corpus_ids], encode_documents,
                                    data.vocabulary, 16, mesh=loaded.mesh)
  positives = [np.array([corpus_ids.index(d) for d in line["positive_ids"]]) for line in lines]
  # Independent fingerprints: equal texts after the pipeline's tokenisation at the passage length.
  tokens = encoding.tokenize([data.corpus[d] for d in corpus_ids], data.vocabulary, 16)
  _, prints = np.unique(tokens, axis=0, return_inverse=True)
  config = mining.MiningConfig(num_negatives=3, range_max=8)
  rows, scores, dropped = test_mining.reference_mine(queries, documents, positives,
                                                     prints.ravel(), config)
  assert [line["negative_ids"] for line in lines] == [[corpus_ids[r] for r in rs] for rs in rows]
  for line, want in zip(lines, scores):
    np.testing.assert_allclose(line["negative_scores"], want, atol=1e-5)
  assert manifest["dropped"] == dropped
  # The planted duplicates of doc0 are never q0's negatives; the last one differs only after
  # the passage length, so only the fingerprint filter catches it.
  assert lines[1]["positive_ids"] == ["doc1", "doc17"]
  assert not {"dup_same_text", "dup_after_cut", "doc0"} & set(lines[0]["negative_ids"])
  for line in lines:
    assert not set(line["positive_ids"]) & set(line["negative_ids"])
  assert manifest["filters"]["num_negatives"] == 3 and manifest["task"] == TASK
  assert sum(manifest["score_histograms"]["negative_scores"]) == sum(map(len, rows))
  assert corpus["dup_after_cut"] != corpus["doc0"]


@pytest.mark.parametrize("case", ["missing checkpoint", "task without corpus",
                                  "range_min > range_max", "positive not in corpus"])
def test_bad_input_is_a_clear_error_and_writes_nothing(setup, case, tmp_path):
  _, checkpoint, _, _, _ = setup
  extra, expected = {
      "missing checkpoint": ((f'CHECKPOINT_PATH="{tmp_path}/nowhere"',),
                             "No samtone_jax or t5x checkpoint under"),
      "task without corpus": (('MINE_TASK="demo_manpages"',),
                              "MINE_TASK='demo_manpages' is a seqio training task without a "
                              "registered corpus and qrels. .* use 'demo_manpages_train'"),
      "range_min > range_max": (("mining.MiningConfig.range_min=9",),
                                "range_min=9 must be smaller than range_max=8"),
      "positive not in corpus": (('MINE_TASK="fixture_bad_train"',),
                                 r"query 'q0' has positive\(s\) \['gone'\]"),
  }[case]
  data = runner.get_eval_set(TASK)
  eval_sets.register_eval_set("fixture_bad_train", lambda: eval_sets.EvalSet(
      "fixture_bad_train", data.queries, data.corpus, {"q0": {"gone": 1}}, data.vocabulary),
      overwrite=True)
  import samtone_jax.tasks.all  # noqa: F401  (registers demo_manpages)
  output_dir = tmp_path / "out"
  with pytest.raises((mining.MiningInputError, FileNotFoundError), match=expected):
    mine_in_process(checkpoint, str(output_dir), *extra)
  assert not output_dir.exists()


def test_command_exits_1_with_the_message(setup, tmp_path):
  _, _, _, _, env = setup
  output_dir = tmp_path / "out"
  result = subprocess.run(command(str(tmp_path / "nowhere"), str(output_dir)), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "No samtone_jax or t5x checkpoint under" in result.stderr
  assert not output_dir.exists()


def test_mined_file_round_trips_through_the_seqio_task(setup, mined):
  output_dir, _, lines = mined
  data = runner.get_eval_set(TASK)
  name = hard_negatives.register_mined_task(negatives_path=output_dir, num_negatives=2,
                                            vocabulary=data.vocabulary)
  assert name == "beir_fixture_train_mined"
  # One example per (query, positive): q1 has two positives.
  expected = {}
  for line in lines:
    for positive in line["positive_ids"]:
      key = tuple(encoding.tokenize([data.queries[line["query_id"]]], data.vocabulary, 8)[0])
      negatives = [data.corpus[d] for d in line["negative_ids"][:2]]
      expected.setdefault(key, []).append(
          (tuple(encoding.tokenize([data.corpus[positive]], data.vocabulary, 16)[0]),
           encoding.tokenize(negatives, data.vocabulary, 16)))
  batch = next(pipeline.get_train_iterator(name, LENGTHS, 10, seed=0, num_epochs=1,
                                           shard_info=None))
  assert batch["negatives"].shape == (10, 2, 16)
  seen = 0
  for row in range(10):
    (passage, negatives), = [(p, n) for p, n in expected[tuple(batch["queries"][row])]
                             if p == tuple(batch["passages"][row])]
    np.testing.assert_array_equal(batch["negatives"][row], negatives)
    seen += 1
  assert seen == 10 == sum(len(v) for v in expected.values())


def test_public_gtr_weights_load_for_mining(tmp_path):
  """`runner.load_model` (what mining loads) on a sentence-transformers GTR directory gives
  torch's GTR embeddings."""
  import test_hf_import  # pylint: disable=g-import-not-at-top  (torch reference helpers)
  from samtone_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  hf_model = test_hf_import._random_hf_t5("gated-gelu", seed=5)
  dense = test_hf_import._write_gtr(tmp_path / "gtr", hf_model, projection_dim=24)
  config, _ = hf_import.import_sentence_transformers(tmp_path / "gtr", "sde")
  loaded = runner.load_model(str(tmp_path / "gtr"), config)
  tokens = np.random.default_rng(0).integers(2, 64, size=(8, 12)).astype(np.int32)
  tokens[:, 9:] = 0  # padding
  tokens[:, 8] = 1
  mask = (tokens != 0).astype(np.int64)
  encode_queries, _ = loaded.encode_fns()
  expected = test_hf_import._torch_gtr_embeddings(hf_model, dense, tokens, mask)
  np.testing.assert_allclose(np.asarray(encode_queries(tokens)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("experiment, num_negatives", [
    ("experiments/demo_samtone_mined.gin", 2), ("experiments/beir_samtone_mined.gin", 3)])
def test_stage2_experiments_train_on_the_mined_task(mined, experiment, num_negatives):
  """The stage-2 gin files turn HARD_NEGATIVES_PATH into the trainer's task with negatives."""
  import seqio  # pylint: disable=g-import-not-at-top
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  output_dir, _, _ = mined
  gin.clear_config()
  gin_config.parse_gin([experiment], [
      'MODEL_DIR = "/tmp/unused"', f'HARD_NEGATIVES_PATH = "{output_dir}"',
      'INITIAL_CHECKPOINT_PATH = "/tmp/stage1"', 'EVAL_TASKS = ["beir_fixture_train"]'])
  try:
    data = gin.get_configurable(trainer.DataConfig)()
    loss = gin.get_configurable(losses.LossConfig)()
    initial = gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
  finally:
    gin.clear_config()
  assert data.mixture_or_task_name == "beir_fixture_train_mined"
  # The batches' hard negatives per query come from the mined task's features (NUM_NEGATIVES).
  assert loss.use_hard_negatives and trainer.num_negatives(data, loss) == num_negatives
  assert loss.same_tower_negatives and initial == "/tmp/stage1"
  task = seqio.get_mixture_or_task(data.mixture_or_task_name)
  assert set(task.output_features) == {"queries", "passages", "negatives"}


def test_embeddings_on_disk_give_the_same_bytes(setup, mined, tmp_path):
  """MINE_EMBEDDINGS_DIR (shards searched memory-mapped, several of them) == in memory."""
  _, checkpoint, _, _, _ = setup
  output_dir = str(tmp_path / "out")
  mine_in_process(checkpoint, output_dir, f'MINE_EMBEDDINGS_DIR="{tmp_path / "emb"}"',
                  "mining.mine_to_directory.shard_size = 7")
  assert sorted(n for n in os.listdir(tmp_path / "emb") if n.startswith("embeddings")) == [
      "embeddings-00000.npy", "embeddings-00001.npy", "embeddings-00002.npy"]
  for name in ("hard_negatives.jsonl", "manifest.json"):
    with open(os.path.join(output_dir, name), "rb") as a, open(os.path.join(mined[0], name),
                                                             "rb") as b:
      assert a.read() == b.read(), name


def test_bad_negatives_file_names_file_line_and_fix(setup, mined, tmp_path):
  """The data layer's errors: an unknown negative id (file and line), no manifest, too few."""
  from samtone_jax.tasks import readers  # pylint: disable=g-import-not-at-top
  output_dir, _, lines = mined
  data = runner.get_eval_set(TASK)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "manifest.json").write_text(json.dumps({"task": TASK}))
  rows = [dict(line) for line in lines]
  rows[2]["negative_ids"] = ["doc3", "no_such_doc"]
  (bad / "hard_negatives.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(readers.DataFormatError,
                     match=r"hard_negatives.jsonl, line 3: negative id 'no_such_doc' is not in the "
                     "corpus of beir_fixture_train"):
    list(hard_negatives.mined_examples(str(bad / "hard_negatives.jsonl"), data, 2))
  (bad / "manifest.json").unlink()
  with pytest.raises(readers.MissingDataError, match="hard negatives manifest.*samtone_jax.mine"):
    hard_negatives.register_mined_task(negatives_path=str(bad), num_negatives=2)
  with pytest.raises(readers.DataFormatError, match="no query has 9 hard negatives"):
    list(hard_negatives.mined_examples(os.path.join(output_dir, "hard_negatives.jsonl"), data, 9))
