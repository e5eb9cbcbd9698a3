"""BEIR-layout retrieval data: zero-shot evaluation sets and, where a train split exists, a task.

A BEIR directory holds (each file may also be gzip-compressed, `name.gz`):
  corpus.jsonl       {"_id": str, "title": str, "text": str} per line
  queries.jsonl      {"_id": str, "text": str} per line
  qrels/<split>.tsv  header "query-id<TAB>corpus-id<TAB>score", then one graded judgement per line

`register_beir_dataset(name, path)` registers eval sets "beir_<name>_<split>" for every qrels
split and a training task "beir_<name>_train" (pairs (query, relevant document), score > 0) when
qrels/train.tsv exists. `register_beir_tfds_dataset(config)` does the same for TFDS
`beir/<config>` (splits "query", "passage" and the qrels splits "train"/"validation"/"test").
"""

from collections.abc import Iterator
import dataclasses
import functools
import os

import seqio
import tensorflow as tf

from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import features
from samtone_jax.tasks import preprocessors
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

BEIR_DOWNLOAD = ("Download a BEIR dataset from https://github.com/beir-cellar/beir (e.g. "
                 "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/<name>.zip), "
                 "unzip it and pass its directory (the one holding corpus.jsonl) as the path.")
QRELS_HEADER = ("query-id", "corpus-id", "score")
TRAIN_SHUFFLE_BUFFER = 100_000


def find_file(directory: str, name: str) -> str:
  return readers.find_file(directory, name, "BEIR file", BEIR_DOWNLOAD)


def join_title(title: str, text: str) -> str:
  """BEIR documents are title + body; the title is dropped when empty."""
  title, text = title.strip(), text.strip()
  return f"{title} {text}" if title and text else title or text


def read_corpus(path: str) -> dict[str, str]:
  """corpus.jsonl(.gz) -> {doc id: "title text"}; duplicate ids and empty documents raise."""
  corpus = {}
  for line, obj in readers.iter_jsonl(path, {"_id": object, "text": str}):
    doc_id = readers.check_str_id(path, line, "_id", obj["_id"])
    title = obj.get("title") or ""
    if not isinstance(title, str):
      raise readers.DataFormatError(path, line, f"field 'title' should be str, got "
                                    f"{type(title).__name__}")
    text = join_title(title, obj["text"])
    if not text:
      raise readers.DataFormatError(path, line, f"empty text in document {doc_id!r}")
    if doc_id in corpus:
      raise readers.DataFormatError(path, line, f"duplicate document id {doc_id!r}")
    corpus[doc_id] = text
  return corpus


def read_queries(path: str) -> dict[str, str]:
  """queries.jsonl(.gz) -> {query id: text}."""
  queries = {}
  for line, obj in readers.iter_jsonl(path, {"_id": object, "text": str}):
    query_id = readers.check_str_id(path, line, "_id", obj["_id"])
    text = readers.check_text(path, line, "text", obj["text"])
    if query_id in queries:
      raise readers.DataFormatError(path, line, f"duplicate query id {query_id!r}")
    queries[query_id] = text
  return queries


def read_qrels(path: str, queries: dict[str, str], corpus: dict[str, str]
               ) -> dict[str, dict[str, int]]:
  """qrels/<split>.tsv(.gz) -> {query id: {doc id: score}}; unknown ids raise."""
  qrels: dict[str, dict[str, int]] = {}
  for line, (query_id, doc_id, score) in readers.iter_tsv(path, 3, header=QRELS_HEADER):
    if query_id not in queries:
      raise readers.DataFormatError(path, line, f"query-id {query_id!r} is not in the queries")
    if doc_id not in corpus:
      raise readers.DataFormatError(path, line, f"corpus-id {doc_id!r} is not in the corpus")
    try:
      grade = int(score)
    except ValueError:
      raise readers.DataFormatError(path, line, f"score should be an integer, got {score!r}")
    qrels.setdefault(query_id, {})[doc_id] = grade
  return qrels


@dataclasses.dataclass(frozen=True)
class BeirData:
  queries: dict[str, str]
  corpus: dict[str, str]
  qrels: dict[str, dict[str, int]]


def load_beir_split(directory: str, split: str) -> BeirData:
  """Reads a BEIR directory's corpus, queries and the qrels of `split`.

  Not cached: the texts live as long as the caller keeps them (the trainer keeps its eval sets
  between evaluations; a command frees them after use), never for the life of the process.
  """
  corpus = read_corpus(find_file(directory, "corpus.jsonl"))
  queries = read_queries(find_file(directory, "queries.jsonl"))
  qrels = read_qrels(find_file(os.path.join(directory, "qrels"), f"{split}.tsv"), queries, corpus)
  return BeirData(queries=queries, corpus=corpus, qrels=qrels)


