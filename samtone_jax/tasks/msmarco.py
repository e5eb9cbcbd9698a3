"""MS MARCO passage ranking: training task with one hard negative, dev evaluation set.

Official files (https://microsoft.github.io/msmarco/Datasets.html, "Passage ranking"), read from
`paths.msmarco_dir()` unless a directory is given:

  collection.tsv                    pid<TAB>passage
  queries.train.tsv                 qid<TAB>query
  qrels.train.tsv                   qid<TAB>0<TAB>pid<TAB>1
  triples.train.small.tsv           query<TAB>positive passage<TAB>negative passage
  qidpidtriples.train.full.2.tsv    qid<TAB>positive pid<TAB>negative pid
  queries.dev.small.tsv, qrels.dev.small.tsv   the dev set (6,980 queries)

Registered names:
  "msmarco_passage_train"       (query, positive, 1 hard negative) from triples.train.small.tsv,
                                or, without it, qidpidtriples.train.full.2.tsv + collection.tsv +
                                queries.train.tsv (+ qrels.train.tsv to check each positive).
  "msmarco_passage_train_tfds"  (query, positive) pairs of TFDS beir/msmarco, split "train".
  eval set "msmarco_passage_dev_small"   protocol "msmarco", corpus = collection.tsv.
  eval set "msmarco_passage_train"       queries.train.tsv + qrels.train.tsv against
                                         collection.tsv: what hard-negative mining reads
                                         (samtone_jax.mine, MINE_TASK="msmarco_passage_train").
"""

import functools
import os

import seqio

from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import features
from samtone_jax.tasks import paths
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

TRAIN_TASK = "msmarco_passage_train"
TRAIN_TASK_TFDS = "msmarco_passage_train_tfds"
DEV_EVAL_SET = "msmarco_passage_dev_small"
# The training queries as a set with a corpus (same name as the task): what mining reads.
TRAIN_EVAL_SET = "msmarco_passage_train"
TEXT_TRIPLES = "triples.train.small.tsv"
ID_TRIPLES = "qidpidtriples.train.full.2.tsv"
_HOW_TO_GET = ("Download the MS MARCO passage ranking files from "
               "https://microsoft.github.io/msmarco/Datasets.html (collectionandqueries.tar.gz, "
               "triples.train.small.tar.gz or qidpidtriples.train.full.2.tsv.gz; uncompressed or "
               "as .gz) into that directory, or point SAMTONE_MSMARCO_DIR / "
               "paths.configure_data_dirs(msmarco_dir=...) at them.")


def _file(directory: str, name: str) -> str:
  return readers.find_file(directory, name, "MS MARCO file", _HOW_TO_GET)


def read_id_texts(path: str, what: str) -> dict[int, str]:
  """collection.tsv / queries.*.tsv -> {integer id: text}."""
  texts = {}
  for line, (raw_id, text) in readers.iter_tsv(path, 2):
    item_id = readers.check_int_id(path, line, what, raw_id)
    if item_id in texts:
      raise readers.DataFormatError(path, line, f"duplicate {what} {item_id}")
    texts[item_id] = readers.check_text(path, line, "text", text)
  return texts


def read_qrels(path: str, queries: dict[int, str] | None = None,
               collection: dict[int, str] | None = None) -> dict[int, dict[int, int]]:
  """qrels.*.tsv (qid 0 pid relevance) -> {qid: {pid: relevance}}; unknown ids raise."""
  qrels: dict[int, dict[int, int]] = {}
  for line, (raw_qid, _, raw_pid, raw_rel) in readers.iter_tsv(path, 4):
    qid = readers.check_int_id(path, line, "qid", raw_qid)
    pid = readers.check_int_id(path, line, "pid", raw_pid)
    relevance = readers.check_int_id(path, line, "relevance", raw_rel)
    if queries is not None and qid not in queries:
      raise readers.DataFormatError(path, line, f"qid {qid} is not in the queries file")
    if collection is not None and pid not in collection:
      raise readers.DataFormatError(path, line, f"pid {pid} is not in collection.tsv")
    qrels.setdefault(qid, {})[pid] = relevance
  return qrels


