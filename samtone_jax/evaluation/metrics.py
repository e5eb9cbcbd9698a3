"""Ranking metrics with trec_eval's semantics, vectorised over queries, and significance tests.

The one metrics implementation of the project. Runs and qrels are the usual nested dicts:

  qrels: {query_id: {doc_id: graded relevance (int >= 0; > 0 is relevant)}}
  run:   {query_id: {doc_id: score}}

Metric names (case-insensitive), each equal to a trec_eval measure (as computed by
`pytrec_eval`, tested to 1e-6 on random runs with ties):

  mrr@k     recip_rank on the run cut at its top k documents (trec_eval has no cut for it).
  mrr       recip_rank over the whole run.
  ndcg@k    ndcg_cut_k: gains are the relevance grades, discount 1 / log2(rank + 1), the ideal
            ranking sorts all judged relevant documents of the query.
  ndcg      ndcg over the whole run.
  recall@k  recall_k: relevant documents in the top k / all relevant documents of the query.
  recall    set_recall: relevant documents retrieved / all relevant documents of the query.
  p@k       P_k: relevant documents in the top k / k (k, even if fewer were retrieved).
  map       map: sum of precision at each relevant retrieved document / all relevant documents.
  map@k     map_cut_k.

Conventions (pinned against pytrec_eval and documented here because they change numbers):
  * Order: trec_eval sorts a query's documents by score, descending, and breaks ties by document
    id, descending (byte-wise string comparison) -- not by the order in the run or its rank column.
  * Relevant: grade >= 1 for the binary measures; nDCG uses the grades themselves as gains.
  * Averaging: over the qrels' queries (trec_eval's `-c`). pytrec_eval returns values only for
    queries that are in both the run and the qrels; a qrels query missing from the run (or with an
    empty ranking) contributes 0 here, a run query without qrels is ignored, and a qrels query with
    no relevant document scores 0 on every measure (pytrec_eval does the same for it). So the means
    here equal `sum(pytrec_eval per-query values) / len(qrels)`; when the run holds every qrels
    query (as retrieval runs do) that is exactly pytrec_eval's mean.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re

import numpy as np
import scipy.stats

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

DEFAULT_METRICS = ("mrr@10", "ndcg@10", "recall@100", "p@1", "map")

_METRIC_PATTERN = re.compile(r"^(mrr|ndcg|recall|p|map)(?:@([1-9][0-9]*))?$")


@dataclasses.dataclass(frozen=True)
class _Metric:
  name: str  # as the caller spelled it; the key of the results.
  kind: str  # mrr, ndcg, recall, p, map.
  cutoff: int | None  # None: the whole run.


def _parse_metric(name: str) -> _Metric:
  match = _METRIC_PATTERN.match(name.strip().lower())
  if match is None:
    raise ValueError(f"Unknown metric {name!r}; expected one of mrr[@k], ndcg[@k], recall[@k], "
                     f"p@k, map[@k] with an integer k >= 1.")
  kind, cutoff = match.group(1), match.group(2)
  if kind == "p" and cutoff is None:
    raise ValueError(f"Metric {name!r} needs a cutoff, e.g. 'p@1'.")
  return _Metric(name, kind, None if cutoff is None else int(cutoff))


def trec_order(doc_ids: Sequence[str], scores: np.ndarray) -> np.ndarray:
  """The permutation that sorts documents as trec_eval does: score desc, then doc id desc.

  Args:
    doc_ids: [n] document ids.
    scores: [n] float scores.

  Returns:
    int [n] indices into `doc_ids`, best first.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if np.isnan(scores).any():
    raise ValueError("The run has NaN scores; trec_eval's order is undefined for them.")
  order = np.argsort(-scores, kind="stable")
  sorted_scores = scores[order]
  if len(order) > 1 and np.any(sorted_scores[1:] == sorted_scores[:-1]):
    # Ties: rank the ids (all distinct within a query) and sort by (-score, -id rank).
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[np.argsort(np.asarray(doc_ids, dtype=str), kind="stable")] = np.arange(len(doc_ids))
    order = np.lexsort((-id_rank, -scores))
  return order


def _check_grade(query_id: str, doc_id: str, grade) -> int:
  if isinstance(grade, bool) or not float(grade).is_integer() or grade < 0:
    raise ValueError(f"qrels[{query_id!r}][{doc_id!r}] = {grade!r}: relevance grades must be "
                     f"integers >= 0.")
  return int(grade)


