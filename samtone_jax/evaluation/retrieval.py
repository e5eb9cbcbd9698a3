"""Retrieval evaluation protocols: encode an EvalSet, search exactly, score, write results.

One entry point, `evaluate_eval_set`, for every protocol; the EvalSet's `protocol` picks the
metrics and the default search depth:

  msmarco    MS MARCO passage dev: mrr@10, recall@1000; depth 1000.
  multireqa  one MultiReQA dataset over its own candidate pool: p@1, mrr; depth 1000 (a relevant
             answer ranked below 1000 would add less than 1/1000 to a query's reciprocal rank;
             pass k=len(corpus) for the exact value over the whole pool).
  beir       one BEIR dataset: ndcg@10, recall@100; depth 100 (deeper results change neither).

Metric values come from `metrics.evaluate_run` (trec_eval semantics, averaged over the qrels'
queries). With `output_dir`, each evaluation writes `<name>.trec`, a TREC run file
(`qid Q0 docid rank score tag`, lines in trec_eval's order: score descending, ties by doc id
descending; scores written exactly, so trec_eval/pytrec_eval reading the file reproduce the
numbers), and `<name>.json` with the metrics and the settings.

BEIR's identical-id rule: BEIR's own evaluation (`EvaluateRetrieval.evaluate`, whose
`ignore_identical_ids` defaults to True) removes a document whose id equals the query id from that
query's results, on every dataset; it changes the numbers of ArguAna and Quora, whose queries are
also in the corpus. The "beir" protocol does the same by default, so that our numbers compare with
published ones; the others keep every document. `ignore_identical_ids=True/False` overrides the
protocol (gin: EVAL_IGNORE_IDENTICAL_IDS). The search fetches one extra result so that k remain.
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
import re

import jax
from jax.experimental import multihost_utils
import numpy as np

from samtone_jax import io_utils
from samtone_jax import partitioning
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import metrics as metrics_lib
from samtone_jax.evaluation import search
from samtone_jax.tasks import eval_sets


_WHITESPACE = re.compile(r"\s")
# Corpus rows per embedding shard on disk (EVAL_EMBEDDINGS_DIR): 65,536 x 768 float32 is 192 MiB,
# a unit a process streams through the search without holding the corpus.
DEFAULT_SHARD_SIZE = 65_536


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Metrics reported for an evaluation set, the default number of results per query, and
  whether a document whose id equals the query id is dropped from its results (BEIR's rule)."""

  metrics: tuple[str, ...]
  k: int
  ignore_identical_ids: bool = False


PROTOCOLS: dict[str, Protocol] = {
    "msmarco": Protocol(("mrr@10", "recall@1000"), 1000),
    "multireqa": Protocol(("p@1", "mrr"), 1000),
    "beir": Protocol(("ndcg@10", "recall@100"), 100, ignore_identical_ids=True),
}


def search_results_to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
                          indices: np.ndarray, *, k: int,
                          ignore_identical_ids: bool = False) -> dict[str, dict[str, float]]:
  """Turns search output into a run {query_id: {doc_id: score}} of at most k documents each.

  Args:
    query_ids: Q ids, in the order of the search's query rows.
    doc_ids: N ids, in the order of the corpus rows.
    scores: float [Q, k'] search scores; indices: int [Q, k'] corpus rows (-1: padding).
    k: documents kept per query (after the exclusion below).
    ignore_identical_ids: drop the document whose id equals the query id (BEIR convention).
  """
  run = {}
  for row, query_id in enumerate(query_ids):
    valid = indices[row] >= 0
    # Ids of the retrieved rows only (doc_ids may be a lazy sequence of millions).
    ids = np.array([doc_ids[i] for i in indices[row][valid].tolist()], dtype=object)
    row_scores = scores[row][valid]
    if ignore_identical_ids:
      keep = ids != query_id
      ids, row_scores = ids[keep], row_scores[keep]
    run[query_id] = dict(zip(ids[:k].tolist(), row_scores[:k].tolist()))
  return run


def write_trec_run(path: str, run: metrics_lib.Run, tag: str = "samtone_jax") -> None:
  """Writes `run` as a TREC run file, each query's lines in trec_eval's order.

  Scores are written with `repr`, which reads back to the same double, so trec_eval ranks (ties
  included) exactly as `metrics.evaluate_run` does on `run`.
  """
  if not tag or _WHITESPACE.search(tag):
    raise ValueError(f"The run tag {tag!r} must be non-empty without whitespace.")
  with io_utils.open_file(path, "w") as f:
    for query_id, ranking in run.items():
      doc_ids = list(ranking)
      if (not query_id or _WHITESPACE.search(query_id) or not all(doc_ids)
          or _WHITESPACE.search("".join(doc_ids))):
        raise ValueError(f"Query {query_id!r} or one of its documents has an empty id or one with "
                         f"whitespace; the TREC run format cannot hold it.")
      scores = np.array(list(ranking.values()), dtype=np.float64)
      order = metrics_lib.trec_order(doc_ids, scores).tolist()
      f.write("".join([f"{query_id} Q0 {doc_ids[i]} {rank} {score!r} {tag}\n"
                       for rank, (i, score) in enumerate(zip(order, scores[order].tolist()),
                                                         start=1)]))


