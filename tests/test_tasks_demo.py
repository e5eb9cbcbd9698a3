"""The shipped man-page demo data, its vocabulary, its task and eval set."""

import collections
import gzip
import json
import os

import numpy as np
import seqio
import sentencepiece as spm

import samtone_jax.tasks.all  # noqa: F401  (registers the tasks)
from samtone_jax.tasks import demo
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab

NUM_PAGES = 2579
NUM_TEST = 243


def _read_jsonl_gz(name):
  with gzip.open(os.path.join(demo.DEMO_DIR, name), "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _read_qrels(split):
  with open(os.path.join(demo.DEMO_DIR, "qrels", f"{split}.tsv"), encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  assert rows[0] == ["query-id", "corpus-id", "score"]
  return rows[1:]


def _expected_ids(sp, text, length):
  """T5 convention from the sentencepiece library: cut to length-1, EOS=1, pad with 0."""
  ids = sp.encode(text)[:length - 1] + [1]
  return ids + [0] * (length - len(ids))


def test_demo_files_counts_and_qrels():
  corpus = {d["_id"]: d["text"] for d in _read_jsonl_gz("corpus.jsonl.gz")}
  queries = {q["_id"]: q["text"] for q in _read_jsonl_gz("queries.jsonl.gz")}
  assert len(corpus) == NUM_PAGES and len(queries) == NUM_PAGES
  train, test = _read_qrels("train"), _read_qrels("test")
  assert len(test) == NUM_TEST and len(train) == NUM_PAGES - NUM_TEST
  for query_id, doc_id, score in train + test:
    assert doc_id in corpus and query_id in queries and score == "1"
  assert not {q for q, _, _ in train} & {q for q, _, _ in test}
  with gzip.open(os.path.join(demo.DEMO_DIR, "train.tsv.gz"), "rt", encoding="utf-8") as f:
    pairs = [line.rstrip("\n").split("\t") for line in f]
  assert sorted(map(tuple, pairs)) == sorted((queries[q], corpus[d]) for q, d, _ in train)
  total = sum(os.path.getsize(os.path.join(root, name))
              for root, _, names in os.walk(demo.DEMO_DIR) for name in names)
  assert total < 5_000_000
  assert os.path.exists(os.path.join(demo.DEMO_DIR, "README.md"))


def test_demo_vocabulary_is_t5_convention():
  v = vocab.demo_vocabulary()
  sp = spm.SentencePieceProcessor(model_file=vocab.DEMO_VOCAB_PATH)
  assert v.vocab_size == vocab.DEMO_VOCAB_SIZE == sp.vocab_size() == 8000
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  text = "copy or catenate a string"
  assert v.encode(text) == sp.encode(text)


def test_demo_eval_set():
  es = eval_sets.get_eval_set(demo.TEST_EVAL_SET)
  assert (len(es.queries), len(es.corpus)) == (NUM_TEST, NUM_PAGES)
  assert es.protocol == "beir" and es.vocabulary.vocab_size == 8000
  corpus = {d["_id"]: d["text"] for d in _read_jsonl_gz("corpus.jsonl.gz")}
  assert es.corpus == corpus
  assert es.qrels == {q: {d: 1} for q, d, _ in _read_qrels("test")}


def test_demo_task_one_epoch_exact_tokens():
  """One epoch of the demo task is exactly train.tsv.gz, tokenised by sentencepiece directly."""
  sp = spm.SentencePieceProcessor(model_file=vocab.DEMO_VOCAB_PATH)
  lq, lp = 12, 24
  with gzip.open(os.path.join(demo.DEMO_DIR, "train.tsv.gz"), "rt", encoding="utf-8") as f:
    pairs = [line.rstrip("\n").split("\t") for line in f]
  expected = collections.Counter(
      (tuple(_expected_ids(sp, q, lq)), tuple(_expected_ids(sp, d, lp))) for q, d in pairs)
  batches = list(pipeline.get_train_iterator(
      demo.TRAIN_TASK, {"queries": lq, "passages": lp}, 64, seed=3,
      shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
  assert len(batches) == len(pairs) // 64
  got = collections.Counter()
  for b in batches:
    assert b["queries"].shape == (64, lq) and b["passages"].shape == (64, lp)
    assert b["queries"].dtype == np.int32 and b["query_ids"].dtype == np.int32
    got.update(zip(map(tuple, b["queries"].tolist()), map(tuple, b["passages"].tolist())))
  assert sum(got.values()) == 64 * (len(pairs) // 64)
  assert not got - expected  # every produced example is one of the file's, exactly tokenised



def test_dev_split_is_held_out_of_the_tuning_task():
  """Reference: the files themselves. Dev = every 10th train page (sorted query ids); the tuning
  task is the train pairs whose query is no dev query; test pages are in neither."""
  queries = {q["_id"]: q["text"] for q in _read_jsonl_gz("queries.jsonl.gz")}
  corpus = {d["_id"]: d["text"] for d in _read_jsonl_gz("corpus.jsonl.gz")}
  train = sorted(_read_qrels("train"))
  dev_rows = train[::10]
  dev = eval_sets.get_eval_set(demo.DEV_EVAL_SET)
  assert dev.qrels == {q: {d: 1} for q, d, _ in dev_rows}
  assert dev.queries == {q: queries[q] for q, _, _ in dev_rows} and dev.corpus == corpus
  dev_texts = {queries[q] for q, _, _ in dev_rows}
  expected = sorted((queries[q], corpus[d]) for q, d, _ in train if queries[q] not in dev_texts)
  tuning = sorted((pair["queries"], pair["passages"]) for pair in demo.tuning_pairs())
  assert tuning == expected
  # Pages whose summary equals a dev summary leave training too (21 of them).
  assert len(train) - len(dev_rows) - 30 < len(expected) <= len(train) - len(dev_rows)
  test_queries = {q for q, _, _ in _read_qrels("test")}
  assert not test_queries & set(dev.qrels)
  # The registered task reads the same pairs.
  task = seqio.get_mixture_or_task(demo.TUNING_TASK)
  assert sum(1 for _ in task.source.get_dataset("train", shuffle=False)) == len(expected)
