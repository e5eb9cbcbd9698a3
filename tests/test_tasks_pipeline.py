"""get_train_iterator: exact features, host sharding, deterministic reshuffling and resumption."""

import collections

import numpy as np
import pytest
import seqio

from fixtures import tasks_data
from samtone_jax.tasks import beir
from samtone_jax.tasks import pipeline
from samtone_jax.tasks import sources
from samtone_jax.tasks import vocab

LENGTHS = {"queries": 6, "passages": 10}
TEXTS = [
    ("copy a string", "The strcpy function copies the string pointed to by src to dst."),
    ("copy a string", "The stpcpy function is like strcpy but returns a pointer to the end."),
    ("open a file", "The open system call opens the file specified by pathname."),
    ("close a file descriptor", "close closes a file descriptor so that it no longer refers."),
    ("allocate memory", "The malloc function allocates size bytes and returns a pointer."),
    ("free memory", "The free function frees the memory space pointed to by ptr."),
    ("read from a file descriptor", "read attempts to read up to count bytes from fd."),
    ("write to a file descriptor", "write writes up to count bytes from the buffer to fd."),
    ("get process identification", "getpid returns the process ID of the calling process."),
    ("terminate the calling process", "The exit function causes normal process termination."),
    ("compare two strings", "The strcmp function compares the two strings s1 and s2."),
    ("the length of a string", "The strlen function calculates the length of the string."),
]
NEGATIVES = [f"unrelated negative passage number {i} about sockets and pipes" for i in
             range(len(TEXTS))]


def _register(name, texts, negatives=None):
  def examples():
    for i, (q, p) in enumerate(texts):
      example = {"queries": q, "passages": p}
      if negatives:
        example["negatives"] = [negatives[i]]
      yield example
  source = sources.examples_source({"train": examples}, num_negatives=1 if negatives else 0)
  beir.register_pairs_task(name, source, vocab.demo_vocabulary(), with_negatives=bool(negatives),
                           shuffle_buffer_size=64)


@pytest.fixture(scope="module", autouse=True)
def tasks():
  _register("fixture_pairs", TEXTS)
  _register("fixture_negatives", TEXTS, NEGATIVES)
  _register("fixture_other", [(f"other query {i}", f"other passage {i}") for i in range(7)])
  seqio.MixtureRegistry.remove("fixture_mixture")
  seqio.MixtureRegistry.add("fixture_mixture", [("fixture_pairs", 3.0), ("fixture_other", 1.0)])


def _rows(batches, key="queries"):
  return [tuple(row) for b in batches for row in b[key].tolist()]


def _take(name, n, batch_size=4, **kwargs):
  it = pipeline.get_train_iterator(name, LENGTHS, batch_size, **kwargs)
  return [next(it) for _ in range(n)]