def read_trec_run(path: str) -> dict[str, dict[str, float]]:
  """Reads a TREC run file (`qid Q0 docid rank score tag` per line) into {qid: {docid: score}}.

  Raises:
    ValueError: naming the file and line of a malformed line or a repeated (qid, docid).
  """
  run: dict[str, dict[str, float]] = {}
  with io_utils.open_file(path) as f:
    for line_number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 6:
        raise ValueError(f"{path}:{line_number}: expected 6 fields 'qid Q0 docid rank score "
                         f"tag', got {len(fields)}.")
      query_id, _, doc_id, _, score, _ = fields
      try:
        value = float(score)
      except ValueError:
        raise ValueError(f"{path}:{line_number}: score {score!r} is not a number.") from None
      ranking = run.setdefault(query_id, {})
      if doc_id in ranking:
        raise ValueError(f"{path}:{line_number}: document {doc_id!r} repeated for query "
                         f"{query_id!r}.")
      ranking[doc_id] = value
  return run


def _check_eval_set(eval_set: eval_sets.EvalSet) -> Protocol:
  if eval_set.protocol not in PROTOCOLS:
    raise ValueError(f"Evaluation set {eval_set.name!r} has protocol {eval_set.protocol!r}; "
                     f"expected one of {sorted(PROTOCOLS)}.")
  if not eval_set.qrels:
    raise ValueError(f"Evaluation set {eval_set.name!r} has no qrels; nothing to score.")
  missing = [q for q in eval_set.qrels if q not in eval_set.queries]
  if missing:
    raise ValueError(f"Evaluation set {eval_set.name!r}: {len(missing)} qrels queries have no "
                     f"text, e.g. {missing[:3]}.")
  if not eval_set.corpus:
    raise ValueError(f"Evaluation set {eval_set.name!r} has an empty corpus.")
  return PROTOCOLS[eval_set.protocol]


def retrieve(eval_set: eval_sets.EvalSet, encode_queries_fn: encoding.EncodeFn,
             encode_documents_fn: encoding.EncodeFn, *, k: int | None = None,
             batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
             ignore_identical_ids: bool | None = None, embeddings_dir: str | None = None,
             chunk_size: int = search.DEFAULT_CHUNK_SIZE,
             embedding_dtype: str = "float32",
             shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, dict[str, float]]:
  """Encodes the judged queries and the corpus and returns the exact top-k run.

  Every process encodes all queries, but only its slice of the corpus (`encoding.process_rows`),
  into memory or into its own shards under `embeddings_dir`, and searches it on its own devices;
  the per-process top-k lists (a few numbers per query) are then gathered and merged. So no
  process holds, reads or tokenises more than its share of the corpus, and `embeddings_dir` may
  be local to each host.

  Args: as for `evaluate_eval_set`.

  Returns:
    {query_id: {doc_id: score}} with k documents per judged query (fewer if the corpus is smaller).
  """
  protocol = _check_eval_set(eval_set)
  k = protocol.k if k is None else k
  if ignore_identical_ids is None:
    ignore_identical_ids = protocol.ignore_identical_ids
  dtype = encoding.embedding_dtype(embedding_dtype)
  # Only judged queries are encoded: metrics average over the qrels' queries.
  query_ids = list(eval_set.qrels)
  query_embeddings = encoding.encode_texts(
      [eval_set.queries[q] for q in query_ids], encode_queries_fn, eval_set.vocabulary,
      eval_set.query_length, batch_size=batch_size, mesh=mesh,
      description=f"{eval_set.name} queries")
  doc_ids = eval_sets.document_ids(eval_set.corpus)
  doc_texts = eval_sets.document_texts(eval_set.corpus, doc_ids)
  begin, end = encoding.process_rows(len(doc_ids))
  if embeddings_dir is None:
    corpus = encoding.encode_texts(encoding.RowRange(doc_texts, begin, end), encode_documents_fn,
                                   eval_set.vocabulary, eval_set.document_length,
                                   batch_size=batch_size, mesh=mesh,
                                   description=f"{eval_set.name} corpus", dtype=dtype,
                                   per_process=True)
  else:
    encoding.encode_to_shards(doc_ids, doc_texts, encode_documents_fn, eval_set.vocabulary,
                              eval_set.document_length, embeddings_dir, batch_size=batch_size,
                              mesh=mesh, description=f"{eval_set.name} corpus",
                              shard_size=shard_size, dtype=dtype, per_process=True)
    # Read block by block while the search streams them: resident memory ~ one block.
    corpus = encoding.iter_embedding_shards(
        embeddings_dir, process_index=jax.process_index(),
        block_rows=chunk_size * (len(jax.local_devices()) if jax.process_count() > 1
                                 else mesh.devices.size if mesh is not None else 1))
  search_k = min(k + (1 if ignore_identical_ids else 0), len(doc_ids))
  # This process's rows on this process's devices (the eval mesh itself on one process).
  local_mesh = mesh if jax.process_count() == 1 else partitioning.create_mesh(
      -1, 1, devices=jax.local_devices())
  if end > begin:
    scores, indices = search.exact_search(query_embeddings, corpus, search_k,
                                          chunk_size=chunk_size, mesh=local_mesh)
    indices = np.where(indices >= 0, indices + begin, -1)
  else:  # fewer documents than processes
    scores = np.full((len(query_ids), search_k), -np.inf, np.float32)
    indices = np.full((len(query_ids), search_k), -1, np.int64)
  if jax.process_count() > 1:
    scores, indices = search.merge_top_k(multihost_utils.process_allgather(scores),
                                         multihost_utils.process_allgather(indices), search_k)
  return search_results_to_run(query_ids, doc_ids, scores, indices, k=k,
                               ignore_identical_ids=ignore_identical_ids)


