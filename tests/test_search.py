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
