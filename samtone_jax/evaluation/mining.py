"""Hard-negative mining with a trained dual encoder: encode, exact top-k search, filters, files.

A training set with a corpus (a registered `EvalSet`: queries, corpus and qrels, e.g. the
`beir_<name>_train` set of a BEIR directory, `msmarco_passage_train` or `demo_manpages_train`) is mined in three steps:

  1. encode the training queries (query tower) and the corpus (document tower) with the model
     (`encoding.encode_texts`), and fingerprint every corpus text with the loss's own id logic
     (`tasks.feature_converter.fingerprint_tokens` of the tokens padded to the passage length);
  2. retrieve the top K corpus rows of every query with the sharded exact search
     (`search.exact_search`), K = range_max + the most rows any query has to skip;
  3. filter each query's ranking (`select_negatives`) and keep `num_negatives` of what is left.

Filters (`MiningConfig`, names as in sentence-transformers' `mine_hard_negatives`), applied to a
query's ranking (score descending, ties by lower corpus position) in this order:

  judged positive        every document the qrels grade > 0 for this query (all of them, not
                         only the pair's own) is skipped and takes no rank;
  fingerprint duplicate  a document whose fingerprint equals a positive's (the same text after
                         tokenisation: what the loss treats as the same passage) is skipped and
                         takes no rank (skip_fingerprint_duplicates);
  range_min, range_max   the remaining documents are ranked 0, 1, 2, ...; only ranks in
                         [range_min, range_max) are candidates, the first range_min are dropped;
  max_score              a candidate scoring > max_score is dropped;
  relative_margin        a candidate scoring > p - |p| * relative_margin is dropped, p being the
                         query's lowest positive score (0.05: at least 5% below the positive).

A candidate is counted under the first filter it fails. From the surviving candidates,
`num_negatives` are taken in rank order (sampling_strategy "top") or drawn without replacement
with `np.random.default_rng([seed, query position])` and put back in rank order ("random"), so the
result depends on neither the device count nor the batch sizes. A query left with fewer candidates
keeps all of them (maybe none); the manifest counts such queries.

Unlike sentence-transformers, the rank window is taken before the score filters (range_min=10
always skips the 10 closest non-positive documents, whatever their scores).

Output (`write_hard_negatives`, read back by `samtone_jax.tasks.hard_negatives`):

  hard_negatives.jsonl  one line per training query, in query-id order:
                        {"query_id", "positive_ids", "positive_scores", "negative_ids",
                         "negative_scores"}; negatives in rank order (best first)
  manifest.json         format, task, checkpoint, filters, counts dropped by each filter, the
                        number of queries with fewer than num_negatives, score histograms

Both are written under temporary names and renamed at the end, so a failed run leaves no
half-written file; the same inputs give the same bytes.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import seqio
import tqdm

from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax.evaluation import encoding
from samtone_jax.evaluation import search

FORMAT = "samtone_jax.hard_negatives.v1"
NEGATIVES_FILE = "hard_negatives.jsonl"
MANIFEST_FILE = "manifest.json"
SAMPLING_STRATEGIES = ("top", "random")
# Histogram bins over [-1, 1]: the scores of L2-normalised embeddings (values outside are clipped).
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 21)
DROP_REASONS = ("judged_positive", "fingerprint_duplicate", "range_min", "max_score",
                "relative_margin")


class MiningInputError(errors.UserError, ValueError):
  """The mining inputs or filters are inconsistent; the message says which binding to fix."""


@dataclasses.dataclass(frozen=True)
class MiningConfig:
  """Which retrieved documents become hard negatives (see the module docstring).

  Attributes:
    num_negatives: negatives kept per query.
    range_min: skip the range_min closest non-positive documents (ranks 0 .. range_min - 1).
    range_max: consider ranks below range_max only.
    max_score: drop candidates scoring above it (None: no cap).
    relative_margin: drop candidates scoring above p - |p| * relative_margin, p the query's lowest
      positive score (None: no margin).
    sampling_strategy: "top" (rank order) or "random" (seeded sample of the window).
    seed: the "random" strategy's seed.
    skip_fingerprint_duplicates: skip documents whose text fingerprint equals a positive's.
  """

  num_negatives: int = 8
  range_min: int = 0
  range_max: int = 64
  max_score: float | None = None
  relative_margin: float | None = None
  sampling_strategy: str = "top"
  seed: int = 0
  skip_fingerprint_duplicates: bool = True

  def validate(self) -> None:
    """Raises MiningInputError naming the binding to fix."""
    where = "mining.MiningConfig"
    if self.num_negatives < 1:
      raise MiningInputError(f"{where}.num_negatives={self.num_negatives} must be >= 1.")
    if self.range_min < 0:
      raise MiningInputError(f"{where}.range_min={self.range_min} must be >= 0.")
    if self.range_min >= self.range_max:
      raise MiningInputError(
          f"{where}.range_min={self.range_min} must be smaller than range_max="
          f"{self.range_max}: the window [range_min, range_max) of ranks would be empty.")
    if self.num_negatives > self.range_max - self.range_min:
      raise MiningInputError(
          f"{where}.num_negatives={self.num_negatives} does not fit in the window of "
          f"{self.range_max - self.range_min} ranks [range_min={self.range_min}, range_max="
          f"{self.range_max}); raise range_max or lower num_negatives.")
    if self.sampling_strategy not in SAMPLING_STRATEGIES:
      raise MiningInputError(f"{where}.sampling_strategy={self.sampling_strategy!r}; expected "
                             f"one of {SAMPLING_STRATEGIES}.")
    if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
      raise MiningInputError(f"{where}.relative_margin={self.relative_margin} must be in [0, 1).")


@dataclasses.dataclass
class MiningResult:
  """Mined negatives of Q training queries, in query order.

  Attributes:
    query_ids: Q query ids (sorted).
    positive_rows: Q int64 arrays of the positives' corpus positions (sorted by document id).
    positive_scores: Q float32 arrays, the query's score of each positive.
    negative_rows: Q int64 arrays of the negatives' corpus positions, in rank order.
    negative_scores: Q float32 arrays of their scores.
    dropped: {reason: candidates dropped}, reasons as in DROP_REASONS.
    num_candidates: candidates left after the filters, before `num_negatives` were taken.
    num_short_queries: queries with fewer than num_negatives negatives.
  """

  query_ids: list[str]
  positive_rows: list[np.ndarray]
  positive_scores: list[np.ndarray]
  negative_rows: list[np.ndarray]
  negative_scores: list[np.ndarray]
  dropped: dict[str, int]
  num_candidates: int
  num_short_queries: int


def training_queries(queries: Mapping[str, str], corpus_ids: Sequence[str],
                     qrels: Mapping[str, Mapping[str, int]], *, task: str = "the task"
                     ) -> tuple[list[str], list[np.ndarray]]:
  """The queries to mine for: every query with a judgement of grade > 0, in query-id order.

  Args:
    queries: query id -> text.
    corpus_ids: the N corpus ids, in corpus order.
    qrels: query id -> {document id: grade}.
    task: named in error messages.

  Returns:
    (query ids, positive corpus positions per query: int64 arrays sorted by document id).

  Raises:
    MiningInputError: a positive that is not in the corpus, a judged query without text, or no
      query with a positive at all.
  """
  position = {doc_id: i for i, doc_id in enumerate(corpus_ids)}
  query_ids, positive_rows = [], []
  for query_id in sorted(qrels):
    positives = sorted(d for d, grade in qrels[query_id].items() if grade > 0)
    if not positives:
      continue  # judged, but only as not relevant: nothing to mine against
    if query_id not in queries:
      raise MiningInputError(f"{task}: query {query_id!r} has qrels but no text.")
    missing = [d for d in positives if d not in position]
    if missing:
      raise MiningInputError(
          f"{task}: query {query_id!r} has positive(s) {missing[:5]} that are not in the corpus; "
          "fix the qrels or the corpus (a positive must be a corpus document to be excluded "
          "from its negatives).")
    query_ids.append(query_id)
    positive_rows.append(np.array([position[d] for d in positives], np.int64))
  if not query_ids:
    raise MiningInputError(f"{task}: no query has a judgement with grade > 0; there is "
                           "nothing to mine hard negatives for.")
  return query_ids, positive_rows


def corpus_fingerprints(texts: Sequence[str], vocabulary: seqio.Vocabulary, length: int
                        ) -> np.ndarray:
  """The loss's passage ids of the corpus texts: int32 [N].

  The tokens are the training pipeline's (T5 EOS convention, zero-padded to `length`, the
  passage length), fingerprinted by `feature_converter.fingerprint_tokens`, so two texts get the
  same id here exactly when the loss would treat them as the same passage.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import feature_converter  # pylint: disable=g-import-not-at-top
  out = np.zeros(len(texts), np.int32)
  step = 8192  # bounds the host memory of the int32 [step, length] token block
  for start in range(0, len(texts), step):
    tokens = encoding.tokenize(texts[start:start + step], vocabulary, length)
    out[start:start + len(tokens)] = feature_converter.fingerprint_tokens(
        tf.constant(tokens)).numpy()
  return out