def test_features_match_sentencepiece_reference():
  sp = tasks_data.sp_processor()
  batches = list(pipeline.get_train_iterator(
      "fixture_negatives", LENGTHS, 4, seed=0, shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
  assert len(batches) == 3
  expected = collections.Counter(
      (tuple(tasks_data.expected_ids(sp, q, 6)), tuple(tasks_data.expected_ids(sp, p, 10)),
       tuple(tasks_data.expected_ids(sp, n, 10))) for (q, p), n in zip(TEXTS, NEGATIVES))
  got = collections.Counter()
  for b in batches:
    assert b["negatives"].shape == (4, 1, 10) and b["negatives"].dtype == np.int32
    got.update(zip(map(tuple, b["queries"].tolist()), map(tuple, b["passages"].tolist()),
                   map(tuple, b["negatives"][:, 0].tolist())))
    for key, ids in (("queries", "query_ids"), ("passages", "passage_ids")):
      assert b[ids].tolist() == [tasks_data.fingerprint_reference(r) for r in b[key]]
  assert got == expected
  # Truncated sequences keep EOS last; the repeated question "copy a string" shares its id.
  rows = {r: i for b in batches for r, i in zip(map(tuple, b["queries"].tolist()),
                                                b["query_ids"].tolist())}
  assert all(r[-1] in (0, 1) for r in rows)
  assert len(set(rows.values())) == len(set(q for q, _ in TEXTS)) == 11


def test_two_hosts_are_disjoint_and_cover_the_dataset():
  one_epoch = lambda index: list(pipeline.get_train_iterator(
      "fixture_pairs", LENGTHS, 4, seed=5, shard_info=seqio.ShardInfo(index, 2), num_epochs=1))
  host0, host1 = one_epoch(0), one_epoch(1)
  pairs = lambda batches: collections.Counter(zip(_rows(batches), _rows(batches, "passages")))
  assert all(b["queries"].shape == (2, 6) for b in host0 + host1)  # 4 // 2 rows per host
  assert not pairs(host0) & pairs(host1)
  everything = list(pipeline.get_train_iterator(
      "fixture_pairs", LENGTHS, 1, seed=5, shard_info=seqio.ShardInfo(0, 1), num_epochs=1))
  assert pairs(host0) + pairs(host1) == pairs(everything)
  assert sum(pairs(everything).values()) == len(TEXTS)
  # 7 examples over 2 hosts: each host reads 3 per epoch, so both yield the same batch count.
  host_batches = [list(pipeline.get_train_iterator(
      "fixture_other", LENGTHS, 2, seed=5, shard_info=seqio.ShardInfo(i, 2), num_epochs=2))
                  for i in (0, 1)]
  assert [len(b) for b in host_batches] == [6, 6]
  assert not set(_rows(host_batches[0])) & set(_rows(host_batches[1]))


@pytest.mark.parametrize("name", ["fixture_pairs", "fixture_mixture"])
def test_resume_at_step_equals_uninterrupted_stream(name):
  shard = seqio.ShardInfo(1, 2)
  full = _take(name, 12, seed=7, shard_info=shard)  # 12 steps x 2 rows: crosses epochs
  for start in (1, 5):
    resumed = _take(name, 12 - start, seed=7, shard_info=shard, start_step=start)
    for a, b in zip(full[start:], resumed):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_epochs_are_reshuffled_deterministically():
  shard = seqio.ShardInfo(0, 1)
  batches = _take("fixture_pairs", 6, seed=11, shard_info=shard)  # 2 epochs of 12
  rows = _rows(batches)
  assert collections.Counter(rows[:12]) == collections.Counter(rows[12:])
  assert rows[:12] != rows[12:]
  assert rows == _rows(_take("fixture_pairs", 6, seed=11, shard_info=shard))
  assert rows != _rows(_take("fixture_pairs", 6, seed=12, shard_info=shard))


def test_mixture_rates_and_counts():
  rates = np.array([3.0, 1.0])
  counts = pipeline.mixture_counts(0, rates, 70_000)  # spans two choice chunks
  direct = np.bincount(np.concatenate([pipeline._choice_chunk(0, c, rates) for c in (0, 1)])
                       [:70_000], minlength=2)
  np.testing.assert_array_equal(counts, direct)
  assert abs(counts[0] / counts.sum() - 0.75) < 0.01
  rows = _rows(_take("fixture_mixture", 10, seed=3, shard_info=seqio.ShardInfo(0, 1)))
  sp = tasks_data.sp_processor()
  other = {tuple(tasks_data.expected_ids(sp, f"other query {i}", 6)) for i in range(7)}
  assert 0 < sum(r in other for r in rows) < len(rows)


def test_default_shard_is_this_jax_process():
  default = _take("fixture_pairs", 2, seed=2)  # jax: process 0 of 1
  explicit = _take("fixture_pairs", 2, seed=2, shard_info=seqio.ShardInfo(0, 1))
  assert _rows(default) == _rows(explicit)


def test_batch_must_divide_over_hosts():
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.get_train_iterator("fixture_pairs", LENGTHS, 3, seed=0,
                                shard_info=seqio.ShardInfo(0, 2))
