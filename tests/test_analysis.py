"""samtone_jax.analysis.probes: nearest-neighbour distances against numpy brute force."""

import matplotlib.image
import numpy as np
import pytest

from samtone_jax import partitioning
from samtone_jax.analysis import probes


# Tiny shapes: compile time dominates (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def brute_force(sources, targets, exclude_self=False):
  distances = np.sqrt(np.sum((sources[:, None, :].astype(np.float64) - targets[None]) ** 2, -1))
  if exclude_self:
    np.fill_diagonal(distances, np.inf)
  return distances.min(axis=1)


@pytest.fixture(scope="module")
def embeddings():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(30, 6)).astype(np.float32)
  documents = rng.normal(size=(45, 6)).astype(np.float32) * 1.5
  documents[7] = documents[20]  # A duplicate document: its nearest other document is at 0.
  queries[3] = documents[11]  # A query equal to a document: distance 0.
  return queries, documents


def test_top1_distances_equal_brute_force(embeddings):
  queries, documents = embeddings
  mesh = partitioning.create_mesh(8, 1)
  distances = probes.top1_distances(queries, documents, chunk_size=4, mesh=mesh)
  np.testing.assert_allclose(distances["query_to_document"], brute_force(queries, documents),
                             atol=1e-5)
  np.testing.assert_allclose(distances["query_to_query"], brute_force(queries, queries, True),
                             atol=1e-5)
  np.testing.assert_allclose(distances["document_to_document"],
                             brute_force(documents, documents, True), atol=1e-5)
  assert distances["document_to_document"][7] == pytest.approx(0, abs=1e-6)
  assert distances["query_to_document"][3] == pytest.approx(0, abs=1e-6)


def test_embedding_probes_summary_and_figures(embeddings, tmp_path):
  queries, documents = embeddings
  summary = probes.embedding_probes(queries, documents, str(tmp_path), prefix="tiny_")
  expected = brute_force(documents, documents, True)
  assert summary["mean_document_to_document"] == pytest.approx(expected.mean(), abs=1e-5)
  assert summary["median_query_to_document"] == pytest.approx(
      np.median(brute_force(queries, documents)), abs=1e-5)
  assert len(summary) == 6
  for name in ("tiny_tsne.png", "tiny_top1_distances.png"):
    image = matplotlib.image.imread(tmp_path / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # A drawn figure.