def _excluded_counts(positive_rows: Sequence[np.ndarray], fingerprints: np.ndarray,
                     skip_duplicates: bool) -> np.ndarray:
  """Per query, the corpus rows it skips before ranking: int64 [Q]."""
  if not skip_duplicates:
    return np.array([len(rows) for rows in positive_rows], np.int64)
  values, counts = np.unique(fingerprints, return_counts=True)
  count_of = dict(zip(values.tolist(), counts.tolist()))
  return np.array([sum(count_of[f] for f in set(fingerprints[rows].tolist()))
                   for rows in positive_rows], np.int64)


def select_negatives(scores: np.ndarray, rows: np.ndarray, positive_rows: Sequence[np.ndarray],
                     positive_scores: Sequence[np.ndarray], fingerprints: np.ndarray | None,
                     config: MiningConfig) -> MiningResult:
  """Applies the filters to retrieved rankings (see the module docstring).

  Args:
    scores: float32 [Q, K] retrieval scores, descending per query (-inf past the corpus end).
    rows: int64 [Q, K] corpus positions (-1 past the corpus end). K must cover range_max ranks
      plus every row the query skips, or the whole corpus.
    positive_rows: Q int arrays of each query's positive positions.
    positive_scores: Q float arrays of each query's positive scores.
    fingerprints: int32 [N] corpus fingerprints (None: no duplicate filter).
    config: the filters.

  Returns:
    A MiningResult (query_ids left empty for the caller to fill).
  """
  dropped = dict.fromkeys(DROP_REASONS, 0)
  negative_rows, negative_scores = [], []
  num_candidates = num_short = 0
  for q in range(scores.shape[0]):
    valid = rows[q] >= 0
    row_q, score_q = rows[q][valid], scores[q][valid]
    is_positive = np.isin(row_q, positive_rows[q])
    is_duplicate = np.zeros_like(is_positive)
    if config.skip_fingerprint_duplicates and fingerprints is not None:
      is_duplicate = ~is_positive & np.isin(fingerprints[row_q],
                                            fingerprints[positive_rows[q]])
    ranked = ~is_positive & ~is_duplicate
    rank = np.cumsum(ranked) - 1  # rank of each ranked row among the ranked rows
    # The ranking is read up to (and including) the row of rank range_max - 1.
    ends = np.flatnonzero(ranked & (rank == config.range_max - 1))
    end = ends[0] + 1 if len(ends) else len(row_q)
    row_q, score_q, rank = row_q[:end], score_q[:end], rank[:end]
    is_positive, is_duplicate, ranked = is_positive[:end], is_duplicate[:end], ranked[:end]
    dropped["judged_positive"] += int(is_positive.sum())
    dropped["fingerprint_duplicate"] += int(is_duplicate.sum())
    keep = ranked & (rank >= config.range_min)
    dropped["range_min"] += int((ranked & (rank < config.range_min)).sum())
    if config.max_score is not None:
      over = keep & (score_q > config.max_score)
      dropped["max_score"] += int(over.sum())
      keep &= ~over
    if config.relative_margin is not None:
      lowest = float(np.min(positive_scores[q]))
      threshold = lowest - abs(lowest) * config.relative_margin
      over = keep & (score_q > threshold)
      dropped["relative_margin"] += int(over.sum())
      keep &= ~over
    window = np.flatnonzero(keep)
    num_candidates += len(window)
    if len(window) > config.num_negatives:
      if config.sampling_strategy == "top":
        window = window[:config.num_negatives]
      else:
        rng = np.random.default_rng([config.seed, q])
        window = np.sort(rng.choice(window, size=config.num_negatives, replace=False))
    num_short += len(window) < config.num_negatives
    negative_rows.append(row_q[window].astype(np.int64))
    negative_scores.append(score_q[window].astype(np.float32))
  return MiningResult(query_ids=[], positive_rows=list(positive_rows),
                      positive_scores=list(positive_scores), negative_rows=negative_rows,
                      negative_scores=negative_scores, dropped=dropped,
                      num_candidates=num_candidates, num_short_queries=num_short)


