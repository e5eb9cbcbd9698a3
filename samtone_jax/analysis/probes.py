"""Embedding-space probes of a dual encoder (SamToNe paper, "embedding space analysis").

Two views of how the query and document towers fill the embedding space:
  * a t-SNE map of query and document embeddings in one figure, coloured by tower: with plain
    in-batch negatives the two towers of an asymmetric encoder tend to occupy separate regions,
    same-tower negatives pull them together;
  * the distributions of top-1 (nearest-neighbour) Euclidean distances: query -> nearest
    document, query -> nearest other query, document -> nearest other document.

Nearest neighbours are exact: they reuse `evaluation.search.exact_search` with vectors augmented
so that the largest inner product is the smallest Euclidean distance:
  q' = [q, 1], x' = [2x, -|x|^2]  =>  q'.x' = 2 q.x - |x|^2 = |q|^2 - |q - x|^2.
Figures are PNG files written with matplotlib's Agg backend (no display needed).

`probe_checkpoint` runs both on a trained checkpoint and an evaluation set (the
`python -m samtone_jax.probe` command and the demos).
"""

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only; must precede pyplot.
import jax  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

from samtone_jax import io_utils  # pylint: disable=g-import-not-at-top
from samtone_jax.evaluation import search  # pylint: disable=g-import-not-at-top


def nearest_neighbour_distances(sources: np.ndarray, targets: np.ndarray, *,
                                exclude_self: bool = False, chunk_size: int = 16384,
                                mesh=None) -> np.ndarray:
  """Euclidean distance from each source row to its nearest target row (exact).

  Args:
    sources: [m, d]; targets: [n, d] float.
    exclude_self: sources and targets are the same matrix: skip each row's own index (a
      duplicate row elsewhere still counts, at distance 0).
    chunk_size, mesh: passed to `search.exact_search`.

  Returns:
    float32 [m] distances.
  """
  sources = np.asarray(sources, np.float32)
  targets = np.asarray(targets, np.float32)
  if exclude_self and sources.shape != targets.shape:
    raise ValueError(f"exclude_self needs sources and targets to be the same matrix; got shapes "
                     f"{sources.shape} and {targets.shape}.")
  num_needed = 2 if exclude_self else 1
  if targets.shape[0] < num_needed:
    raise ValueError(f"Need at least {num_needed} target rows; got {targets.shape[0]}.")
  augmented_sources = np.concatenate([sources, np.ones((len(sources), 1), np.float32)], axis=1)
  augmented_targets = np.concatenate(
      [2 * targets, -np.sum(np.square(targets), axis=1, keepdims=True)], axis=1)
  _, indices = search.exact_search(augmented_sources, augmented_targets, num_needed,
                                   chunk_size=chunk_size, mesh=mesh)
  column = np.zeros(len(sources), np.int64)
  if exclude_self:
    column = np.where(indices[:, 0] == np.arange(len(sources)), 1, 0)
  nearest = indices[np.arange(len(sources)), column]
  # The distance itself is recomputed from the difference: |q|^2 - score cancels badly for
  # near neighbours (an error of sqrt(eps) * |q| at distance 0).
  return np.linalg.norm(sources - targets[nearest], axis=1).astype(np.float32)


def top1_distances(queries: np.ndarray, documents: np.ndarray, **search_kwargs
                   ) -> dict[str, np.ndarray]:
  """The three top-1 distance distributions.

  Args:
    queries: [m, d] query embeddings; documents: [n, d] document embeddings.
    **search_kwargs: chunk_size, mesh for the exact search.

  Returns:
    {"query_to_document": [m], "query_to_query": [m], "document_to_document": [n]} float32.
  """
  return {
      "query_to_document": nearest_neighbour_distances(queries, documents, **search_kwargs),
      "query_to_query": nearest_neighbour_distances(queries, queries, exclude_self=True,
                                                    **search_kwargs),
      "document_to_document": nearest_neighbour_distances(documents, documents,
                                                          exclude_self=True, **search_kwargs),
  }


