"""Hard-negative mining (`evaluation.mining`) against a brute-force numpy reference.

The fixture's embeddings are multiples of 1/4 with 4 components, so every score is a multiple of
1/16 and exact in float32 and float64 alike: the reference can rank with numpy's float64 matrix
product and a stable sort, and ties (planted: equal corpus rows) must come out in corpus order.
"""

import dataclasses
import os

import numpy as np
import pytest

from samtone_jax import partitioning
from samtone_jax.evaluation import mining

NUM_DOCS = 48
DIM = 4


def reference_mine(queries, corpus, positive_rows, fingerprints, config):
  """The filters of the mining module's docstring, one candidate at a time over a full sort.

  Returns: ([negative rows per query], [their scores], {reason: count}).
  """
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  dropped = dict.fromkeys(mining.DROP_REASONS, 0)
  all_rows, all_scores = [], []
  for q in range(len(queries)):
    order = np.lexsort((np.arange(len(corpus)), -scores[q]))  # score desc, then position asc
    positives = set(positive_rows[q].tolist())
    positive_prints = {fingerprints[p] for p in positives}
    lowest = min(scores[q][p] for p in positives)
    window, rank = [], 0
    for position, row in enumerate(order):
      if row in positives:
        dropped["judged_positive"] += 1
        continue
      if config.skip_fingerprint_duplicates and fingerprints[row] in positive_prints:
        dropped["fingerprint_duplicate"] += 1
        continue
      rank += 1
      if rank - 1 < config.range_min:
        dropped["range_min"] += 1
      elif config.max_score is not None and scores[q][row] > config.max_score:
        dropped["max_score"] += 1
      elif (config.relative_margin is not None
            and scores[q][row] > lowest - abs(lowest) * config.relative_margin):
        dropped["relative_margin"] += 1
      else:
        window.append(position)
      if rank == config.range_max:  # the ranking is read up to rank range_max - 1
        break
    if len(window) > config.num_negatives:
      if config.sampling_strategy == "top":
        window = window[:config.num_negatives]
      else:
        rng = np.random.default_rng([config.seed, q])
        window = sorted(rng.choice(np.array(window), size=config.num_negatives, replace=False))
    all_rows.append([int(order[p]) for p in window])
    all_scores.append([scores[q][order[p]] for p in window])
  return all_rows, all_scores, dropped


@pytest.fixture(scope="module")
def fixture():
  rng = np.random.default_rng(7)
  corpus = rng.integers(-2, 3, size=(NUM_DOCS, DIM)).astype(np.float32) / 4
  corpus[1] = corpus[0]           # a tie: equal rows, different texts (fingerprints)
  corpus[9] = corpus[8]
  fingerprints = np.arange(NUM_DOCS, dtype=np.int32) * 7919
  queries = rng.integers(-2, 3, size=(6, DIM)).astype(np.float32) / 4
  positive_rows = [np.array([3]), np.array([5, 11]), np.array([20, 21, 22]), np.array([30]),
                   np.array([40]), np.array([2, 44])]
  # Planted near-duplicates: same fingerprint as a positive, embedding close to the query.
  for duplicate, positive, query in ((12, 3, 0), (13, 3, 0), (14, 11, 1), (15, 40, 4)):
    fingerprints[duplicate] = fingerprints[positive]
    corpus[duplicate] = queries[query]
  # Query 3 scores every document above its own positive: with a margin its window is empty.
  queries[3] = corpus[30] = np.array([0.25, 0, 0, 0], np.float32)
  corpus[30] = -corpus[30]
  return queries, corpus, positive_rows, fingerprints


