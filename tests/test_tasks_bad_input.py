"""Every malformed input names its file, line and problem; missing data says how to get it."""

import os
import re

import pytest
import seqio

from fixtures import tasks_data
from samtone_jax.tasks import beir
from samtone_jax.tasks import msmarco
from samtone_jax.tasks import multireqa
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import readers
from samtone_jax.tasks import vocab


def _first_batch(name):
  return next(pipeline.get_train_iterator(name, {"queries": 8, "passages": 8}, 1, seed=0,
                                          shard_info=seqio.ShardInfo(0, 1)))


def _msmarco_dir(tmp_path, **overrides):
  """Fixture MS MARCO files with some files replaced by `overrides` (name -> bytes)."""
  tasks_data.write_msmarco(str(tmp_path), id_triples=False)
  for name, data in overrides.items():
    tasks_data.write_bytes(os.path.join(tmp_path, name), data)
  msmarco.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  return str(tmp_path)


def _message(path, line, problem):
  return re.escape(f"{path}, line {line}: {problem}")


def test_wrong_column_count_in_training_file(tmp_path):
  directory = _msmarco_dir(tmp_path, **{
      "triples.train.small.tsv": b"q one\tpositive one\tnegative one\nq two\tpositive two\n"})
  path = os.path.join(directory, "triples.train.small.tsv")
  with pytest.raises(readers.DataFormatError,
                     match=_message(path, 2, "expected 3 tab-separated columns, got 2")):
    _first_batch(msmarco.TRAIN_TASK)


def test_empty_text_in_training_file(tmp_path):
  directory = _msmarco_dir(tmp_path, **{"triples.train.small.tsv": b"q\tpositive\t  \n"})
  path = os.path.join(directory, "triples.train.small.tsv")
  with pytest.raises(readers.DataFormatError,
                     match=_message(path, 1, "empty text in field 'negative passage'")):
    _first_batch(msmarco.TRAIN_TASK)


def test_bad_id(tmp_path):
  directory = _msmarco_dir(tmp_path, **{"collection.tsv": b"0\tfirst passage\npid7\tsecond\n"})
  path = os.path.join(directory, "collection.tsv")
  with pytest.raises(readers.DataFormatError, match=_message(
      path, 2, "pid should be a non-negative integer, got 'pid7'")):
    msmarco.dev_eval_set(directory, vocab.demo_vocabulary())


def test_invalid_utf8(tmp_path):
  directory = _msmarco_dir(tmp_path, **{"queries.dev.small.tsv": b"1\tfine\n2\tbad \xff byte\n"})
  path = os.path.join(directory, "queries.dev.small.tsv")
  with pytest.raises(readers.DataFormatError, match=_message(path, 2, "invalid UTF-8")):
    msmarco.dev_eval_set(directory, vocab.demo_vocabulary())


def test_qrel_naming_unknown_document(tmp_path):
  directory = _msmarco_dir(tmp_path, **{"qrels.dev.small.tsv": b"2\t0\t4\t1\n2\t0\t99\t1\n"})
  with pytest.raises(readers.DataFormatError, match=_message(
      os.path.join(directory, "qrels.dev.small.tsv"), 2, "pid 99 is not in collection.tsv")):
    msmarco.dev_eval_set(directory, vocab.demo_vocabulary())
  tasks_data.write_beir(str(tmp_path / "beir"))
  qrels = tasks_data.write_bytes(str(tmp_path / "beir" / "qrels" / "test.tsv"),
                                 b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td9\t1\n")
  with pytest.raises(readers.DataFormatError,
                     match=_message(qrels, 3, "corpus-id 'd9' is not in the corpus")):
    beir.load_beir_split(str(tmp_path / "beir"), "test")


def test_id_triples_with_unknown_positive(tmp_path):
  tasks_data.write_msmarco(str(tmp_path), text_triples=False)
  path = tasks_data.write_bytes(str(tmp_path / "qidpidtriples.train.full.2.tsv"),
                                b"121352\t3\t0\n121352\t4\t0\n")
  msmarco.register(str(tmp_path), vocabulary=vocab.demo_vocabulary())
  with pytest.raises(readers.DataFormatError, match=_message(
      path, 2, "positive pid 4 is not a qrels.train.tsv judgement of qid 121352")):
    _first_batch(msmarco.TRAIN_TASK)


def test_beir_header_and_json_errors(tmp_path):
  tasks_data.write_beir(str(tmp_path))
  qrels = tasks_data.write_bytes(str(tmp_path / "qrels" / "test.tsv"), b"q1\td1\t1\n")
  with pytest.raises(readers.DataFormatError, match=re.escape(f"{qrels}, line 1: expected header")):
    beir.load_beir_split(str(tmp_path), "test")
  corpus = tasks_data.write_bytes(str(tmp_path / "corpus.jsonl"),
                                  b'{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n')
  with pytest.raises(readers.DataFormatError, match=_message(corpus, 2, "invalid JSON")):
    beir.read_corpus(corpus)
  queries = tasks_data.write_bytes(str(tmp_path / "queries.jsonl"), b'{"_id": "q1"}\n')
  with pytest.raises(readers.DataFormatError, match=_message(queries, 1, "missing field 'text'")):
    beir.read_queries(queries)
  corpus = tasks_data.write_bytes(str(tmp_path / "corpus.jsonl"),
                                  b'{"_id": "a\\tb", "title": "", "text": "x"}\n')
  with pytest.raises(readers.DataFormatError, match=_message(corpus, 1, "bad _id")):
    beir.read_corpus(corpus)


def test_multireqa_offsets_past_context_and_bad_candidate_id(tmp_path):
  tasks_data.write_mrqa(str(tmp_path), "SQuAD", "dev")
  candidates = tasks_data.write_bytes(
      str(tmp_path / "candidates" / "dev" / "SQuAD" / "candidates.json"),
      b'{"candidate_id": "SQuAD_p1/p2/_0", "response_start": 0, "response_end": 5000}\n')
  with pytest.raises(readers.DataFormatError, match=_message(
      candidates, 1, "sentence end 5000 is past the end of its context")):
    multireqa.load("squad", "test", str(tmp_path))
  candidates = tasks_data.write_bytes(
      str(tmp_path / "candidates" / "dev" / "SQuAD" / "candidates.json"),
      b'{"candidate_id": "p1/p2/0", "response_start": 0, "response_end": 5}\n')
  with pytest.raises(readers.DataFormatError, match=_message(candidates, 1, "candidate_id")):
    multireqa.read_candidates(candidates, "SQuAD")


def test_missing_data_names_what_where_and_how(tmp_path):
  msmarco.register(str(tmp_path / "nothing"), vocabulary=vocab.demo_vocabulary())
  with pytest.raises(readers.MissingDataError) as error:
    _first_batch(msmarco.TRAIN_TASK)
  message = str(error.value)
  assert "MS MARCO training triples" in message
  assert str(tmp_path / "nothing" / "triples.train.small.tsv") in message
  assert "https://microsoft.github.io/msmarco/Datasets.html" in message
  with pytest.raises(readers.MissingDataError, match="MultiReQA sentence boundaries.*"
                     "candidates/test/BioASQ/candidates.json.*google-research-datasets/MultiReQA"):
    multireqa.load("bioasq", "test", str(tmp_path))
  with pytest.raises(readers.MissingDataError, match="BEIR qrels directory.*beir-cellar"):
    beir.register_beir_dataset("absent", str(tmp_path / "absent"))