def _ranked_gains(qrels: Qrels, run: Run, depth: int | None,
                  query_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Relevance grades of each query's ranking, in trec_eval order.

  Returns:
    gains: float64 [Q, K] grades of the ranked documents (0 beyond a query's ranking); K is the
      longest ranking, cut at `depth` when given.
    num_relevant: float64 [Q] judged documents with grade >= 1 per query.
    ideal: float64 [Q, R] the query's positive grades sorted descending, zero padded.
  """
  lengths = [len(run.get(q) or ()) for q in query_ids]
  width = max(lengths, default=0)
  if depth is not None:
    width = min(width, depth)
  gains = np.zeros((len(query_ids), width))
  positive = []
  for row, query_id in enumerate(query_ids):
    judged = qrels[query_id]
    grades = sorted((g for g in (_check_grade(query_id, d, g) for d, g in judged.items()) if g > 0),
                    reverse=True)
    positive.append(grades)
    ranking = run.get(query_id)
    if not ranking:
      continue
    # Only relevant documents have non-zero gains, so instead of sorting the whole ranking we
    # find the trec_eval rank of each relevant retrieved document: the number of documents with
    # a higher score plus the tied ones with a larger id.
    scores = np.array(list(ranking.values()), dtype=np.float64)
    if np.isnan(scores).any():
      raise ValueError(f"run[{query_id!r}] has NaN scores; trec_eval's order is undefined.")
    hits = [(d, g) for d, g in judged.items() if g > 0 and d in ranking]
    if not hits:
      continue
    hit_scores = np.array([ranking[d] for d, _ in hits], dtype=np.float64)
    ranks = (scores[None, :] > hit_scores[:, None]).sum(axis=1)
    num_equal = (scores[None, :] == hit_scores[:, None]).sum(axis=1)
    doc_ids = None
    for i in np.flatnonzero(num_equal > 1):
      if doc_ids is None:
        doc_ids = np.array(list(ranking), dtype=object)
      tied = doc_ids[scores == hit_scores[i]]
      ranks[i] += sum(1 for d in tied if d > hits[i][0])
    keep = ranks < width
    gains[row, ranks[keep]] = np.array([g for _, g in hits], dtype=np.float64)[keep]
  num_relevant = np.array([len(g) for g in positive], dtype=np.float64)
  ideal = np.zeros((len(query_ids), max((len(g) for g in positive), default=0)))
  for row, grades in enumerate(positive):
    ideal[row, :len(grades)] = grades
  return gains, num_relevant, ideal


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64),
                   where=denominator > 0)


def _dcg(gains: np.ndarray, cutoff: int | None) -> np.ndarray:
  gains = gains if cutoff is None else gains[:, :cutoff]
  discounts = np.log2(np.arange(2, gains.shape[1] + 2, dtype=np.float64))
  return (gains / discounts).sum(axis=1)


def _compute(metric: _Metric, gains: np.ndarray, num_relevant: np.ndarray,
             ideal: np.ndarray) -> np.ndarray:
  """Per-query values [Q] of one metric from the ranked grades."""
  cut = gains if metric.cutoff is None else gains[:, :metric.cutoff]
  relevant = cut > 0
  if metric.kind == "ndcg":
    return _safe_divide(_dcg(cut, None), _dcg(ideal, metric.cutoff))
  if metric.kind == "mrr":
    if cut.shape[1] == 0:
      return np.zeros(cut.shape[0])
    first = np.argmax(relevant, axis=1)
    return np.where(relevant.any(axis=1), 1.0 / (first + 1.0), 0.0)
  hits = relevant.sum(axis=1, dtype=np.float64)
  if metric.kind == "p":
    return hits / metric.cutoff
  if metric.kind == "recall":
    return _safe_divide(hits, num_relevant)
  if metric.kind == "map":
    ranks = np.arange(1, cut.shape[1] + 1, dtype=np.float64)
    precision_at_hits = np.where(relevant, np.cumsum(relevant, axis=1) / ranks, 0.0)
    return _safe_divide(precision_at_hits.sum(axis=1), num_relevant)
  raise AssertionError(metric)


def evaluate_run_per_query(qrels: Qrels, run: Run,
                           metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
  """Per-query metric values for every query of the qrels.

  Args:
    qrels: {query_id: {doc_id: grade}}; defines the queries that are scored.
    run: {query_id: {doc_id: score}}; queries not in the qrels are ignored.
    metrics: metric names (see the module docstring).

  Returns:
    {metric name: {query_id: value}}; a qrels query missing from the run has value 0.
  """
  parsed = [_parse_metric(m) for m in metrics]
  query_ids = list(qrels)
  cutoffs = [m.cutoff for m in parsed]
  depth = None if (not cutoffs or None in cutoffs) else max(cutoffs)
  gains, num_relevant, ideal = _ranked_gains(qrels, run, depth, query_ids)
  results = {}
  for metric in parsed:
    values = _compute(metric, gains, num_relevant, ideal)
    results[metric.name] = dict(zip(query_ids, values.tolist()))
  return results


def evaluate_run(qrels: Qrels, run: Run,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
  """Mean metric values over the qrels' queries (see the module docstring for the conventions).

  Args:
    qrels: {query_id: {doc_id: graded relevance}}.
    run: {query_id: {doc_id: score}}.
    metrics: names such as "mrr@10", "ndcg@10", "recall@100", "p@1", "map".

  Returns:
    {metric name: mean over the qrels' queries}; 0.0 for every metric when the qrels are empty.
  """
  per_query = evaluate_run_per_query(qrels, run, metrics)
  return {name: (math.fsum(values.values()) / len(values) if values else 0.0)
          for name, values in per_query.items()}


def _paired_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
  """Aligns two per-query results ({query_id: value} dicts or equal-length sequences)."""
  if isinstance(a, Mapping) or isinstance(b, Mapping):
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
      raise TypeError("Pass both per-query results as {query_id: value} dicts, or both as arrays.")
    if a.keys() != b.keys():
      missing = sorted(set(a) ^ set(b))[:5]
      raise ValueError(f"The two runs are scored on different queries (e.g. {missing}); a paired "
                       f"test needs the same queries.")
    keys = list(a)
    return (np.array([a[k] for k in keys], dtype=np.float64),
            np.array([b[k] for k in keys], dtype=np.float64))
  a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"Per-query values must be two vectors of equal length; got {a.shape}, "
                     f"{b.shape}.")
  return a, b


def paired_t_test(a, b) -> float:
  """Two-sided p-value of the paired t-test (scipy.stats.ttest_rel) on per-query values.

  Args:
    a, b: per-query values of two systems: {query_id: value} dicts with the same keys, or [Q]
      arrays in the same query order.

  Returns:
    The p-value; 1.0 when every per-query difference is equal to the others (no variance, where
    the t statistic is undefined; the systems are indistinguishable by this test).
  """
  a, b = _paired_arrays(a, b)
  differences = a - b
  if len(differences) < 2 or np.all(differences == differences[0]):
    return 1.0
  return float(scipy.stats.ttest_rel(a, b).pvalue)


def paired_bootstrap_test(a, b, *, num_samples: int = 10_000, seed: int = 0,
                          block_size: int = 1_000) -> float:
  """Two-sided p-value of the paired bootstrap test on the mean difference of per-query values.

  The null hypothesis is imposed by shifting the per-query differences d = a - b to mean zero
  (Efron & Tibshirani 1993, sec. 16.4; Sakai 2006); the p-value is the fraction of bootstrap means
  of the shifted differences whose magnitude reaches |mean(d)|. Deterministic for a given seed.

  Args:
    a, b: per-query values ({query_id: value} dicts with the same keys, or [Q] arrays).
    num_samples: bootstrap resamples of the Q queries (with replacement).
    seed: seed of numpy's default_rng.
    block_size: resamples drawn at once (bounds the memory to block_size * Q indices).

  Returns:
    The p-value in [0, 1].
  """
  a, b = _paired_arrays(a, b)
  differences = a - b
  if len(differences) == 0:
    raise ValueError("No queries to compare.")
  observed = differences.mean()
  centred = differences - observed
  rng = np.random.default_rng(seed)
  extreme = 0
  for start in range(0, num_samples, block_size):
    size = min(block_size, num_samples - start)
    indices = rng.integers(0, len(centred), size=(size, len(centred)))
    means = centred[indices].mean(axis=1)
    # The tolerance keeps floating-point noise in a zero difference from counting as "less extreme".
    extreme += int(np.sum(np.abs(means) >= abs(observed) - 1e-12))
  return extreme / num_samples


def compare_runs(qrels: Qrels, run_a: Run, run_b: Run, metric: str, *,
                 test: str = "t-test", num_samples: int = 10_000,
                 seed: int = 0) -> dict[str, float]:
  """Compares two runs on one metric with a paired significance test over the qrels' queries.

  Args:
    qrels, run_a, run_b: as for `evaluate_run`.
    metric: one metric name, e.g. "mrr@10".
    test: "t-test" (paired t-test) or "bootstrap" (paired bootstrap, `num_samples`, `seed`).

  Returns:
    {"mean_a", "mean_b", "difference" (a - b), "p_value"}.
  """
  a = evaluate_run_per_query(qrels, run_a, [metric])[metric]
  b = evaluate_run_per_query(qrels, run_b, [metric])[metric]
  if test == "t-test":
    p_value = paired_t_test(a, b)
  elif test == "bootstrap":
    p_value = paired_bootstrap_test(a, b, num_samples=num_samples, seed=seed)
  else:
    raise ValueError(f"test={test!r}; expected 't-test' or 'bootstrap'.")
  mean_a = math.fsum(a.values()) / max(len(a), 1)
  mean_b = math.fsum(b.values()) / max(len(b), 1)
  return {"mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b, "p_value": p_value}
