"""samtone_jax.evaluation.search against a brute-force numpy search."""

import jax
import numpy as np
import pytest

from samtone_jax import partitioning
from samtone_jax.evaluation import search


def numpy_search(queries, corpus, k):
  """Reference: full score matrix, order by (score desc, index asc), pad with -inf / -1."""
  scores = queries.astype(np.float32) @ corpus.astype(np.float32).T
  top_scores = np.full((len(queries), k), -np.inf, np.float32)
  top_ids = np.full((len(queries), k), -1, np.int64)
  for row in range(len(queries)):
    order = np.lexsort((np.arange(corpus.shape[0]), -scores[row]))[:k]
    top_scores[row, :len(order)] = scores[row, order]
    top_ids[row, :len(order)] = order
  return top_scores, top_ids


def integer_embeddings(rng, n, d):
  # Small integers: every inner product is exact in float32 and ties are frequent, so indices
  # must match exactly, tie order included.
  return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8
  return partitioning.create_mesh(4, 2)


@pytest.mark.parametrize("num_docs,k,chunk_size,query_block_size", [
    (50, 5, 8, 1024),    # Several chunks, last one padded.
    (50, 20, 8, 3),      # k larger than a chunk; several query blocks (last one padded).
    (7, 10, 4, 1024),    # k larger than the corpus: padded with -inf / -1.
])
def test_single_device_equals_numpy(num_docs, k, chunk_size, query_block_size):
  rng = np.random.default_rng(num_docs + k)
  queries, corpus = integer_embeddings(rng, 11, 6), integer_embeddings(rng, num_docs, 6)
  scores, ids = search.exact_search(queries, corpus, k, chunk_size=chunk_size,
                                    query_block_size=query_block_size)
  expected_scores, expected_ids = numpy_search(queries, corpus, k)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("k,chunk_size", [(6, 4), (30, 4), (150, 8)])
def test_sharded_over_8_devices_equals_numpy(mesh8, k, chunk_size):
  rng = np.random.default_rng(k)
  queries, corpus = integer_embeddings(rng, 9, 5), integer_embeddings(rng, 133, 5)
  scores, ids = search.exact_search(queries, corpus, k, chunk_size=chunk_size, mesh=mesh8)
  expected_scores, expected_ids = numpy_search(queries, corpus, k)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(scores, expected_scores)


def test_streamed_shards_equal_one_array(mesh8):
  rng = np.random.default_rng(5)
  queries, corpus = integer_embeddings(rng, 4, 5), integer_embeddings(rng, 70, 5)
  shards = (corpus[:13], corpus[13:40], corpus[40:])  # Uneven shards, read once, in order.
  scores, ids = search.exact_search(queries, iter(shards), 25, chunk_size=2, mesh=mesh8)
  expected_scores, expected_ids = numpy_search(queries, corpus, 25)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(scores, expected_scores)


def test_random_float_embeddings(mesh8):
  # Gaussian embeddings: scores agree to float32 rounding, and the ranking wherever the gap
  # between neighbours exceeds that rounding (it does for these seeds).
  rng = np.random.default_rng(6)
  queries = rng.normal(size=(16, 32)).astype(np.float32)
  corpus = rng.normal(size=(300, 32)).astype(np.float32)
  scores, ids = search.exact_search(queries, corpus, 40, chunk_size=16, mesh=mesh8)
  expected_scores, expected_ids = numpy_search(queries, corpus, 40)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ids, expected_ids)


def test_bad_input():
  with pytest.raises(ValueError, match="dimension"):
    search.exact_search(np.zeros((2, 3)), np.zeros((5, 4)), 2)
  with pytest.raises(ValueError, match="k=0"):
    search.exact_search(np.zeros((2, 3)), np.zeros((5, 3)), 0)


def test_jax_array_corpus(mesh8):
  rng = np.random.default_rng(8)
  queries, corpus = integer_embeddings(rng, 5, 4), integer_embeddings(rng, 29, 4)
  scores, ids = search.exact_search(jax.numpy.asarray(queries), jax.numpy.asarray(corpus), 12,
                                    chunk_size=2, mesh=mesh8)
  expected_scores, expected_ids = numpy_search(queries, corpus, 12)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(scores, expected_scores)


# The host top-k path (`host_top_k`, the default on one CPU device) against the numpy reference and
# against the XLA top_k path on the same one-device mesh: same ids, same scores bit for bit.


def both_paths(queries, corpus_factory, k, **kwargs):
  """(host path, XLA path) results; corpus_factory() gives a fresh corpus (iterators are read once)."""
  host = search.exact_search(queries, corpus_factory(), k, host_top_k=True, **kwargs)
  xla = search.exact_search(queries, corpus_factory(), k, host_top_k=False, **kwargs)
  return host, xla


def assert_same_as_reference_and_xla(host, xla, expected):
  (scores, ids), (xla_scores, xla_ids), (expected_scores, expected_ids) = host, xla, expected
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(scores, expected_scores)
  np.testing.assert_array_equal(ids, xla_ids)
  np.testing.assert_array_equal(scores.view(np.uint32), xla_scores.view(np.uint32))  # Bits.
  assert scores.dtype == np.float32 and ids.dtype == np.int64


