"""Exact top-k search speed: samtone_jax.evaluation.search vs faiss-cpu IndexFlatIP, and the matmul floor.

Both search the same float32 embeddings (unit-norm Gaussian, so scores look like cosine
similarities) on this machine's real CPU device (no fake devices), in one process, with the same
thread count (faiss's OpenMP threads and XLA's intra-op pool both default to the core count; the
header line prints both). Per round, in this order: ours, faiss, and two matmul-only floors over
the same chunks (no top-k): XLA's float32 dot at HIGHEST precision (what our kernel multiplies
with) and numpy's BLAS sgemm. Each measurement is repeated `--repeats` times after a warm-up
(compilation) run, the four alternating within each round, so that load from other processes
hits them alike. The table reports, per chunk size:
  * seconds of each: the median over rounds [min-max];
  * ours/faiss: faiss seconds / ours seconds per round (> 1: ours faster), median [min-max] of the
    rounds (a round's ratio compares runs seconds apart, so it is the least noisy number here);
  * top-k share: 1 - (XLA matmul-only seconds / ours seconds), medians: the part of our time that
    is not the matrix product (top-k, masking, transfers);
  * cores busy: process CPU seconds / wall seconds of ours and of faiss (medians), the measured
    thread parity;
  * ids: fraction of queries whose top-k id lists are identical (order included), and
    max |score diff|: float32 summation-order noise between the two matmul kernels.
Lists can only differ where two documents' scores are within that noise of each other.

"ours" is `exact_search` as a CPU process runs it by default: one device, the product in XLA and the
running top-k on the host (`host_top_k`). `--xla_top_k` also times the same search with XLA's
`lax.top_k` on the device (`host_top_k=False`, the path before the host top-k, and the one GPU/TPU
and multi-device meshes take) in the same rounds, and prints one more line comparing it.

The corpus is generated once at the largest size; smaller sizes are views of it (one copy of the
embeddings; faiss holds its own copy of the current size in its index).

Usage:
  JAX_PLATFORMS=cpu python benchmarks/search.py [--num_docs 100000] [--dim 768]
      [--num_queries 1000] [--k 100] [--chunk_sizes 4096,16384] [--repeats 5]
      [--baseline /tmp/search_rev.py] [--xla_top_k]
"""

import argparse
import importlib.util
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


def alternating_times(functions, repeats: int):
  """Wall and process CPU times, each [repeats, len(functions)] (the functions alternating within
  each round), and each function's last result. CPU / wall seconds is the number of cores a
  function kept busy (this process's threads only)."""
  times, cpu_times = [], []
  results = [None] * len(functions)
  for _ in range(repeats):
    round_times, round_cpu = [], []
    for i, fn in enumerate(functions):
      start, start_cpu = time.perf_counter(), time.process_time()
      results[i] = fn()
      round_times.append(time.perf_counter() - start)
      round_cpu.append(time.process_time() - start_cpu)
    times.append(round_times)
    cpu_times.append(round_cpu)
  return np.asarray(times), np.asarray(cpu_times), results


def spread(values) -> str:
  """'median [min-max]' of a sequence of numbers."""
  values = np.asarray(values)
  return f"{np.median(values):.2f} [{values.min():.2f}-{values.max():.2f}]"


