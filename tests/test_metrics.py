"""samtone_jax.evaluation.metrics against trec_eval (pytrec_eval) and scipy."""

import numpy as np
import pytest
import pytrec_eval
import scipy.stats

from samtone_jax.evaluation import metrics

# Our name -> pytrec_eval measure (mrr@k has no trec_eval measure: recip_rank on the cut run).
TREC_MEASURES = {
    "mrr": "recip_rank", "ndcg": "ndcg", "map": "map", "recall": "set_recall",
    "ndcg@1": "ndcg_cut_1", "ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10",
    "ndcg@100": "ndcg_cut_100", "recall@1": "recall_1", "recall@5": "recall_5",
    "recall@100": "recall_100", "p@1": "P_1", "p@3": "P_3", "p@50": "P_50", "map@5": "map_cut_5",
}
MRR_CUTOFFS = (1, 3, 10, 100)


def _trec_sorted(ranking):
  """Reference order written independently: score descending, then doc id descending."""
  return sorted(ranking.items(), key=lambda item: (item[1], item[0]), reverse=True)


def _reference(qrels, run):
  """Means over the qrels' queries of pytrec_eval's per-query values (missing queries: 0)."""
  run = {q: r for q, r in run.items() if r}
  evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(TREC_MEASURES.values()))
  per_query = evaluator.evaluate(run)
  expected = {name: sum(v[measure] for v in per_query.values()) / len(qrels)
              for name, measure in TREC_MEASURES.items()}
  recip = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
  for k in MRR_CUTOFFS:
    cut = {q: dict(_trec_sorted(r)[:k]) for q, r in run.items()}
    values = recip.evaluate(cut)
    expected[f"mrr@{k}"] = sum(v["recip_rank"] for v in values.values()) / len(qrels)
  return expected


def _random_case(rng):
  # Ids of different lengths so that string order differs from numeric order ("d10" < "d9").
  pool = [f"d{i}" for i in rng.choice(200, size=rng.integers(3, 40), replace=False)]
  num_queries = int(rng.integers(1, 7))
  qrels, run = {}, {}
  for q in range(num_queries):
    judged = rng.choice(pool, size=rng.integers(1, len(pool) + 1), replace=False)
    grades = rng.integers(0, 4, size=len(judged))
    if rng.random() < 0.15:
      grades[:] = 0  # A query with no relevant document.
    qrels[f"q{q}"] = {str(d): int(g) for d, g in zip(judged, grades)}
    if rng.random() < 0.2:
      continue  # A qrels query missing from the run.
    retrieved = rng.choice(pool, size=rng.integers(1, len(pool) + 1), replace=False)
    if rng.random() < 0.5:
      scores = rng.integers(0, 4, size=len(retrieved)) / 2.0  # Many ties.
    else:
      scores = rng.normal(size=len(retrieved))
    run[f"q{q}"] = {str(d): float(s) for d, s in zip(retrieved, scores)}
  if rng.random() < 0.3:
    run["not_judged"] = {pool[0]: 1.0}  # A run query without qrels is ignored.
  return qrels, run


def test_equals_pytrec_eval_on_random_runs():
  rng = np.random.default_rng(0)
  names = list(TREC_MEASURES) + [f"mrr@{k}" for k in MRR_CUTOFFS]
  for case in range(300):
    qrels, run = _random_case(rng)
    ours = metrics.evaluate_run(qrels, run, names)
    expected = _reference(qrels, run)
    for name in names:
      assert ours[name] == pytest.approx(expected[name], abs=1e-6), (case, name)


def test_per_query_equals_pytrec_eval():
  rng = np.random.default_rng(1)
  qrels, run = _random_case(rng)
  while len(run) < 2:
    qrels, run = _random_case(rng)
  per_query = metrics.evaluate_run_per_query(qrels, run, ["ndcg@10", "map"])
  reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "map"}).evaluate(
      {q: r for q, r in run.items() if r})
  assert set(per_query["map"]) == set(qrels)
  for q in qrels:
    expected = reference.get(q, {"ndcg_cut_10": 0.0, "map": 0.0})
    assert per_query["ndcg@10"][q] == pytest.approx(expected["ndcg_cut_10"], abs=1e-9)
    assert per_query["map"][q] == pytest.approx(expected["map"], abs=1e-9)


