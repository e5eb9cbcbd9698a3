"""End to end: a BEIR-layout fixture, a tiny real DualEncoder, results checked with pytrec_eval."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytrec_eval
import seqio

from samtone_jax import partitioning
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import retrieval
from samtone_jax.models.config import DualEncoderConfig, T5Config
from samtone_jax.models.dual_encoder import DualEncoder
from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def write_beir_fixture(root, num_docs=37, num_queries=9, seed=0):
  """A dataset in BEIR's exact layout: corpus.jsonl, queries.jsonl, qrels/test.tsv."""
  rng = np.random.default_rng(seed)
  os.makedirs(root / "qrels")
  with open(root / "corpus.jsonl", "w") as f:
    for i in range(num_docs):
      text = " ".join(rng.choice(WORDS, size=rng.integers(3, 30)))
      row = {"_id": f"doc{i}", "title": f"title {WORDS[i % 24]}", "text": text}
      f.write(json.dumps(row) + "\n")
  with open(root / "queries.jsonl", "w") as f:
    for i in range(num_queries):
      f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, size=4))}) + "\n")
    # A query id that is also a corpus id (ArguAna/Quora style) and appears in the qrels.
    f.write(json.dumps({"_id": "doc3", "text": "alpha beta"}) + "\n")
  with open(root / "qrels" / "test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for i in range(num_queries):
      for d in rng.choice(num_docs, size=rng.integers(1, 4), replace=False):
        f.write(f"q{i}\tdoc{d}\t{rng.integers(0, 3)}\n")
    f.write("doc3\tdoc5\t1\n")


def load_beir(root, vocabulary):
  """Registers the directory with the data layer's BEIR loader and gets the test split."""
  names = beir.register_beir_dataset("fixture", str(root), vocabulary=vocabulary)
  assert names == ["beir_fixture_test"]
  # Short lengths keep the tiny model's compiled shapes small.
  return dataclasses.replace(eval_sets.get_eval_set("beir_fixture_test"), query_length=8,
                             document_length=16)


@pytest.fixture(scope="module")
def tiny_model():
  config = DualEncoderConfig(
      encoder=T5Config(vocab_size=260, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                       dropout_rate=0.0),
      # Towers drawn independently, so that a query/document tower mix-up changes the numbers.
      tower_sharing="ade", projection_dim=8, identical_tower_init=False)
  model = DualEncoder(config)
  mesh = partitioning.create_mesh(4, 2)
  tokens = jnp.ones((4, 8), jnp.int32)
  params, _ = partitioning.sharded_init(lambda rng: model.init(rng, tokens, tokens),
                                        mesh, jax.random.key(0))
  # Built once: every test reuses the compiled functions (shapes: batch 8, lengths 8 and 16).
  query_fn, document_fn = encoding.dual_encoder_encode_fns(model, params["params"], mesh)
  return model, params["params"], mesh, query_fn, document_fn


def test_tokenize_follows_t5_eos_convention():
  vocabulary = seqio.ByteVocabulary()
  tokens = encoding.tokenize(["ab", "abcdef", ""], vocabulary, 4)
  a, b, c = (ord(ch) + 3 for ch in "abc")  # ByteVocabulary: byte + 3 special ids.
  np.testing.assert_array_equal(tokens, [[a, b, 1, 0], [a, b, c, 1], [1, 0, 0, 0]])
  assert tokens.dtype == np.int32


def test_data_parallel_encoding_equals_plain_apply(tiny_model):
  model, params, mesh, query_fn, document_fn = tiny_model
  vocabulary = seqio.ByteVocabulary()
  texts = [f"text number {i}" for i in range(11)]  # Not a multiple of the batch: padded.
  ours = encoding.encode_texts(texts, document_fn, vocabulary, 16, batch_size=8, mesh=mesh)
  host_params = jax.device_get(params)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_documents))
  expected = apply(host_params, encoding.tokenize(texts, vocabulary, 16))
  np.testing.assert_allclose(ours, np.asarray(expected), rtol=1e-5, atol=1e-6)
  queries = encoding.encode_texts(texts, query_fn, vocabulary, 16, batch_size=8, mesh=mesh)
  assert not np.allclose(queries, ours)  # ADE: the towers differ.


def _pytrec_means(qrels, run_path, measures):
  with open(run_path) as f:
    run = pytrec_eval.parse_run(f)
  per_query = pytrec_eval.RelevanceEvaluator(qrels, set(measures)).evaluate(run)
  return {m: sum(v[m] for v in per_query.values()) / len(qrels) for m in measures}, run