def matmul_only_functions(queries: np.ndarray, docs: np.ndarray, chunk: int):
  """(XLA, numpy) functions computing queries @ chunk.T over the corpus in `chunk`-row pieces and
  keeping a row max (so that nothing can drop the product), without any top-k."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  xla_dot = jax.jit(lambda q, rows: jnp.max(
      jnp.dot(q, rows.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32),
      axis=1))
  device_queries = jax.device_put(queries)

  def xla():
    maxima = [xla_dot(device_queries, jax.device_put(docs[start:start + chunk]))
              for start in range(0, docs.shape[0], chunk)]
    return jax.block_until_ready(maxima)

  buffer = np.empty((queries.shape[0], chunk), np.float32)

  def blas():
    maxima = []
    for start in range(0, docs.shape[0], chunk):
      rows = docs[start:start + chunk]
      out = buffer[:, :rows.shape[0]]
      np.matmul(queries, rows.T, out=out)
      maxima.append(out.max(axis=1))
    return maxima

  return xla, blas


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_docs", default="100000")
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--chunk_sizes", default="4096,16384",
                      help="corpus rows per search step (exact_search's chunk_size)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--baseline", default=None,
                      help="path of another copy of samtone_jax/evaluation/search.py (e.g. `git show "
                      "REV:samtone_jax/evaluation/search.py > /tmp/search_rev.py`), timed in the "
                      "same rounds; one more line per chunk size compares it with ours")
  parser.add_argument("--xla_top_k", action="store_true",
                      help="also time exact_search(host_top_k=False), XLA's top_k on the device, "
                      "in the same rounds; one more line per chunk size compares it with ours")
  args = parser.parse_args()
  sizes = [int(s) for s in args.num_docs.split(",")]
  chunk_sizes = [int(s) for s in args.chunk_sizes.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores "
        f"(XLA intra-op threads: one per core); faiss {faiss.__version__} with "
        f"{faiss.omp_get_max_threads()} OpenMP threads; {args.repeats} alternating rounds")

  baseline = None
  if args.baseline:
    spec = importlib.util.spec_from_file_location("baseline_search", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)

  rng = np.random.default_rng(0)
  queries = unit_gaussian(rng, args.num_queries, args.dim)
  corpus = unit_gaussian(rng, max(sizes), args.dim)

  print("| documents | chunk | ours s | faiss s | ours/faiss | XLA matmul only s | numpy sgemm s "
        "| top-k share of ours | cores busy ours / faiss | ids equal | max abs score diff |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for n in sizes:
    docs = corpus[:n]
    index = faiss.IndexFlatIP(args.dim)
    index.add(docs)
    faiss_search = lambda: index.search(queries, args.k)
    for chunk in chunk_sizes:
      ours_search = lambda: search.exact_search(queries, docs, args.k, chunk_size=chunk)
      xla_matmul, blas_matmul = matmul_only_functions(queries, docs, chunk)
      functions = [ours_search, faiss_search, xla_matmul, blas_matmul]
      extra = {}  # name -> column of `times`
      if baseline is not None:
        extra[f"baseline {args.baseline}"] = len(functions)
        functions.append(lambda: baseline.exact_search(queries, docs, args.k, chunk_size=chunk))
      if args.xla_top_k:
        extra["XLA top_k (host_top_k=False)"] = len(functions)
        functions.append(lambda: search.exact_search(queries, docs, args.k, chunk_size=chunk,
                                                     host_top_k=False))
      for fn in functions:
        fn()  # Warm-up: compiles ours and the XLA dot for this chunk size.
      times, cpu_times, results = alternating_times(functions, args.repeats)
      cores = np.median(cpu_times / times, axis=0)
      (ours_scores, ours_ids), (faiss_scores, faiss_ids) = results[0], results[1]
      same = np.mean(np.all(ours_ids == faiss_ids, axis=1))
      diff = np.max(np.abs(ours_scores - faiss_scores))
      top_k_share = 1 - np.median(times[:, 2]) / np.median(times[:, 0])
      print(f"| {n:,} | {chunk} | {spread(times[:, 0])} | {spread(times[:, 1])} | "
            f"{spread(times[:, 1] / times[:, 0])} | {spread(times[:, 2])} | {spread(times[:, 3])} | "
            f"{top_k_share:.2f} | {cores[0]:.2f} / {cores[1]:.2f} | {same:.3f} | {diff:.1e} |",
            flush=True)
      for name, i in extra.items():
        same_as_ours = all(np.array_equal(a, b) for a, b in zip(results[i], results[0]))
        print(f"  {name}: {spread(times[:, i])} s; its s / ours s per round "
              f"{spread(times[:, i] / times[:, 0])}; faiss s / its s per round "
              f"{spread(times[:, 1] / times[:, i])}; same ids and scores as ours: {same_as_ours}",
              flush=True)
    del index


if __name__ == "__main__":
  main()
