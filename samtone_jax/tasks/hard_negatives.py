"""Training tasks with mined hard negatives: `hard_negatives.jsonl` + the set it was mined from.

`python -m samtone_jax.mine` writes, for a training set with a corpus (a registered eval set such
as "beir_<name>_train" or "demo_manpages_train"), a directory holding

  hard_negatives.jsonl   one JSON object per line, one line per training query:
                           "query_id"      str, a query id of the set
                           "negative_ids"  [str], corpus ids, best first (the order used)
                           (also "positive_ids", "positive_scores", "negative_scores"; ignored)
  manifest.json          {"task": <the set's name>, "filters": ..., ...}

`register_mined_task` registers a seqio task over it: for every query of the file and every
document its qrels grade > 0 (in query-id, then document-id order), one example
{"queries": query text, "passages": positive text, "negatives": the texts of the first
`num_negatives` negative_ids}. Queries with fewer negatives than that are skipped (counted, one
warning per pass); a query or negative id the set does not have raises `DataFormatError` naming
the file and line. Texts come from the registered set when the task is iterated, so registering
reads only the manifest's "task" field, never the corpus.

From gin, the task name is the value of the registration (gin calls it when it builds the
trainer's DataConfig):

  from samtone_jax.tasks import hard_negatives
  MIXTURE_OR_TASK_NAME = @hard_negatives.register_mined_task()
  hard_negatives.register_mined_task:
    negatives_path = %HARD_NEGATIVES_PATH     # the mining output directory (or the .jsonl)
    num_negatives = %NUM_NEGATIVES
"""

from collections.abc import Iterator
import json
import os

from absl import logging
import seqio

from samtone_jax.tasks import beir
from samtone_jax.tasks import eval_sets
from samtone_jax.tasks import features
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

NEGATIVES_FILE = "hard_negatives.jsonl"
MANIFEST_FILE = "manifest.json"
_HOW_TO_GET = ("Write it with `python -m samtone_jax.mine --gin.MINE_OUTPUT_DIR=...` and pass that "
               "directory (or its hard_negatives.jsonl) as HARD_NEGATIVES_PATH.")


def negatives_file(path: str) -> str:
  """`path` itself if it is a file, else `path/hard_negatives.jsonl`; raises if missing."""
  if not path.endswith(".jsonl"):
    path = os.path.join(path, NEGATIVES_FILE)
  return readers.require_file(path, "hard negatives file", _HOW_TO_GET)


def read_source_task(path: str) -> str:
  """The name of the set the negatives were mined from (manifest.json's "task")."""
  manifest_path = os.path.join(os.path.dirname(negatives_file(path)), MANIFEST_FILE)
  readers.require_file(manifest_path, "hard negatives manifest", _HOW_TO_GET)
  with readers.open_binary(manifest_path) as f:
    try:
      manifest = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise readers.DataFormatError(manifest_path, None, f"invalid JSON ({e})")
  if not isinstance(manifest, dict) or not isinstance(manifest.get("task"), str):
    raise readers.DataFormatError(manifest_path, None, "missing string field 'task'")
  return manifest["task"]


def read_hard_negatives(path: str) -> Iterator[tuple[int, str, list[str]]]:
  """Yields (line, query id, negative ids) of a hard_negatives.jsonl; bad rows raise."""
  for line, obj in readers.iter_jsonl(path, {"query_id": object, "negative_ids": list}):
    query_id = readers.check_str_id(path, line, "query_id", obj["query_id"])
    negative_ids = [readers.check_str_id(path, line, "negative_ids", d)
                    for d in obj["negative_ids"]]
    yield line, query_id, negative_ids


def mined_examples(path: str, source: eval_sets.EvalSet, num_negatives: int
                   ) -> Iterator[dict[str, str | list[str]]]:
  """{"queries", "passages", "negatives": [num_negatives]} per (query, positive) of the file.

  Args:
    path: the hard_negatives.jsonl.
    source: the set it was mined from (queries, corpus, qrels).
    num_negatives: negatives per example; queries with fewer are skipped.
  """
  skipped = 0
  seen = set()
  for line, query_id, negative_ids in read_hard_negatives(path):
    if query_id not in source.queries:
      raise readers.DataFormatError(path, line, f"query_id {query_id!r} is not a query of "
                                    f"{source.name}")
    if query_id in seen:
      raise readers.DataFormatError(path, line, f"query_id {query_id!r} appears twice")
    seen.add(query_id)
    for doc_id in negative_ids:
      if doc_id not in source.corpus:
        raise readers.DataFormatError(path, line, f"negative id {doc_id!r} is not in the corpus "
                                      f"of {source.name}")
    if len(negative_ids) < num_negatives:
      skipped += 1
      continue
    negatives = [source.corpus[d] for d in negative_ids[:num_negatives]]
    positives = sorted(d for d, grade in source.qrels.get(query_id, {}).items() if grade > 0)
    for doc_id in positives:
      yield {features.QUERIES: source.queries[query_id], features.PASSAGES: source.corpus[doc_id],
             features.NEGATIVES: negatives}
  if skipped:
    logging.warning("%s: skipped %d queries with fewer than %d hard negatives (raise "
                    "MiningConfig.range_max or relax the filters to keep them).", path, skipped,
                    num_negatives)
  if skipped == len(seen):
    raise readers.DataFormatError(path, None, f"no query has {num_negatives} hard negatives; "
                                  "lower NUM_NEGATIVES or mine more (MiningConfig.num_negatives)")


def register_mined_task(*, negatives_path: str, num_negatives: int, name: str | None = None,
                        source_task: str | None = None,
                        vocabulary: seqio.Vocabulary | None = None,
                        shuffle_buffer_size: int = beir.TRAIN_SHUFFLE_BUFFER) -> str:
  """Registers (replacing any earlier one) a training task with mined hard negatives.

  Args:
    negatives_path: the mining output directory, or its hard_negatives.jsonl.
    num_negatives: N, negatives per example (NUM_NEGATIVES of the loss).
    name: the task name; default "<source task>_mined".
    source_task: the registered set the negatives were mined from; default manifest.json's
      "task". It is looked up when the task is first iterated.
    vocabulary: the tokeniser; default T5's public vocabulary (the demo binds its own).
    shuffle_buffer_size: the task's shuffle buffer.

  Returns:
    The task name (so gin can bind MIXTURE_OR_TASK_NAME to this call).
  """
  if num_negatives < 1:
    raise ValueError(f"num_negatives={num_negatives} must be >= 1 for a hard-negatives task.")
  path = negatives_file(negatives_path)
  source_task = source_task or read_source_task(path)
  name = name or f"{source_task}_mined"

  def examples():
    return mined_examples(path, eval_sets.get_eval_set(source_task), num_negatives)

  source = sources.examples_source({"train": examples}, num_negatives=num_negatives)
  beir.register_pairs_task(name, source, vocabulary or vocab.t5_vocabulary(), with_negatives=True,
                           shuffle_buffer_size=shuffle_buffer_size)
  return name