def qrels_splits(directory: str) -> list[str]:
  """Names of the qrels splits in a BEIR directory (qrels/<split>.tsv[.gz])."""
  qrels_dir = os.path.join(directory, "qrels")
  if not tf.io.gfile.isdir(qrels_dir):
    raise readers.MissingDataError("BEIR qrels directory", qrels_dir, BEIR_DOWNLOAD)
  names = []
  for filename in sorted(tf.io.gfile.listdir(qrels_dir)):
    for suffix in (".tsv", ".tsv.gz"):
      if filename.endswith(suffix):
        names.append(filename[:-len(suffix)])
  return sorted(set(names))


def positive_pairs(data: BeirData) -> Iterator[dict[str, str]]:
  """(query, relevant document) for every judgement with score > 0, in query-id order."""
  for query_id in sorted(data.qrels):
    for doc_id, score in sorted(data.qrels[query_id].items()):
      if score > 0:
        yield {features.QUERIES: data.queries[query_id], features.PASSAGES: data.corpus[doc_id]}


def train_pairs(directory: str) -> Iterator[dict[str, str]]:
  """`positive_pairs` of the train split; raises if it has none (nothing to train on)."""
  data = load_beir_split(directory, "train")
  count = 0
  for pair in positive_pairs(data):
    count += 1
    yield pair
  if not count:
    qrels = find_file(os.path.join(directory, "qrels"), "train.tsv")
    judgements = sum(len(v) for v in data.qrels.values())
    raise readers.DataFormatError(
        qrels, None, f"no training pair: none of its {judgements} judgements has a score > 0 "
        f"(corpus: {len(data.corpus)} documents, queries: {len(data.queries)}). A BEIR train "
        "split needs qrels/train.tsv rows 'query-id<TAB>corpus-id<TAB>score' with score >= 1, "
        "whose query ids are in queries.jsonl and corpus ids in corpus.jsonl.")


def beir_eval_set(name: str, directory: str, split: str, vocabulary: seqio.Vocabulary, *,
                  protocol: str = "beir", query_length: int = 64,
                  document_length: int = 256) -> eval_sets.EvalSet:
  data = load_beir_split(directory, split)
  queries = {q: data.queries[q] for q in data.qrels}  # only judged queries are evaluated
  return eval_sets.EvalSet(name=name, queries=queries, corpus=data.corpus, qrels=data.qrels,
                           vocabulary=vocabulary, query_length=query_length,
                           document_length=document_length, protocol=protocol)


