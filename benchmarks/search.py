"""Exact top-k search speed: samtone_jax.evaluation.search vs faiss-cpu IndexFlatIP.

Both search the same float32 embeddings (unit-norm Gaussian, so scores look like cosine
similarities) on this machine's real CPU device (no fake devices), in one process; the table
reports queries/s of each, the ratio ours/faiss, and how far the results agree:
  * ids: fraction of queries whose top-k id lists are identical (order included);
  * max |score diff|: float32 summation-order noise between the two matmul kernels.
Lists can only differ where two documents' scores are within that noise of each other.

The corpus is generated once at the largest size; smaller sizes are views of it (one copy of the
embeddings; faiss holds its own copy of the current size in its index). Each measurement is the
best of `--repeats` runs after a warm-up (compilation) run; ours and faiss alternate run by run so
that load from other processes hits both alike.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/search.py [--num_docs 100000,1000000] [--dim 768]
      [--num_queries 1000] [--k 100] [--chunk_sizes 4096,16384,65536] [--repeats 2]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import faiss  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from samtone_jax.evaluation import search  # pylint: disable=g-import-not-at-top


def unit_gaussian(rng: np.random.Generator, n: int, dim: int, block: int = 65536) -> np.ndarray:
  """[n, dim] float32 unit vectors, generated in blocks (no float64 temporary of the whole)."""
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, block):
    rows = out[start:start + block]
    rng.standard_normal(rows.shape, dtype=np.float32, out=rows)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  return out


def best_times(functions, repeats: int):
  """Best wall time of each function over `repeats` rounds, the functions alternating per round."""
  times = [[] for _ in functions]
  results = [None] * len(functions)
  for _ in range(repeats):
    for i, fn in enumerate(functions):
      start = time.perf_counter()
      results[i] = fn()
      times[i].append(time.perf_counter() - start)
  return [min(t) for t in times], results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_docs", default="100000,1000000")
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--chunk_sizes", default="4096,16384,65536",
                      help="chunk sizes tried at the first size; the best one is used after.")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  sizes = [int(s) for s in args.num_docs.split(",")]
  chunk_sizes = [int(s) for s in args.chunk_sizes.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")

  rng = np.random.default_rng(0)
  queries = unit_gaussian(rng, args.num_queries, args.dim)
  corpus = unit_gaussian(rng, max(sizes), args.dim)

  print("| documents | chunk | ours q/s | faiss q/s | ours/faiss | ids equal "
        "| max abs score diff |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  best_chunk = None
  for size_index, n in enumerate(sizes):
    docs = corpus[:n]
    index = faiss.IndexFlatIP(args.dim)
    index.add(docs)
    faiss_search = lambda: index.search(queries, args.k)
    faiss_search()  # Warm-up.
    candidates = chunk_sizes if size_index == 0 else [best_chunk]
    results = []
    for chunk in candidates:
      ours_search = lambda: search.exact_search(queries, docs, args.k, chunk_size=chunk)
      ours_search()  # Warm-up: compiles the step for this chunk size.
      (ours_seconds, faiss_seconds), ((ours_scores, ours_ids), (faiss_scores, faiss_ids)) = (
          best_times([ours_search, faiss_search], args.repeats))
      same = np.mean(np.all(ours_ids == faiss_ids, axis=1))
      diff = np.max(np.abs(ours_scores - faiss_scores))
      results.append((ours_seconds, chunk))
      print(f"| {n:,} | {chunk} | {args.num_queries / ours_seconds:,.0f} | "
            f"{args.num_queries / faiss_seconds:,.0f} | {faiss_seconds / ours_seconds:.2f} | "
            f"{same:.3f} | {diff:.1e} |", flush=True)
    best_chunk = min(results)[1]
    del index


if __name__ == "__main__":
  main()