def summarize_distances(distances: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean and median of each distribution: {"mean_query_to_document": ..., ...}."""
  summary = {}
  for name, values in distances.items():
    summary[f"mean_{name}"] = float(np.mean(values, dtype=np.float64))
    summary[f"median_{name}"] = float(np.median(values))
  return summary


def plot_tsne(queries: np.ndarray, documents: np.ndarray, path: str, *, max_points: int = 2000,
              perplexity: float = 30.0, seed: int = 0, title: str | None = None) -> np.ndarray:
  """t-SNE of query and document embeddings in one map, coloured by tower; writes a PNG.

  Args:
    queries: [m, d]; documents: [n, d].
    path: output .png file.
    max_points: at most this many of each tower, drawn without replacement (seeded).
    perplexity: t-SNE perplexity (lowered to fit very small inputs).
    seed: sampling and t-SNE seed.
    title: figure title.

  Returns:
    float [m' + n', 2] the 2-D coordinates, queries first.
  """
  rng = np.random.default_rng(seed)

  def sample(x):
    x = np.asarray(x, np.float32)
    return x if len(x) <= max_points else x[rng.choice(len(x), max_points, replace=False)]

  q, d = sample(queries), sample(documents)
  points = np.concatenate([q, d])
  perplexity = min(perplexity, max(1.0, (len(points) - 1) / 3))
  coordinates = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(points)
  figure, axes = plt.subplots(figsize=(6, 6))
  axes.scatter(*coordinates[:len(q)].T, s=4, alpha=0.6, label=f"queries ({len(q)})")
  axes.scatter(*coordinates[len(q):].T, s=4, alpha=0.6, label=f"documents ({len(d)})")
  axes.legend(markerscale=3)
  axes.set_xticks([])
  axes.set_yticks([])
  axes.set_title(title or "t-SNE of query and document embeddings")
  figure.tight_layout()
  with io_utils.open_file(path, "wb") as f:  # local or gs://
    figure.savefig(f, format="png", dpi=120)
  plt.close(figure)
  return coordinates


def plot_distance_histograms(distances: dict[str, np.ndarray], path: str, *, bins: int = 50,
                             title: str | None = None) -> None:
  """Overlaid histograms (densities) of the top-1 distance distributions; writes a PNG."""
  figure, axes = plt.subplots(figsize=(7, 4))
  upper = max(float(np.max(v)) for v in distances.values() if len(v))
  edges = np.linspace(0.0, upper if upper > 0 else 1.0, bins + 1)
  for name, values in distances.items():
    axes.hist(values, bins=edges, density=True, histtype="step", linewidth=1.5,
              label=name.replace("_", " "))
  axes.set_xlabel("Euclidean distance to the nearest neighbour")
  axes.set_ylabel("density")
  axes.legend()
  axes.set_title(title or "Top-1 distances")
  figure.tight_layout()
  with io_utils.open_file(path, "wb") as f:  # local or gs://
    figure.savefig(f, format="png", dpi=120)
  plt.close(figure)


def embedding_probes(queries: np.ndarray, documents: np.ndarray, output_dir: str, *,
                     prefix: str = "", max_tsne_points: int = 2000, seed: int = 0,
                     title: str | None = None, **search_kwargs) -> dict[str, float]:
  """Runs both probes: writes `<prefix>tsne.png` and `<prefix>top1_distances.png` in output_dir.

  Args:
    queries: [m, d] query-tower embeddings; documents: [n, d] document-tower embeddings.
    output_dir: created if missing.
    prefix: file name prefix (e.g. the model or eval-set name).
    max_tsne_points, seed: t-SNE sampling (the distances always use every row).
    title: names the model in both figures' titles.
    **search_kwargs: chunk_size, mesh for the exact nearest-neighbour search.

  Returns:
    {"mean_query_to_document", "median_query_to_document", ... for the three distributions}.
  """
  io_utils.makedirs(output_dir)
  distances = top1_distances(queries, documents, **search_kwargs)
  plot_distance_histograms(distances, os.path.join(output_dir, f"{prefix}top1_distances.png"),
                           title=f"{title}: top-1 distances" if title else None)
  plot_tsne(queries, documents, os.path.join(output_dir, f"{prefix}tsne.png"),
            max_points=max_tsne_points, seed=seed,
            title=f"{title}: t-SNE of query and document embeddings" if title else None)
  return summarize_distances(distances)



def _sample_ids(ids: list[str], limit: int | None, rng: np.random.Generator) -> list[str]:
  """`ids`, or `limit` of them drawn without replacement (order kept) when there are more."""
  if limit is None or len(ids) <= limit:
    return ids
  keep = np.sort(rng.choice(len(ids), limit, replace=False))
  return [ids[i] for i in keep]


def probe_checkpoint(checkpoint_path: str, model: Any, eval_set: str, output_dir: str, *,
                     feature_lengths: dict[str, int] | None = None,
                     max_queries: int | None = None, max_documents: int | None = None,
                     max_tsne_points: int = 2000, seed: int = 0, batch_size: int = 256,
                     mesh_shape: tuple[int, int] = (-1, 1), prefix: str = "",
                     title: str | None = None) -> dict[str, Any]:
  """The embedding probes of a checkpoint on an evaluation set: two PNGs and a JSON summary.

  Queries go through the query tower and the corpus through the document tower, as in
  retrieval; the model is loaded by `evaluation.runner.load_model`.

  Writes to `output_dir`:
    <prefix>tsne.png            t-SNE of both towers' embeddings (at most `max_tsne_points` each);
    <prefix>top1_distances.png  the three top-1 distance distributions;
    <prefix>probes.json         the summary returned here.

  Args:
    checkpoint_path: a run directory, its checkpoints/ or one checkpoints/<step> directory.
    model: the DualEncoderConfig the checkpoint was trained with.
    eval_set: a registered evaluation set name (its queries and corpus are embedded).
    output_dir: created if missing.
    feature_lengths: {"queries": Lq, "passages": Lp} to tokenise to; None: the set's lengths.
    max_queries, max_documents: embed at most this many (a seeded sample) of a large set; None:
      all. The top-1 distances use every embedded row.
    max_tsne_points, seed: t-SNE sampling and seed (also the seed of the samples above).
    batch_size: texts per encoder call.
    mesh_shape: (data, model) mesh sizes.
    prefix: file name prefix.
    title: names the model in the figures (default: the checkpoint path).

  Returns:
    {"checkpoint_path", "eval_set", "num_queries", "num_documents", "mean_<distribution>",
     "median_<distribution>" for query_to_document / query_to_query / document_to_document,
     "tsne_png", "top1_distances_png"}.
  """
  from samtone_jax.evaluation import encoding  # pylint: disable=g-import-not-at-top
  from samtone_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  loaded = runner.load_model(checkpoint_path, model, mesh_shape)
  data = runner.get_eval_set(eval_set, feature_lengths)
  rng = np.random.default_rng(seed)
  query_ids = _sample_ids(list(data.queries), max_queries, rng)
  document_ids = _sample_ids(list(data.corpus), max_documents, rng)
  encode_queries, encode_documents = loaded.encode_fns()
  queries = encoding.encode_texts([data.queries[i] for i in query_ids], encode_queries,
                                  data.vocabulary, data.query_length, batch_size=batch_size,
                                  mesh=loaded.mesh, description=f"probing {eval_set} queries")
  documents = encoding.encode_texts([data.corpus[i] for i in document_ids], encode_documents,
                                    data.vocabulary, data.document_length, batch_size=batch_size,
                                    mesh=loaded.mesh, description=f"probing {eval_set} corpus")
  summary = embedding_probes(queries, documents, output_dir, prefix=prefix,
                             max_tsne_points=max_tsne_points, seed=seed,
                             title=title or checkpoint_path, mesh=loaded.mesh)
  result = {"checkpoint_path": checkpoint_path, "eval_set": eval_set,
            "num_queries": len(query_ids), "num_documents": len(document_ids), **summary,
            "tsne_png": os.path.join(output_dir, f"{prefix}tsne.png"),
            "top1_distances_png": os.path.join(output_dir, f"{prefix}top1_distances.png")}
  if jax.process_index() == 0:
    with io_utils.open_file(os.path.join(output_dir, f"{prefix}probes.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