def register_pairs_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary, *,
                        with_negatives: bool = False,
                        shuffle_buffer_size: int = TRAIN_SHUFFLE_BUFFER) -> seqio.Task:
  """Registers (replacing any earlier one) a dual-encoder task over a text-pair source."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      # Split at seqio's cache point, so `samtone-cache-tasks` can cache the token ids.
      preprocessors=[preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     preprocessors.trim_append_eos],
      output_features=preprocessors.output_features(vocabulary, with_negatives=with_negatives),
      shuffle_buffer_size=shuffle_buffer_size)


def register_beir_dataset(name: str, path: str, *, vocabulary: seqio.Vocabulary | None = None,
                          protocol: str = "beir") -> list[str]:
  """Registers eval sets "beir_<name>_<split>" and, with qrels/train.tsv, task "beir_<name>_train".

  Args:
    name: short name, e.g. "scifact".
    path: the BEIR directory (holding corpus.jsonl[.gz], queries.jsonl[.gz], qrels/).
    vocabulary: tokeniser for the eval sets and the task; default: the path configured for
      `name` (`paths.configure_data_dirs(vocabulary_paths=...)`), else T5's public vocabulary.
    protocol: metric protocol of the eval sets.

  Returns:
    the registered names.
  """
  vocabulary = vocabulary or vocab.dataset_vocabulary(name)
  registered = []
  for split in qrels_splits(path):
    eval_name = f"beir_{name}_{split}"
    loader = functools.partial(beir_eval_set, eval_name, path, split, vocabulary,
                               protocol=protocol)
    eval_sets.register_eval_set(eval_name, loader, overwrite=True)
    registered.append(eval_name)
    if split == "train":
      task_name = f"beir_{name}_train"
      source = sources.examples_source({"train": functools.partial(train_pairs, path)})
      register_pairs_task(task_name, source, vocabulary)
      registered.append(task_name)
  return registered


# ---- TFDS beir/<config> ----------------------------------------------------------------------

TFDS_BEIR_HELP = ("Prepare it with `tfds build beir/{config}` (needs apache-beam) or copy a "
                  "prepared beir/{config} into the TFDS data dir (TFDS_DATA_DIR or "
                  "paths.configure_data_dirs(tfds_data_dir=...)).")


def _tfds_split(config: str, split: str, **kwargs) -> tf.data.Dataset:
  """`split` of TFDS beir/<config> from `paths.tfds_data_dir()`; MissingDataError if unprepared."""
  return readers.tfds_split(f"beir/{config}", split, TFDS_BEIR_HELP.format(config=config),
                            **kwargs)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def beir_tfds_eval_set(name: str, config: str, split: str, vocabulary: seqio.Vocabulary, *,
                       protocol: str = "beir") -> eval_sets.EvalSet:
  """Eval set from TFDS beir/<config>: "query"/"passage" splits plus the qrels split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  queries = {_text(ex["query_id"]): _text(ex["query"])
             for ex in tfds.as_numpy(_tfds_split(config, "query"))}
  corpus = {_text(ex["passage_id"]): _text(ex["passage"])
            for ex in tfds.as_numpy(_tfds_split(config, "passage"))}
  qrels: dict[str, dict[str, int]] = {}
  for ex in tfds.as_numpy(_tfds_split(config, split)):
    query_id, doc_id = _text(ex["query_id"]), _text(ex["passage_id"])
    if query_id not in queries or doc_id not in corpus:
      raise readers.DataFormatError(f"tfds beir/{config}:{split}", None,
                                    f"qrel ({query_id!r}, {doc_id!r}) names an unknown id")
    qrels.setdefault(query_id, {})[doc_id] = int(ex["score"])
  queries = {q: queries[q] for q in qrels}
  return eval_sets.EvalSet(name=name, queries=queries, corpus=corpus, qrels=qrels,
                           vocabulary=vocabulary, protocol=protocol)


def tfds_pairs_source(config: str, split: str = "train") -> seqio.FunctionDataSource:
  """seqio source of (query, passage) pairs with score > 0 from TFDS beir/<config>:<split>."""

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # file order; shuffled downstream from the run's seed
    ds = _tfds_split(config, split, shuffle_files=False)
    ds = ds.filter(lambda ex: ex["score"] > 0)
    return ds.map(lambda ex: {features.QUERIES: ex["query"], features.PASSAGES: ex["passage"]})

  return seqio.FunctionDataSource(dataset_fn, splits=[split])


def register_beir_tfds_dataset(config: str, name: str | None = None, *,
                               splits: tuple[str, ...] = ("test",), train: bool = False,
                               vocabulary: seqio.Vocabulary | None = None) -> list[str]:
  """Registers TFDS beir/<config>: eval sets "beir_<name>_<split>", optionally "beir_<name>_train".

  Registration does not read the data; it is loaded (from `paths.tfds_data_dir()`) on use.
  """
  name = name or config.replace(".", "_")
  vocabulary = vocabulary or vocab.dataset_vocabulary(name)
  registered = []
  for split in splits:
    eval_name = f"beir_{name}_{split}"
    loader = functools.partial(beir_tfds_eval_set, eval_name, config, split, vocabulary)
    eval_sets.register_eval_set(eval_name, loader, overwrite=True)
    registered.append(eval_name)
  if train:
    task_name = f"beir_{name}_train"
    register_pairs_task(task_name, tfds_pairs_source(config), vocabulary)
    registered.append(task_name)
  return registered


def register_beir_directories(root: str, *, vocabulary: seqio.Vocabulary | None = None
                              ) -> list[str]:
  """Registers every BEIR directory `root/<name>/` (one holding corpus.jsonl[.gz]) as <name>."""
  registered = []
  if not tf.io.gfile.isdir(root):
    return registered
  for name in sorted(tf.io.gfile.listdir(root)):
    directory = os.path.join(root, name.rstrip("/"))
    if any(tf.io.gfile.exists(os.path.join(directory, f)) for f in ("corpus.jsonl",
                                                                    "corpus.jsonl.gz")):
      registered += register_beir_dataset(name.rstrip("/").replace("-", "_"), directory,
                                          vocabulary=vocabulary)
  return registered
