"""One tokeniser for training and evaluation: a text gets the same ids in a training batch and in
the evaluation / encoding path, and both equal the sentencepiece library's ids (T5 convention)."""

import json
import os

import numpy as np
import seqio

from fixtures import tasks_data
from samtone_jax.evaluation import encoding
from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import vocab

QUERY_LENGTH, PASSAGE_LENGTH = 12, 24

# Texts that tokenisers disagree on: accents in composed and decomposed form, CJK, emoji, a
# right-to-left script, typographic punctuation, runs of whitespace, a text far longer than the
# feature length, and characters the vocabulary does not know. Every text is also cut to one piece
# (length 2) and to none but EOS (length 1) below. A text that is empty after trimming whitespace
# never reaches either path: the readers refuse it with its file and line
# (test_tasks_bad_input::test_empty_text_in_training_file, test_fail_fast empty_doc).
TRICKY = {
    "unicode": "Ünïcödé caf\u00e9 vs cafe\u0301 \u2014 \u00bd \u6771\u4eac \U0001F600 \u05e9\u05dc\u05d5\u05dd",
    "whitespace": "  tabs\tand   many    spaces \u00a0 and\u2009thin spaces  ",
    "long": " ".join(f"word{i} alpha beta" for i in range(200)),
    "punctuation": "\u201cquoted\u201d \u2018single\u2019 \u2026 --- ((brackets)) [x] {y} <z>",
    "unknown": "\u0f00\u0f01 \u16a0\u16a1 \u2603",
    "plain": "how do i list open files",
}


def _write_dataset(directory: str) -> None:
  ids = list(TRICKY)
  corpus = [{"_id": f"d_{k}", "title": "", "text": TRICKY[k]} for k in ids]
  queries = [{"_id": f"q_{k}", "text": TRICKY[k]} for k in ids]
  jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  tasks_data.write_text(os.path.join(directory, "corpus.jsonl"), jsonl(corpus))
  tasks_data.write_text(os.path.join(directory, "queries.jsonl"), jsonl(queries))
  rows = "".join(f"q_{k}\td_{k}\t1\n" for k in ids)
  for split in ("train", "test"):
    tasks_data.write_text(os.path.join(directory, "qrels", f"{split}.tsv"),
                          "query-id\tcorpus-id\tscore\n" + rows)


def test_training_batches_and_evaluation_tokenise_identically(tmp_path):
  _write_dataset(str(tmp_path))
  beir.register_beir_dataset("tokenizer_equality", str(tmp_path),
                             vocabulary=vocab.demo_vocabulary())
  batches = list(pipeline.get_train_iterator(
      "beir_tokenizer_equality_train", {"queries": QUERY_LENGTH, "passages": PASSAGE_LENGTH}, 1,
      seed=0, shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
  trained = {tuple(b["queries"][0]): b["passages"][0] for b in batches}
  assert len(trained) == len(TRICKY)

  eval_set = eval_sets.get_eval_set("beir_tokenizer_equality_test")
  query_texts = [eval_set.queries[f"q_{k}"] for k in TRICKY]
  doc_texts = [eval_set.corpus[f"d_{k}"] for k in TRICKY]
  # The readers trim surrounding whitespace and keep the rest as written.
  assert query_texts == [text.strip() for text in TRICKY.values()]
  evaluated_queries = encoding.tokenize(query_texts, eval_set.vocabulary, QUERY_LENGTH)
  evaluated_docs = encoding.tokenize(doc_texts, eval_set.vocabulary, PASSAGE_LENGTH)

  sp = tasks_data.sp_processor()
  for row, text in enumerate(query_texts):
    # Independent reference: the sentencepiece library, cut to L - 1, EOS, zero padding.
    np.testing.assert_array_equal(evaluated_queries[row],
                                  tasks_data.expected_ids(sp, text, QUERY_LENGTH))
    np.testing.assert_array_equal(evaluated_docs[row],
                                  tasks_data.expected_ids(sp, text, PASSAGE_LENGTH))
    # Training batch rows for the same pair: identical ids and padding.
    np.testing.assert_array_equal(trained[tuple(evaluated_queries[row])], evaluated_docs[row])


def test_training_batches_cut_to_one_piece_or_eos_only_as_evaluation(tmp_path):
  """The passages cut to 2 (one piece, EOS) and to 1 (EOS alone) in a training batch are the
  evaluation tokeniser's ids at those lengths, and sentencepiece's."""
  _write_dataset(str(tmp_path))
  beir.register_beir_dataset("tokenizer_equality_short", str(tmp_path),
                             vocabulary=vocab.demo_vocabulary())
  eval_set = eval_sets.get_eval_set("beir_tokenizer_equality_short_test")
  query_texts = [eval_set.queries[f"q_{k}"] for k in TRICKY]
  doc_texts = [eval_set.corpus[f"d_{k}"] for k in TRICKY]
  queries = encoding.tokenize(query_texts, eval_set.vocabulary, QUERY_LENGTH)
  sp = tasks_data.sp_processor()
  for passage_length in (2, 1):
    batches = list(pipeline.get_train_iterator(
        "beir_tokenizer_equality_short_train",
        {"queries": QUERY_LENGTH, "passages": passage_length}, 1, seed=0,
        shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
    trained = {tuple(b["queries"][0]): b["passages"][0] for b in batches}
    assert len(trained) == len(TRICKY)
    evaluated = encoding.tokenize(doc_texts, eval_set.vocabulary, passage_length)
    for row, text in enumerate(doc_texts):
      np.testing.assert_array_equal(evaluated[row],
                                    tasks_data.expected_ids(sp, text, passage_length))
      np.testing.assert_array_equal(trained[tuple(queries[row])], evaluated[row])
    if passage_length == 1:
      np.testing.assert_array_equal(evaluated, np.ones((len(TRICKY), 1)))  # EOS alone


def test_tokenize_cut_to_eos_only_and_empty_batch():
  vocabulary = vocab.demo_vocabulary()
  sp = tasks_data.sp_processor()
  # Length 1: every piece is cut, only EOS remains; an empty text is EOS and padding.
  np.testing.assert_array_equal(encoding.tokenize(["a long text", ""], vocabulary, 1), [[1], [1]])
  np.testing.assert_array_equal(encoding.tokenize([""], vocabulary, 3), [[1, 0, 0]])
  np.testing.assert_array_equal(encoding.tokenize(["a long text"], vocabulary, 3),
                                [tasks_data.expected_ids(sp, "a long text", 3)])
  assert encoding.tokenize([], vocabulary, 5).shape == (0, 5)