def evaluate_eval_set(eval_set: eval_sets.EvalSet, encode_queries_fn: encoding.EncodeFn,
                      encode_documents_fn: encoding.EncodeFn, *, output_dir: str | None = None,
                      batch_size: int = 256, k: int | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      metrics: Sequence[str] | None = None,
                      ignore_identical_ids: bool | None = None,
                      embeddings_dir: str | None = None,
                      chunk_size: int = search.DEFAULT_CHUNK_SIZE,
                      run_tag: str = "samtone_jax", embedding_dtype: str = "float32",
                      shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, float]:
  """Encodes, searches and scores one evaluation set.

  Args:
    eval_set: queries, corpus, qrels, vocabulary, lengths and protocol.
    encode_queries_fn, encode_documents_fn: tokens int32 [B, L] -> [B, P] (e.g. from
      `encoding.dual_encoder_encode_fns`).
    output_dir: where to write `<name>.trec` and `<name>.json`; None: write nothing.
    batch_size: texts per encoder call.
    k: results per query; default the protocol's depth.
    mesh: encoding is data-parallel over its `data` axis and the search is sharded over all its
      devices; None: one device.
    metrics: metric names; default the protocol's.
    ignore_identical_ids: drop a document whose id equals the query id from its results (BEIR's
      rule); None: the protocol's default (on for "beir", off otherwise).
    embeddings_dir: if given, corpus embeddings are streamed to `.npy` shards there (each process
      its own; see `retrieve`) and searched shard by shard from disk (for corpora whose
      embeddings do not fit in memory); None: in memory (each process its slice).
    chunk_size: corpus rows per device per search step.
    run_tag: the last column of the run file.
    embedding_dtype: "float32" or "bfloat16": how corpus embeddings are stored, in memory or on
      disk (EVAL_EMBEDDING_DTYPE); the search accumulates in float32 either way.
    shard_size: corpus rows per shard file with `embeddings_dir`.

  Returns:
    {metric name: value}, flat, e.g. {"mrr@10": 0.37, "recall@1000": 0.97}.
  """
  protocol = _check_eval_set(eval_set)
  metric_names = tuple(protocol.metrics if metrics is None else metrics)
  k = protocol.k if k is None else k
  if ignore_identical_ids is None:
    ignore_identical_ids = protocol.ignore_identical_ids
  run = retrieve(eval_set, encode_queries_fn, encode_documents_fn, k=k, batch_size=batch_size,
                 mesh=mesh, ignore_identical_ids=ignore_identical_ids,
                 embeddings_dir=embeddings_dir, chunk_size=chunk_size,
                 embedding_dtype=embedding_dtype, shard_size=shard_size)
  results = metrics_lib.evaluate_run(eval_set.qrels, run, metric_names)
  if output_dir is not None and jax.process_index() == 0:
    io_utils.makedirs(output_dir)  # local or gs://
    run_path = os.path.join(output_dir, f"{eval_set.name}.trec")
    write_trec_run(run_path, run, run_tag)
    with io_utils.open_file(os.path.join(output_dir, f"{eval_set.name}.json"), "w") as f:
      json.dump({"eval_set": eval_set.name, "protocol": eval_set.protocol, "metrics": results,
                 "k": k, "num_queries": len(run), "num_documents": len(eval_set.corpus),
                 "ignore_identical_ids": ignore_identical_ids, "run_file": run_path}, f, indent=2)
  return results


def evaluate_eval_sets(names: Sequence[str], encode_queries_fn: encoding.EncodeFn,
                       encode_documents_fn: encoding.EncodeFn,
                       get_eval_set: Callable[[str], eval_sets.EvalSet] = eval_sets.get_eval_set,
                       **kwargs) -> dict[str, float]:
  """Evaluates several registered sets; keys are "<name>/<metric>" (flat, for logging).

  Args:
    names: registry names (`samtone_jax.tasks.eval_sets`).
    encode_queries_fn, encode_documents_fn: as for `evaluate_eval_set`.
    get_eval_set: name -> EvalSet (the registry by default).
    **kwargs: passed to `evaluate_eval_set` (output_dir, batch_size, k, mesh, ...).
  """
  results = {}
  for name in names:
    values = evaluate_eval_set(get_eval_set(name), encode_queries_fn, encode_documents_fn,
                               **kwargs)
    results.update({f"{name}/{metric}": value for metric, value in values.items()})
  return results