def test_beir_end_to_end_run_file_scores_identically(tmp_path, tiny_model):
  _, _, mesh, query_fn, document_fn = tiny_model
  root = tmp_path / "beir_fixture"
  write_beir_fixture(root)
  eval_set = load_beir(root, seqio.ByteVocabulary())
  output_dir = tmp_path / "results"
  results = retrieval.evaluate_eval_set(eval_set, query_fn, document_fn, output_dir=str(output_dir),
                                        batch_size=8, mesh=mesh, chunk_size=2, k=20)
  assert set(results) == {"ndcg@10", "recall@100"}
  with open(output_dir / "beir_fixture_test.json") as f:
    written = json.load(f)
  assert written["metrics"] == results and written["num_queries"] == len(eval_set.qrels)
  expected, run = _pytrec_means(eval_set.qrels, output_dir / "beir_fixture_test.trec",
                                ["ndcg_cut_10", "recall_100"])
  assert set(run) == set(eval_set.qrels) and all(len(r) == 20 for r in run.values())
  assert results["ndcg@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6)
  assert results["recall@100"] == pytest.approx(expected["recall_100"], abs=1e-6)
  # The run is the exact top 20 of the embeddings (brute force over all documents).
  q = encoding.encode_texts([eval_set.queries["q0"]], query_fn, eval_set.vocabulary, 8,
                           batch_size=8, mesh=mesh)
  docs = list(eval_set.corpus)
  d = encoding.encode_texts([eval_set.corpus[i] for i in docs], document_fn, eval_set.vocabulary,
                            16, batch_size=8, mesh=mesh)
  best = np.argsort(-(q @ d.T)[0], kind="stable")[:20]
  assert set(run["q0"]) == {docs[i] for i in best}

  # Same results when the corpus embeddings are streamed through shards on disk, and with BEIR's
  # exclusion of the query's own id (doc3 is both a query and a document).
  streamed = retrieval.evaluate_eval_set(
      eval_set, query_fn, document_fn, output_dir=str(tmp_path / "streamed"), batch_size=8,
      mesh=mesh, k=20, ignore_identical_ids=True, embeddings_dir=str(tmp_path / "embeddings"))
  expected, run = _pytrec_means(eval_set.qrels, tmp_path / "streamed" / "beir_fixture_test.trec",
                                ["ndcg_cut_10", "recall_100"])
  assert "doc3" not in run["doc3"] and len(run["doc3"]) == 20
  assert streamed["ndcg@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6)
  # Our reader of run files gives back exactly the run pytrec_eval parsed.
  assert retrieval.read_trec_run(tmp_path / "streamed" / "beir_fixture_test.trec") == run
  ids, shards = encoding.load_embedding_shards(str(tmp_path / "embeddings"))
  assert ids == docs
  np.testing.assert_allclose(np.concatenate(shards), d, rtol=1e-6, atol=1e-6)


def test_beir_protocol_drops_identical_ids_like_beir(tmp_path, tiny_model):
  """BEIR's rule by default on BEIR sets: the scores equal pytrec_eval on the unfiltered exact run
  with each query's own id removed by the test (then cut to k); other protocols keep it."""
  _, _, mesh, query_fn, document_fn = tiny_model
  root = tmp_path / "beir_ids"
  write_beir_fixture(root, seed=1)
  beir.register_beir_dataset("identical_ids", str(root), vocabulary=seqio.ByteVocabulary())
  eval_set = dataclasses.replace(eval_sets.get_eval_set("beir_identical_ids_test"),
                                 query_length=8, document_length=16)
  n = len(eval_set.corpus)
  common = dict(batch_size=8, mesh=mesh)
  # Every document retrieved, so the query "doc3" surely finds the document "doc3".
  unfiltered = retrieval.retrieve(eval_set, query_fn, document_fn, k=n,
                                  ignore_identical_ids=False, **common)
  assert "doc3" in unfiltered["doc3"]
  k = 20
  filtered = {}
  for query_id, ranking in unfiltered.items():
    kept = sorted(((score, doc) for doc, score in ranking.items() if doc != query_id),
                  reverse=True)[:k]
    filtered[query_id] = {doc: score for score, doc in kept}
  per_query = pytrec_eval.RelevanceEvaluator(
      eval_set.qrels, {"ndcg_cut_10", "recall_100", "recip_rank"}).evaluate(filtered)
  expected = {m: np.mean([v[m] for v in per_query.values()])
              for m in ("ndcg_cut_10", "recall_100", "recip_rank")}

  output_dir = tmp_path / "results"
  results = retrieval.evaluate_eval_set(eval_set, query_fn, document_fn, k=k,
                                        metrics=["ndcg@10", "recall@100", "mrr"],
                                        output_dir=str(output_dir), **common)
  assert results["ndcg@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6)
  assert results["recall@100"] == pytest.approx(expected["recall_100"], abs=1e-6)
  assert results["mrr"] == pytest.approx(expected["recip_rank"], abs=1e-6)
  with open(output_dir / "beir_identical_ids_test.json") as f:
    assert json.load(f)["ignore_identical_ids"] is True
  run = retrieval.read_trec_run(output_dir / "beir_identical_ids_test.trec")
  assert run == filtered

  # Another protocol keeps the document unless told otherwise; the binding overrides both ways.
  as_msmarco = dataclasses.replace(eval_set, protocol="msmarco")
  assert "doc3" in retrieval.retrieve(as_msmarco, query_fn, document_fn, k=n, **common)["doc3"]
  assert "doc3" not in retrieval.retrieve(as_msmarco, query_fn, document_fn, k=n,
                                          ignore_identical_ids=True, **common)["doc3"]


def test_msmarco_protocol_and_several_sets(tiny_model):
  _, _, mesh, query_fn, document_fn = tiny_model
  vocabulary = seqio.ByteVocabulary()
  corpus = {f"p{i}": f"passage {WORDS[i]} {WORDS[(3 * i) % 24]}" for i in range(24)}
  queries = {f"q{i}": WORDS[i] for i in range(6)}
  qrels = {f"q{i}": {f"p{i}": 1} for i in range(6)}
  sets = {
      "tiny_msmarco": eval_sets.EvalSet("tiny_msmarco", queries, corpus, qrels, vocabulary, 8, 16,
                                        "msmarco"),
      "tiny_multireqa": eval_sets.EvalSet("tiny_multireqa", queries, corpus, qrels, vocabulary, 8,
                                          16, "multireqa"),
  }
  results = retrieval.evaluate_eval_sets(list(sets), query_fn, document_fn,
                                         get_eval_set=sets.__getitem__, mesh=mesh, batch_size=8)
  assert set(results) == {"tiny_msmarco/mrr@10", "tiny_msmarco/recall@1000",
                          "tiny_multireqa/p@1", "tiny_multireqa/mrr"}
  # Every document is retrieved (k >= corpus size), so recall is 1 and the full MRR is the
  # mean reciprocal rank of the relevant passage under brute force.
  assert results["tiny_msmarco/recall@1000"] == 1.0
  q = encoding.encode_texts(list(queries.values()), query_fn, vocabulary, 8, batch_size=8,
                           mesh=mesh)
  d = encoding.encode_texts(list(corpus.values()), document_fn, vocabulary, 16, batch_size=8,
                           mesh=mesh)
  scores = q @ d.T
  ranks = [1 + np.sum(scores[i] > scores[i, i]) for i in range(6)]
  assert results["tiny_multireqa/mrr"] == pytest.approx(np.mean([1 / r for r in ranks]), abs=1e-6)


def test_read_trec_run_names_file_and_line(tmp_path):
  path = tmp_path / "bad.trec"
  path.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n")
  with pytest.raises(ValueError, match="bad.trec:2: expected 6 fields"):
    retrieval.read_trec_run(str(path))


def test_bad_eval_set_is_rejected(tiny_model):
  _, _, _, query_fn, document_fn = tiny_model
  vocabulary = seqio.ByteVocabulary()
  bad = eval_sets.EvalSet("bad", {"q1": "x"}, {"d": "y"}, {"q2": {"d": 1}}, vocabulary, 4, 4)
  with pytest.raises(ValueError, match="qrels queries have no text"):
    retrieval.evaluate_eval_set(bad, query_fn, document_fn)


@pytest.mark.parametrize("bindings,expected", [
    ((), None),  # None: each set's protocol decides (BEIR's rule on BEIR sets)
    (("EVAL_IGNORE_IDENTICAL_IDS = False",), False),
    (("EVAL_IGNORE_IDENTICAL_IDS = True",), True),
])
def test_eval_ignore_identical_ids_binding_reaches_evaluate_and_the_trainer(bindings, expected):
  """The gin binding that overrides BEIR's identical-id rule is what `samtone-evaluate`
  (gin/runs/eval.gin) and the trainer's in-training eval (runs/pretrain.gin, trainer.LoopConfig)
  are given, on a BEIR experiment."""
  import gin  # pylint: disable=g-import-not-at-top
  from samtone_jax import evaluate  # pylint: disable=g-import-not-at-top
  from samtone_jax import gin_config  # pylint: disable=g-import-not-at-top
  from samtone_jax import trainer  # pylint: disable=g-import-not-at-top
  common = ['EVAL_TASKS = ["beir_scifact_test"]', *bindings]
  try:
    gin.clear_config()
    gin_config.parse_gin(["runs/eval.gin", "experiments/beir_samtone.gin"],
                         ['CHECKPOINT_PATH = "/nowhere"', *common])
    assert gin_config.configured_arguments(evaluate.evaluate)["ignore_identical_ids"] is expected
    gin.clear_config()
    gin_config.parse_gin(["experiments/beir_samtone.gin"], common)
    loop = gin.get_configurable(trainer.LoopConfig)()
    assert loop.eval_ignore_identical_ids is expected
  finally:
    gin.clear_config()