@pytest.mark.parametrize("num_queries,num_docs,k,chunk_size,query_block_size", [
    (13, 200, 40, 16, 5),   # 7 distinct scores: ties span chunks; Q not a multiple of the block.
    (6, 90, 35, 16, 1024),  # k larger than a chunk; last chunk partial (90 = 5 * 16 + 10).
    (4, 21, 30, 8, 3),      # k larger than N: -inf / -1 tail; chunk of 8 (groups of 8).
    (5, 30, 3, 6, 1024),    # chunk of 6: groups of 2; several groups cross the threshold.
])
def test_host_top_k_ties_equal_numpy_and_xla(num_queries, num_docs, k, chunk_size,
                                             query_block_size):
  rng = np.random.default_rng(num_docs)
  # Entries in {-1, 0, 1}, d=3: scores in {-3..3}, so nearly every score is tied with rows in
  # other chunks, and the tie order (lower position first) decides the ids.
  queries = rng.integers(-1, 2, size=(num_queries, 3)).astype(np.float32)
  corpus = rng.integers(-1, 2, size=(num_docs, 3)).astype(np.float32)
  host, xla = both_paths(queries, lambda: corpus, k, chunk_size=chunk_size,
                         query_block_size=query_block_size)
  assert_same_as_reference_and_xla(host, xla, numpy_search(queries, corpus, k))


def test_host_top_k_merges_row_slices_on_threads():
  # 600 queries in one block: their rows are merged in slices of >= 128 on up to
  # min(cores, 8, 4) threads (2 on a 2-core machine); ties across chunks as above.
  rng = np.random.default_rng(12)
  queries = rng.integers(-1, 2, size=(600, 3)).astype(np.float32)
  corpus = rng.integers(-1, 2, size=(70, 3)).astype(np.float32)
  host, xla = both_paths(queries, lambda: corpus, 25, chunk_size=16)
  assert_same_as_reference_and_xla(host, xla, numpy_search(queries, corpus, 25))


def test_host_top_k_negative_zero_ties_positive_zero():
  # Rows of -0.0 give -0.0 products; they must tie with +0.0 scores (by position), come out as
  # +0.0, and never beat or trail a zero score of a lower position.
  queries = np.array([[1.0, 1.0], [-1.0, 0.0]], np.float32)
  corpus = np.array([[-0.0, -0.0], [1.0, -1.0], [-2.0, 0.0], [0.0, 0.0], [-0.0, -0.0],
                     [-1.0, 1.0], [0.0, -0.0], [-0.0, 0.0]] * 3, np.float32)
  host, xla = both_paths(queries, lambda: corpus, 20, chunk_size=4)
  assert_same_as_reference_and_xla(host, xla, numpy_search(queries, corpus, 20))
  zeros = host[0][host[0] == 0]
  assert zeros.size and not np.signbit(zeros).any()


def test_host_top_k_bfloat16_memmap_and_streamed_shards(tmp_path):
  rng = np.random.default_rng(3)
  queries = integer_embeddings(rng, 7, 6)
  # Halves are exact in bfloat16 (8 bits of mantissa), so the reference is exact too.
  corpus = (integer_embeddings(rng, 75, 6) / 2).astype(jax.numpy.bfloat16)
  # Stored as encoding.py stores bfloat16 shards: the uint16 bits, memory-mapped, viewed back.
  np.save(tmp_path / "corpus.npy", corpus.view(np.uint16))
  expected = numpy_search(queries, corpus.astype(np.float32), 22)
  memmap = lambda: np.load(tmp_path / "corpus.npy", mmap_mode="r").view(corpus.dtype)
  assert_same_as_reference_and_xla(*both_paths(queries, memmap, 22, chunk_size=16), expected)
  shards = lambda: iter((corpus[:10], corpus[10:47], corpus[47:]))  # Uneven; read once, in order.
  assert_same_as_reference_and_xla(*both_paths(queries, shards, 22, chunk_size=8), expected)


def test_host_top_k_random_floats_same_bits_as_xla():
  # Gaussian embeddings: the host path multiplies with the XLA path's dot (same shapes and
  # precision), so scores agree bit for bit and ids exactly; numpy agrees to float32 rounding.
  rng = np.random.default_rng(9)
  queries = rng.normal(size=(10, 24)).astype(np.float32)
  corpus = rng.normal(size=(250, 24)).astype(np.float32)
  (scores, ids), (xla_scores, xla_ids) = both_paths(queries, lambda: corpus, 60, chunk_size=32,
                                                    query_block_size=4)
  np.testing.assert_array_equal(ids, xla_ids)
  np.testing.assert_array_equal(scores.view(np.uint32), xla_scores.view(np.uint32))
  expected_scores, expected_ids = numpy_search(queries, corpus, 60)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ids, expected_ids)


def test_host_top_k_needs_one_device(mesh8):
  with pytest.raises(ValueError, match="one-device mesh"):
    search.exact_search(np.zeros((2, 3)), np.zeros((5, 3)), 2, mesh=mesh8, host_top_k=True)


def test_host_top_k_refuses_nan_embeddings():
  """A NaN in the corpus has no place in a ranking: the host path names the query and rows."""
  rng = np.random.default_rng(4)
  queries = rng.normal(size=(5, 8)).astype(np.float32)
  corpus = rng.normal(size=(40, 8)).astype(np.float32)
  corpus[33, 2] = np.nan
  with pytest.raises(ValueError, match=r"NaN score for query 0 against corpus rows 32\.\.39"):
    search.exact_search(queries, corpus, k=3, chunk_size=16, host_top_k=True)
