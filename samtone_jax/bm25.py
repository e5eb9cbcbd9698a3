"""BM25 lexical retrieval, the reference row of the demo's results table.

Okapi BM25 (rank_bm25's implementation, k1=1.5, b=0.75) over lower-cased alphanumeric word
tokens; the run it produces is scored by the same metric code as the dual encoders
(`samtone_jax.evaluation.metrics.evaluate_run`).
"""

from collections.abc import Sequence
import re

import numpy as np
import rank_bm25

from samtone_jax.evaluation import metrics as metrics_lib
from samtone_jax.tasks import eval_sets

_WORD = re.compile(r"[a-z0-9_]+")


def tokenize(text: str) -> list[str]:
  """Lower-cased alphanumeric words (underscores kept: identifiers such as `getopt_long`)."""
  return _WORD.findall(text.lower())


def bm25_run(eval_set: eval_sets.EvalSet, k: int = 100) -> metrics_lib.Run:
  """Top-`k` BM25 results of every query of `eval_set` over its corpus: {qid: {doc id: score}}."""
  doc_ids = list(eval_set.corpus)
  index = rank_bm25.BM25Okapi([tokenize(eval_set.corpus[d]) for d in doc_ids])
  run = {}
  for query_id, query in eval_set.queries.items():
    scores = np.asarray(index.get_scores(tokenize(query)))
    top = np.argsort(-scores, kind="stable")[:k]
    run[query_id] = {doc_ids[i]: float(scores[i]) for i in top}
  return run


def evaluate_bm25(eval_set: eval_sets.EvalSet, metrics: Sequence[str], k: int = 100
                  ) -> dict[str, float]:
  """BM25's mean metrics on `eval_set` (queries without qrels are not scored)."""
  queries = {q: t for q, t in eval_set.queries.items() if q in eval_set.qrels}
  scored = eval_sets.EvalSet(**{**eval_set.__dict__, "queries": queries})
  return metrics_lib.evaluate_run(eval_set.qrels, bm25_run(scored, k), list(metrics))