def test_ties_are_broken_by_doc_id_descending_like_trec_eval():
  # All three tied: trec_eval ranks "c" (grade 2) second, after "d" with the higher score.
  qrels = {"q": {"a": 1, "b": 0, "c": 2}}
  run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "d": 2.0}}
  expected = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_3"}).evaluate(run)["q"]["ndcg_cut_3"]
  ours = metrics.evaluate_run(qrels, run, ["ndcg@3", "mrr@2", "mrr@1"])
  assert ours["ndcg@3"] == pytest.approx(expected, abs=1e-12)
  assert ours["ndcg@3"] == pytest.approx((2 / np.log2(3)) / (2 + 1 / np.log2(3)))
  assert ours["mrr@2"] == 0.5 and ours["mrr@1"] == 0.0
  np.testing.assert_array_equal(metrics.trec_order(["a", "b", "c", "d"], [1, 1, 1, 2]),
                                [3, 2, 1, 0])


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="Unknown metric"):
    metrics.evaluate_run({"q": {"a": 1}}, {}, ["mrr@0"])
  with pytest.raises(ValueError, match="needs a cutoff"):
    metrics.evaluate_run({"q": {"a": 1}}, {}, ["p"])
  with pytest.raises(ValueError, match=r"qrels\['q'\]\['a'\]"):
    metrics.evaluate_run({"q": {"a": 1.5}}, {}, ["map"])
  with pytest.raises(ValueError, match="NaN"):
    metrics.evaluate_run({"q": {"a": 1}}, {"q": {"a": float("nan"), "b": 1.0}}, ["map"])


def test_paired_t_test_equals_formula():
  rng = np.random.default_rng(2)
  a = rng.random(50)
  b = a - 0.05 + 0.1 * rng.random(50)
  differences = a - b
  t = differences.mean() / (differences.std(ddof=1) / np.sqrt(len(a)))
  expected = 2 * scipy.stats.t.sf(abs(t), df=len(a) - 1)
  qids = [f"q{i}" for i in range(50)]
  p = metrics.paired_t_test(dict(zip(qids, a)), dict(zip(qids, b)))
  assert p == pytest.approx(expected, rel=1e-9)
  assert metrics.paired_t_test(a, a) == 1.0


def test_paired_bootstrap_equals_loop_reference_and_agrees_with_t_test():
  rng = np.random.default_rng(3)
  a = rng.normal(size=40)
  b = a + rng.normal(0.2, 1.0, size=40)
  # Reference: one resample at a time from the same generator stream.
  reference_rng = np.random.default_rng(7)
  d = a - b
  extreme = 0
  for _ in range(500):
    sample = (d - d.mean())[reference_rng.integers(0, len(d), size=len(d))]
    extreme += abs(sample.mean()) >= abs(d.mean())
  p = metrics.paired_bootstrap_test(a, b, num_samples=500, seed=7, block_size=128)
  assert p == extreme / 500
  # With many samples the bootstrap p-value is close to the t-test's on normal data.
  p_large = metrics.paired_bootstrap_test(a, b, num_samples=20_000, seed=0)
  assert p_large == pytest.approx(metrics.paired_t_test(a, b), abs=0.03)
  assert metrics.paired_bootstrap_test(a, a, num_samples=100) == 1.0


def test_compare_runs():
  qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
  good = {"q1": {"a": 2.0, "x": 1.0}, "q2": {"b": 2.0, "x": 1.0}, "q3": {"c": 2.0, "x": 1.0}}
  bad = {"q1": {"a": 1.0, "x": 2.0}, "q2": {"b": 1.0, "x": 2.0}, "q3": {"c": 2.0, "x": 1.0}}
  result = metrics.compare_runs(qrels, good, bad, "mrr@10", test="bootstrap", num_samples=200)
  assert result["mean_a"] == 1.0 and result["mean_b"] == pytest.approx(2 / 3)
  assert result["difference"] == pytest.approx(1 / 3)
  assert 0.0 <= result["p_value"] <= 1.0