def text_triples(path: str):
  """triples.train.small.tsv rows as {"queries", "passages", "negatives": [negative]}."""
  for line, (query, positive, negative) in readers.iter_tsv(path, 3):
    yield {features.QUERIES: readers.check_text(path, line, "query", query),
           features.PASSAGES: readers.check_text(path, line, "positive passage", positive),
           features.NEGATIVES: [readers.check_text(path, line, "negative passage", negative)]}


def id_triples(path: str, directory: str):
  """qidpidtriples rows resolved against collection.tsv and queries.train.tsv."""
  collection = read_id_texts(_file(directory, "collection.tsv"), "pid")
  queries = read_id_texts(_file(directory, "queries.train.tsv"), "qid")
  qrels = read_qrels(_file(directory, "qrels.train.tsv"), queries, collection)
  for line, (raw_qid, raw_pos, raw_neg) in readers.iter_tsv(path, 3):
    qid = readers.check_int_id(path, line, "qid", raw_qid)
    pos = readers.check_int_id(path, line, "positive pid", raw_pos)
    neg = readers.check_int_id(path, line, "negative pid", raw_neg)
    if qid not in queries:
      raise readers.DataFormatError(path, line, f"qid {qid} is not in queries.train.tsv")
    for pid in (pos, neg):
      if pid not in collection:
        raise readers.DataFormatError(path, line, f"pid {pid} is not in collection.tsv")
    if pos not in qrels.get(qid, {}):
      raise readers.DataFormatError(path, line, f"positive pid {pos} is not a qrels.train.tsv "
                                    f"judgement of qid {qid}")
    yield {features.QUERIES: queries[qid], features.PASSAGES: collection[pos],
           features.NEGATIVES: [collection[neg]]}


def train_triples(directory: str | None = None):
  """The training triples from whichever official triples file is present (text preferred)."""
  directory = directory or paths.msmarco_dir()
  path = readers.find_file(directory, TEXT_TRIPLES, "", "", required=False)
  if path:
    return text_triples(path)
  path = readers.find_file(directory, ID_TRIPLES, "", "", required=False)
  if path:
    return id_triples(path, directory)
  raise readers.MissingDataError(f"MS MARCO training triples ({TEXT_TRIPLES} or {ID_TRIPLES}, "
                                 "optionally .gz)", os.path.join(directory, TEXT_TRIPLES),
                                 _HOW_TO_GET)


def dev_eval_set(directory: str | None, vocabulary: seqio.Vocabulary, *,
                 name: str = DEV_EVAL_SET, queries_file: str = "queries.dev.small.tsv",
                 qrels_file: str = "qrels.dev.small.tsv") -> eval_sets.EvalSet:
  """The dev-small set (or, with the train files, the train queries: TRAIN_EVAL_SET)."""
  directory = directory or paths.msmarco_dir()
  collection = read_id_texts(_file(directory, "collection.tsv"), "pid")
  queries = read_id_texts(_file(directory, queries_file), "qid")
  qrels = read_qrels(_file(directory, qrels_file), queries, collection)
  return eval_sets.EvalSet(
      name=name,
      queries={str(q): queries[q] for q in sorted(qrels)},
      corpus={str(p): text for p, text in collection.items()},
      qrels={str(q): {str(p): r for p, r in docs.items()} for q, docs in qrels.items()},
      vocabulary=vocabulary, protocol="msmarco")


def register(directory: str | None = None, vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers the MS MARCO tasks and eval set; `directory` None: `paths.msmarco_dir()` on use."""
  vocabulary = vocabulary or vocab.t5_vocabulary()
  source = sources.examples_source({"train": functools.partial(train_triples, directory)},
                                   num_negatives=1)
  beir.register_pairs_task(TRAIN_TASK, source, vocabulary, with_negatives=True)
  beir.register_pairs_task(TRAIN_TASK_TFDS, beir.tfds_pairs_source("msmarco"), vocabulary)
  loader = functools.partial(dev_eval_set, directory, vocabulary)
  eval_sets.register_eval_set(DEV_EVAL_SET, loader, overwrite=True)
  loader = functools.partial(dev_eval_set, directory, vocabulary, name=TRAIN_EVAL_SET,
                             queries_file="queries.train.tsv", qrels_file="qrels.train.tsv")
  eval_sets.register_eval_set(TRAIN_EVAL_SET, loader, overwrite=True)
