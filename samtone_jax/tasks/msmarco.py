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
  eval set "msmarco_passage_dev_small"   protocol "msmarco", corpus = collection.tsv (a
                                         `Collection`: an offset index, texts read on use).
  eval set "msmarco_passage_train"       queries.train.tsv + qrels.train.tsv against
                                         collection.tsv: what hard-negative mining reads
                                         (samtone_jax.mine, MINE_TASK="msmarco_passage_train").
"""

import array
from collections.abc import Iterator, Mapping, Sequence
import functools
import os
import threading

import numpy as np
import seqio
import tensorflow as tf

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


class Collection(Mapping):
  """collection.tsv as an offset index: {str(pid): passage}, each text read from the file on use.

  Built by one pass over the file (checking every line as `read_id_texts` does); it then holds two
  int64 arrays, the pids and the byte offsets of their lines (16 bytes per passage: 141 MB for the
  8.8M passages instead of ~4.5 GB of Python strings), on every host. Iteration and `ids` /
  `texts` follow the file's order; `texts[a:b]` reads rows a..b-1 sequentially. Keys may be str
  or int pids. A gzip-compressed collection cannot be read at an offset without decompressing
  everything before it, so `collection.tsv.gz` is read into memory instead (decompress it for the
  index).
  """

  def __init__(self, path: str):
    self.path = path
    self._lock = threading.Lock()  # one open file shared by tf.data's generator thread and others
    self._file = None
    self._in_memory: list[str] | None = None
    pids, offsets = array.array("q"), array.array("q")
    if path.endswith(".gz"):
      self._in_memory = []
      for line, (raw_id, text) in readers.iter_tsv(path, 2):
        pids.append(readers.check_int_id(path, line, "pid", raw_id))
        self._in_memory.append(readers.check_text(path, line, "text", text))
    else:
      offset = 0
      with tf.io.gfile.GFile(path, "rb") as f:
        for line, raw in enumerate(_raw_lines(f), start=1):
          pid, _ = self._parse(raw, line)
          pids.append(pid)
          offsets.append(offset)
          offset += len(raw)
    self._pids = np.frombuffer(pids, np.int64) if len(pids) else np.zeros(0, np.int64)
    self._offsets = np.frombuffer(offsets, np.int64) if len(offsets) else np.zeros(0, np.int64)
    order = np.argsort(self._pids, kind="stable")
    sorted_pids = self._pids[order]
    repeated = np.flatnonzero(sorted_pids[1:] == sorted_pids[:-1])
    if len(repeated):
      line = int(order[repeated[0] + 1]) + 1
      raise readers.DataFormatError(path, line, f"duplicate pid {int(sorted_pids[repeated[0]])}")
    # The official collection numbers its passages 0..n-1 in order: then position = pid.
    self._dense = bool(np.array_equal(self._pids, np.arange(len(self._pids))))
    self._order, self._sorted_pids = (None, None) if self._dense else (order, sorted_pids)

  def _parse(self, raw: bytes, line: int) -> tuple[int, str]:
    try:
      decoded = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
      raise readers.DataFormatError(self.path, line,
                                    f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    fields = decoded.split("\t")
    if not decoded.strip():
      raise readers.DataFormatError(self.path, line, "empty line")
    if len(fields) != 2:
      raise readers.DataFormatError(self.path, line,
                                    f"expected 2 tab-separated columns, got {len(fields)}")
    return (readers.check_int_id(self.path, line, "pid", fields[0]),
            readers.check_text(self.path, line, "text", fields[1]))

  def position(self, pid: int | str) -> int | None:
    """The row of `pid` in the file (0-based), None if it is not in the collection."""
    if isinstance(pid, str):
      if not pid.isdigit():
        return None
      pid = int(pid)
    if self._dense:
      return pid if 0 <= pid < len(self._pids) else None
    at = int(np.searchsorted(self._sorted_pids, pid))
    if at < len(self._sorted_pids) and self._sorted_pids[at] == pid:
      return int(self._order[at])
    return None

  def _open(self):
    if self._file is None:
      local = "://" not in self.path or self.path.startswith("file://")
      self._file = (open(self.path.removeprefix("file://"), "rb") if local  # pylint: disable=consider-using-with
                    else tf.io.gfile.GFile(self.path, "rb"))
    return self._file

  def texts_at(self, begin: int, end: int) -> list[str]:
    """The passages of rows begin..end-1, read in one sequential pass."""
    begin, end = max(begin, 0), min(end, len(self._pids))
    if begin >= end:
      return []
    if self._in_memory is not None:
      return self._in_memory[begin:end]
    with self._lock:
      f = self._open()
      f.seek(int(self._offsets[begin]))
      return [self._parse(f.readline(), row + 1)[1] for row in range(begin, end)]

  def __getitem__(self, pid: int | str) -> str:
    row = self.position(pid)
    if row is None:
      raise KeyError(pid)
    return self.texts_at(row, row + 1)[0]

  def __contains__(self, pid) -> bool:
    return isinstance(pid, (int, str, np.integer)) and self.position(
        int(pid) if isinstance(pid, np.integer) else pid) is not None

  def __iter__(self) -> Iterator[str]:
    return (str(pid) for pid in self._pids.tolist())

  def __len__(self) -> int:
    return len(self._pids)

  @property
  def ids(self) -> Sequence[str]:
    """The pids as strings, in file order (computed on indexing: no list of n strings)."""
    return _RowView(len(self), lambda a, b: [str(p) for p in self._pids[a:b].tolist()])

  @property
  def texts(self) -> Sequence[str]:
    """The passages in file order; slicing reads the rows sequentially."""
    return _RowView(len(self), self.texts_at)

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        self._file.close()
        self._file = None

  def __getstate__(self):  # picklable (no open file or lock)
    state = dict(self.__dict__, _file=None)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())


def _raw_lines(f, block_size: int = 1 << 24) -> Iterator[bytes]:
  """The lines of a binary file with their newline (split on b"\\n" only, so that their lengths
  are byte offsets whatever other line breaks, such as a carriage return, the text holds)."""
  rest = b""
  while block := f.read(block_size):
    lines = (rest + block).split(b"\n")
    rest = lines.pop()
    yield from (line + b"\n" for line in lines)
  if rest:
    yield rest


class _RowView(Sequence):
  """A read-only sequence of `size` rows fetched by `read(begin, end) -> list`."""

  def __init__(self, size: int, read):
    self._size, self._read = size, read

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      begin, end, step = index.indices(self._size)
      rows = self._read(begin, end) if end > begin else []
      return rows if step == 1 else rows[::step]
    if index < 0:
      index += self._size
    if not 0 <= index < self._size:
      raise IndexError(index)
    return self._read(index, index + 1)[0]


def read_qrels(path: str, queries: Mapping[int, str] | None = None,
               collection: Mapping[int, str] | None = None) -> dict[int, dict[int, int]]:
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
  """qidpidtriples rows resolved against collection.tsv (an offset index: passages are read from
  the file per row, not held) and queries.train.tsv."""
  collection = Collection(_file(directory, "collection.tsv"))
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
  collection = Collection(_file(directory, "collection.tsv"))  # texts read when encoded
  queries = read_id_texts(_file(directory, queries_file), "qid")
  qrels = read_qrels(_file(directory, qrels_file), queries, collection)
  return eval_sets.EvalSet(
      name=name,
      queries={str(q): queries[q] for q in sorted(qrels)},
      corpus=collection,
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