CONFIGS = {
    "top": mining.MiningConfig(num_negatives=4, range_min=0, range_max=10),
    "window_and_scores": mining.MiningConfig(num_negatives=3, range_min=2, range_max=12,
                                             max_score=0.25, relative_margin=0.05),
    "random": mining.MiningConfig(num_negatives=3, range_min=1, range_max=15,
                                  sampling_strategy="random", seed=3, relative_margin=0.1),
    "no_duplicate_filter": mining.MiningConfig(num_negatives=5, range_max=8,
                                               skip_fingerprint_duplicates=False),
    "whole_corpus": mining.MiningConfig(num_negatives=40, range_max=NUM_DOCS),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mined_negatives_equal_brute_force_reference(fixture, name):
  queries, corpus, positive_rows, fingerprints = fixture
  config = CONFIGS[name]
  result = mining.mine_embeddings(queries, corpus, positive_rows, config,
                                  fingerprints=fingerprints, chunk_size=16)
  rows, scores, dropped = reference_mine(queries, corpus, positive_rows, fingerprints, config)
  assert [r.tolist() for r in result.negative_rows] == rows
  for got, want in zip(result.negative_scores, scores):
    np.testing.assert_array_equal(got, np.array(want, np.float32))
  assert result.dropped == dropped
  assert result.num_short_queries == sum(len(r) < config.num_negatives for r in rows)
  for q, negatives in enumerate(result.negative_rows):
    assert not set(negatives.tolist()) & set(positive_rows[q].tolist())
    if config.skip_fingerprint_duplicates:
      assert not set(fingerprints[negatives].tolist()) & set(
          fingerprints[positive_rows[q]].tolist())


def test_fixture_exercises_every_filter(fixture):
  queries, corpus, positive_rows, fingerprints = fixture
  result = mining.mine_embeddings(queries, corpus, positive_rows, CONFIGS["window_and_scores"],
                                  fingerprints=fingerprints)
  assert all(count > 0 for count in result.dropped.values()), result.dropped
  assert len(result.negative_rows[3]) == 0  # the query whose window is empty
  top = mining.mine_embeddings(queries, corpus, positive_rows, CONFIGS["no_duplicate_filter"],
                               fingerprints=fingerprints)
  # Without the filter, the planted duplicates are query 0's best negatives.
  assert top.negative_rows[0][:2].tolist() == [12, 13]
  # The tie (rows 0 and 1 equal) comes out in corpus order wherever both are mined.
  both = 0
  for negatives in mining.mine_embeddings(queries, corpus, positive_rows, CONFIGS["whole_corpus"],
                                          fingerprints=fingerprints).negative_rows:
    listed = negatives.tolist()
    if 0 in listed and 1 in listed:
      assert listed.index(1) == listed.index(0) + 1
      both += 1
  assert both >= 3


def test_sharded_mining_equals_one_device(fixture):
  queries, corpus, positive_rows, fingerprints = fixture
  mesh = partitioning.create_mesh(4, 2)  # all 8 fake devices
  for config in (CONFIGS["window_and_scores"], CONFIGS["random"]):
    one = mining.mine_embeddings(queries, corpus, positive_rows, config,
                                 fingerprints=fingerprints)
    eight = mining.mine_embeddings(queries, corpus, positive_rows, config,
                                   fingerprints=fingerprints, mesh=mesh, chunk_size=4)
    assert [r.tolist() for r in eight.negative_rows] == [r.tolist() for r in one.negative_rows]
    assert eight.dropped == one.dropped


@pytest.mark.parametrize("changes, binding", [
    ({"range_min": 10, "range_max": 5}, "range_min=10 must be smaller than range_max=5"),
    ({"range_min": 5, "range_max": 5}, "range_min=5 must be smaller than range_max=5"),
    ({"num_negatives": 9, "range_min": 0, "range_max": 8}, "num_negatives=9 does not fit"),
    ({"sampling_strategy": "best"}, "sampling_strategy='best'"),
    ({"num_negatives": 0}, "num_negatives=0"),
])
def test_bad_filters_name_the_binding(fixture, changes, binding):
  queries, corpus, positive_rows, _ = fixture
  config = dataclasses.replace(mining.MiningConfig(), **changes)
  with pytest.raises(mining.MiningInputError, match=f"mining.MiningConfig.{binding}"):
    mining.mine_embeddings(queries, corpus, positive_rows, config)


def test_training_queries_need_positives_in_the_corpus():
  queries = {"a": "x", "b": "y", "c": "z"}
  qrels = {"b": {"d2": 1, "d0": 2}, "a": {"d1": 1}, "c": {"d0": 0}}
  ids, rows = mining.training_queries(queries, ["d0", "d1", "d2"], qrels)
  assert ids == ["a", "b"] and [r.tolist() for r in rows] == [[1], [0, 2]]
  with pytest.raises(mining.MiningInputError, match=r"query 'a' has positive\(s\) \['gone'\]"):
    mining.training_queries(queries, ["d0"], {"a": {"gone": 1}})
  with pytest.raises(mining.MiningInputError, match="no query has a judgement"):
    mining.training_queries(queries, ["d0"], {"c": {"d0": 0}})


def test_encoding_resumes_from_complete_shards_after_a_kill(tmp_path):
  """A run killed while encoding keeps its complete shards; the rerun encodes only the rest and
  ends with the bytes of an uninterrupted run. Another encoding's directory is refused."""
  import seqio  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import encoding  # pylint: disable=g-import-not-at-top
  vocabulary = seqio.ByteVocabulary()
  texts = [f"document number {i} " * (i % 3 + 1) for i in range(23)]
  ids = [f"d{i}" for i in range(23)]
  encoded = []

  def encode_fn(tokens, fail_after=None):
    if fail_after is not None and len(encoded) >= fail_after:
      raise KeyboardInterrupt("killed")
    encoded.append(int((np.asarray(tokens)[:, 0] != 0).sum()))
    return np.asarray(tokens, np.float32)[:, :6] / 7.0

  kwargs = dict(shard_size=8, batch_size=4, resume_key={"checkpoint": "/runs/a/checkpoints/3"})
  full = str(tmp_path / "full")
  encoding.encode_to_shards(ids, texts, encode_fn, vocabulary, 12, full, **kwargs)
  resumed = str(tmp_path / "resumed")
  # Killed in the 6th encoder call (batch 5 is dispatched before batch 4's rows are written, so
  # 16 rows, shards 0 and 1, are complete).
  limit = len(encoded) + 5
  with pytest.raises(KeyboardInterrupt):
    encoding.encode_to_shards(ids, texts, lambda t: encode_fn(t, fail_after=limit), vocabulary,
                              12, resumed, **kwargs)
  assert sorted(n for n in os.listdir(resumed) if n.startswith("ids")) == [
      "ids-00000.json", "ids-00001.json"]
  encoded.clear()
  encoding.encode_to_shards(ids, texts, encode_fn, vocabulary, 12, resumed, **kwargs)
  assert sum(encoded) == 23 - 16
  for name in sorted(os.listdir(full)):
    with open(os.path.join(full, name), "rb") as a, open(os.path.join(resumed, name), "rb") as b:
      assert a.read() == b.read(), name
  assert sorted(os.listdir(full)) == sorted(os.listdir(resumed))
  with pytest.raises(ValueError, match="holds embeddings of another encoding"):
    encoding.encode_to_shards(ids, texts, encode_fn, vocabulary, 12, resumed,
                              **{**kwargs, "resume_key": {"checkpoint": "/runs/a/checkpoints/4"}})