def _gather_rows(shards: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
  """Rows (global positions) of a corpus held as consecutive shards [n_i, P] -> float32 [r, P]."""
  starts = np.cumsum([0] + [len(shard) for shard in shards])
  out = np.zeros((len(rows), shards[0].shape[1]), np.float32)
  shard_of = np.searchsorted(starts, rows, side="right") - 1
  for i, (shard, row) in enumerate(zip(shard_of, rows)):
    out[i] = shards[shard][row - starts[shard]]
  return out


def _with_progress(shards: Sequence[np.ndarray], rows_per_step: int, description: str):
  """Yields the shards in blocks of rows_per_step rows, advancing a progress bar (with ETA) as the
  search consumes them."""
  total = sum(len(shard) for shard in shards)
  with tqdm.tqdm(total=total, desc=description, unit="doc", leave=False) as progress:
    for shard in shards:
      for start in range(0, len(shard), rows_per_step):
        block = shard[start:start + rows_per_step]
        yield block
        progress.update(len(block))


def mine_embeddings(query_embeddings: np.ndarray,
                    corpus_embeddings: np.ndarray | Sequence[np.ndarray],
                    positive_rows: Sequence[np.ndarray], config: MiningConfig, *,
                    fingerprints: np.ndarray | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    chunk_size: int = search.DEFAULT_CHUNK_SIZE,
                    description: str = "searching") -> MiningResult:
  """Hard negatives from embeddings: exact top-k search, then `select_negatives`.

  Args:
    query_embeddings: float32 [Q, P].
    corpus_embeddings: float32 [N, P], or consecutive shards [n_i, P] (e.g. the memory-mapped
      files of `encoding.load_embedding_shards`), read once by the search.
    positive_rows: Q int arrays, each query's positive corpus positions.
    config: the filters.
    fingerprints: int32 [N] corpus fingerprints (None: no duplicate filter).
    mesh: devices the search shards the corpus over (None: one device).
    chunk_size: corpus rows scored per device per search step.

  Returns:
    A MiningResult (query_ids left empty).
  """
  config.validate()
  query_embeddings = np.asarray(query_embeddings, np.float32)
  shards = ([np.asarray(corpus_embeddings, np.float32)] if hasattr(corpus_embeddings, "shape")
            else list(corpus_embeddings))
  num_documents = sum(len(shard) for shard in shards)
  if len(positive_rows) != len(query_embeddings):
    raise ValueError(f"{len(positive_rows)} positive lists for {len(query_embeddings)} queries.")
  if fingerprints is None:
    config = dataclasses.replace(config, skip_fingerprint_duplicates=False)
  excluded = _excluded_counts(positive_rows, fingerprints, config.skip_fingerprint_duplicates)
  k = int(min(num_documents, config.range_max + excluded.max()))
  chunk_size = min(chunk_size, num_documents)
  num_devices = 1 if mesh is None else mesh.devices.size
  scores, rows = search.exact_search(
      query_embeddings, _with_progress(shards, chunk_size * num_devices, description), k,
      mesh=mesh, chunk_size=chunk_size)
  # The positives' scores, for relative_margin and the manifest: one float32 dot per pair.
  positive_scores = [_gather_rows(shards, rows_q) @ query_embeddings[q]
                     for q, rows_q in enumerate(positive_rows)]
  return select_negatives(scores, rows, positive_rows, positive_scores, fingerprints, config)


def mine(encode_queries: encoding.EncodeFn, encode_documents: encoding.EncodeFn, eval_set,
         config: MiningConfig, *, mesh: jax.sharding.Mesh | None = None,
         batch_size: int = 256, chunk_size: int = search.DEFAULT_CHUNK_SIZE,
         embeddings_dir: str | None = None, shard_size: int = 1_000_000,
         resume_key: Mapping[str, Any] | None = None) -> MiningResult:
  """Mines hard negatives for the training queries of `eval_set` with a dual encoder.

  Args:
    encode_queries, encode_documents: the two towers (`runner.LoadedModel.encode_fns()`).
    eval_set: a `tasks.eval_sets.EvalSet` (queries, corpus, qrels, vocabulary, lengths).
    config: the filters.
    mesh: the mesh the encoders run on; the search shards the corpus over it too.
    batch_size: texts per encoder call.
    chunk_size: corpus rows scored per device per search step.
    embeddings_dir: None: the corpus embeddings are held in memory. Else they are written there
      as `.npy` shards (`encoding.encode_to_shards`) and searched memory-mapped, and a run killed
      while encoding resumes from the complete shards (when `resume_key` is the same).
    shard_size: corpus rows per shard.
    resume_key: what makes two encodings of the corpus equal (checkpoint, lengths, ...).

  Returns:
    The MiningResult, query_ids filled.
  """
  config.validate()
  corpus_ids = list(eval_set.corpus)
  query_ids, positive_rows = training_queries(eval_set.queries, corpus_ids, eval_set.qrels,
                                              task=eval_set.name)
  corpus_texts = [eval_set.corpus[d] for d in corpus_ids]
  query_embeddings = encoding.encode_texts(
      [eval_set.queries[q] for q in query_ids], encode_queries, eval_set.vocabulary,
      eval_set.query_length, batch_size=batch_size, mesh=mesh,
      description=f"encoding {eval_set.name} queries")
  description = f"encoding {eval_set.name} corpus"
  if embeddings_dir is None:
    corpus_embeddings = encoding.encode_texts(
        corpus_texts, encode_documents, eval_set.vocabulary, eval_set.document_length,
        batch_size=batch_size, mesh=mesh, description=description)
  else:
    key = {"task": eval_set.name, "document_length": eval_set.document_length,
           "num_documents": len(corpus_ids), **dict(resume_key or {})}
    encoding.encode_to_shards(corpus_ids, corpus_texts, encode_documents, eval_set.vocabulary,
                              eval_set.document_length, embeddings_dir, shard_size=shard_size,
                              batch_size=batch_size, mesh=mesh, description=description,
                              resume_key=key)
    stored_ids, corpus_embeddings = encoding.load_embedding_shards(embeddings_dir)
    if stored_ids != corpus_ids:
      raise MiningInputError(f"{embeddings_dir} holds the embeddings of other documents; delete "
                             "it or choose another MINE_EMBEDDINGS_DIR.")
  fingerprints = None
  if config.skip_fingerprint_duplicates:
    fingerprints = corpus_fingerprints(corpus_texts, eval_set.vocabulary,
                                       eval_set.document_length)
  result = mine_embeddings(query_embeddings, corpus_embeddings, positive_rows, config,
                           fingerprints=fingerprints, mesh=mesh, chunk_size=chunk_size,
                           description=f"searching {eval_set.name}")
  result.query_ids = query_ids
  return result


def _histogram(values: Sequence[np.ndarray]) -> list[int]:
  flat = np.concatenate([np.asarray(v, np.float64) for v in values] or [np.zeros(0)])
  counts, _ = np.histogram(np.clip(flat, -1.0, 1.0), bins=HISTOGRAM_EDGES)
  return counts.tolist()


def _score(value) -> float:
  # Six decimals: readable lines, and the same text for the same float32 score.
  return round(float(value), 6)


def write_hard_negatives(result: MiningResult, corpus_ids: Sequence[str], output_dir: str, *,
                         config: MiningConfig, metadata: Mapping[str, Any]) -> dict[str, Any]:
  """Writes `hard_negatives.jsonl` and `manifest.json` to `output_dir` (see the module docstring).

  Each file is written to `<name>.tmp` and renamed when complete (the manifest last), so a
  crashed run leaves no half-written output under the final names. Only process 0 writes.

  Args:
    result: the mined negatives (query_ids filled).
    corpus_ids: the N corpus ids, in the corpus order the result's rows refer to.
    output_dir: created if missing.
    config: the filters, recorded in the manifest.
    metadata: JSON-serialisable facts for the manifest (task, checkpoint, lengths, ...).

  Returns:
    The manifest.
  """
  lines = []
  for q, query_id in enumerate(result.query_ids):
    lines.append(json.dumps({
        "query_id": query_id,
        "positive_ids": [corpus_ids[r] for r in result.positive_rows[q]],
        "positive_scores": [_score(s) for s in result.positive_scores[q]],
        "negative_ids": [corpus_ids[r] for r in result.negative_rows[q]],
        "negative_scores": [_score(s) for s in result.negative_scores[q]],
    }, ensure_ascii=False))
  num_negatives = [len(rows) for rows in result.negative_rows]
  manifest = {
      "format": FORMAT,
      **dict(metadata),
      "filters": dataclasses.asdict(config),
      "num_queries": len(result.query_ids),
      "num_corpus_documents": len(corpus_ids),
      "num_negatives_written": int(sum(num_negatives)),
      "num_queries_with_fewer_negatives": result.num_short_queries,
      "num_queries_without_negatives": int(sum(n == 0 for n in num_negatives)),
      "dropped": dict(result.dropped),
      "num_candidates_after_filters": result.num_candidates,
      "score_histograms": {
          "bin_edges": [_score(e) for e in HISTOGRAM_EDGES],
          "positive_scores": _histogram(result.positive_scores),
          "negative_scores": _histogram(result.negative_scores),
      },
  }
  if jax.process_index() != 0:  # every process mined the same; one writes
    return manifest
  io_utils.makedirs(output_dir)
  negatives_path = os.path.join(output_dir, NEGATIVES_FILE)
  manifest_path = os.path.join(output_dir, MANIFEST_FILE)
  for path, text in ((negatives_path, "".join(line + "\n" for line in lines)),
                     (manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")):
    with io_utils.open_file(path + ".tmp", "w") as f:
      f.write(text)
    io_utils.rename(path + ".tmp", path)
  logging.info("Wrote %d queries' hard negatives to %s", len(lines), negatives_path)
  return manifest


def mine_to_directory(*, checkpoint_path: str, model, task: str, output_dir: str,
                      filters: MiningConfig, feature_lengths: dict[str, int] | None = None,
                      batch_size: int = 256, chunk_size: int = search.DEFAULT_CHUNK_SIZE,
                      embeddings_dir: str | None = None, shard_size: int = 1_000_000,
                      mesh_shape: tuple[int, int] = (-1, 1),
                      tasks_module: str = "samtone_jax.tasks.all") -> dict[str, Any]:
  """What `python -m samtone_jax.mine` runs (gin/runs/mine.gin binds it): load, mine, write.

  Every input is checked (filters, task, positives, checkpoint) before anything is written.

  Args:
    checkpoint_path: a samtone_jax run directory, its checkpoints/ or one checkpoints/<step>
      directory (CHECKPOINT_PATH).
    model: the DualEncoderConfig the checkpoint was trained with.
    task: a registered training set with a corpus and qrels (MINE_TASK), e.g. "beir_<name>_train",
      "msmarco_passage_train" or "demo_manpages_train".
    output_dir: where hard_negatives.jsonl and manifest.json go (MINE_OUTPUT_DIR).
    filters: the MiningConfig.
    feature_lengths: {"queries": Lq, "passages": Lp}, the training lengths (TASK_FEATURE_LENGTHS);
      None: the set's own.
    batch_size: texts per encoder call.
    chunk_size: corpus rows scored per device per search step.
    embeddings_dir: where the corpus embeddings go as resumable `.npy` shards
      (MINE_EMBEDDINGS_DIR); None: in memory (fine up to a few million documents per host).
    shard_size: corpus rows per shard.
    mesh_shape: (data, model) mesh sizes.
    tasks_module: imported to register the sets.

  Returns:
    The manifest.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from samtone_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from samtone_jax.tasks import eval_sets  # pylint: disable=g-import-not-at-top
  filters.validate()
  importlib.import_module(tasks_module)
  if task not in eval_sets.registered_eval_sets():
    import seqio as seqio_lib  # pylint: disable=g-import-not-at-top
    kind = ("a seqio training task without a registered corpus and qrels"
            if task in seqio_lib.TaskRegistry.names() else "not registered")
    suggestion = (f"use {task + '_train'!r}" if task + "_train" in eval_sets.registered_eval_sets()
                  else "use a BEIR-layout training split (\"beir_<name>_train\", registered for "
                  "directories with qrels/train.tsv), \"msmarco_passage_train\" or "
                  "\"demo_manpages_train\"")
    raise MiningInputError(
        f"MINE_TASK={task!r} is {kind}. Mining needs the training queries, their qrels and the "
        f"corpus: {suggestion}. Registered sets: {eval_sets.registered_eval_sets()}")
  eval_set = runner.get_eval_set(task, feature_lengths)
  corpus_ids = list(eval_set.corpus)
  training_queries(eval_set.queries, corpus_ids, eval_set.qrels, task=task)  # fail before load
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  encode_queries, encode_documents = loaded.encode_fns()
  # The step directory, not the run directory: a run that saved a newer step is another model.
  checkpoint = (checkpoints.resolve_step_dir(checkpoint_path)
                if checkpoints.is_samtone_checkpoint(checkpoint_path)
                else io_utils.abspath(checkpoint_path))
  result = mine(encode_queries, encode_documents, eval_set, filters, mesh=loaded.mesh,
                batch_size=batch_size, chunk_size=chunk_size, embeddings_dir=embeddings_dir,
                shard_size=shard_size, resume_key={"checkpoint": checkpoint})
  metadata = {"task": task, "checkpoint_path": checkpoint_path, "checkpoint": checkpoint,
              "query_length": eval_set.query_length,
              "document_length": eval_set.document_length}
  manifest = write_hard_negatives(result, corpus_ids, output_dir, config=filters,
                                  metadata=metadata)
  print(f"Mined {manifest['num_negatives_written']} hard negatives for "
        f"{manifest['num_queries']} queries of {task} into {output_dir} "
        f"({manifest['num_queries_with_fewer_negatives']} queries with fewer than "
        f"{filters.num_negatives}; dropped: {manifest['dropped']})", flush=True)
  return manifest
