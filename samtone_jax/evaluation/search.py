"""Exact maximum-inner-product top-k search with JAX, chunked and sharded over a device mesh.

The corpus is scored chunk by chunk, so it never has to fit on the devices at once (it can be a
memory-mapped `.npy` file or a stream of shards read from disk). Every device keeps its own
running top-k of the queries:

  for each chunk of `chunk_size * num_devices` corpus rows (the last one padded):
    device d receives rows [d * chunk_size, (d + 1) * chunk_size) of the chunk     (device_put)
    scores = queries @ rows.T                  [Q, chunk_size], float32, HIGHEST precision
    running top-k <- top_k(concat(running top-k, top_k(scores)))                     (shard_map)
  gather the [num_devices, Q, k] candidates and keep the best k per query           (jit)

This is `shard_map` over all mesh axes flattened into one: queries are replicated, corpus rows
are split across every device (the (data, model) split of the mesh does not matter for a search).

Order and ties: results are sorted by score, descending, and equal scores by corpus position,
ascending (lower index first). `lax.top_k` keeps the lower position first among equal values and a
device's running candidates always precede its new rows' candidates, so every device's list has that order;
the final merge sorts by (-score, index) explicitly, because devices interleave positions.
Matrix products run at `Precision.HIGHEST` so that TPUs/GPUs do not drop to bfloat16/TF32 passes.
A bfloat16 corpus (EVAL_EMBEDDING_DTYPE) is widened to float32 on the device, so its products are
the float32 products of the rounded rows.

One CPU device (the default mesh of a CPU process): XLA's CPU `TopK` sorts one row after another on
one thread, at a large cost per row, while the matrix product uses every core, so the top-k is
kept on the host instead (`host_top_k`):

  for each chunk and query block:
    jit: scores = queries @ rows.T [qb, c] (the same dot, shapes and precision as above) and the
         maxima of groups of `g` columns [qb, c / g]                               (dispatched async)
    numpy, while the next chunk's product runs: an element can enter a query's running top k only
         if it beats the current k-th score (strictly: earlier rows win ties) and is >= the k-th
         largest group maximum of the chunk (k elements are at least that large); only groups
         whose maximum passes both are read, and the few survivors are merged with the running
         list by (score desc, position asc).

After the first chunk a query's k-th score is high, so only a few groups per query are read: the
host work per chunk is a compare over the [qb, c / g] maxima, not a sort of [qb, c] scores.
The results are the same as the XLA path's: the same dot gives the same scores, and the order is
the same explicit (score desc, position asc) order.

Several processes (`merge_top_k`): each searches its own rows on its own devices and the [Q, k]
candidates of all processes are merged by the same (score desc, position asc) order.
"""

from collections.abc import Iterable
import concurrent.futures
import functools
import os

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from samtone_jax import partitioning

DEFAULT_CHUNK_SIZE = 16384
DEFAULT_QUERY_BLOCK_SIZE = 1024
_MAX_MERGE_THREADS = 8  # Host top-k: threads merging one block's rows (at least 128 rows each).


def _default_mesh() -> Mesh:
  """A one-device mesh on this process's first device (the search runs on a mesh either way)."""
  return partitioning.create_mesh(1, 1, devices=[jax.local_devices()[0]])


@functools.lru_cache(maxsize=None)
def _search_functions(mesh: Mesh, k: int):
  """Jitted (step, finish) for one mesh and k; jit caches the shapes within."""
  axes = tuple(mesh.axis_names)  # All axes flattened: one corpus split over every device.

  def local_step(top_scores, top_ids, queries, rows, row_ids):
    # top_scores, top_ids: [1, nb, qb, k] this device's running top-k per query block.
    # queries: [nb, qb, d] all queries (replicated). rows: [c, d] (float32 or bfloat16, made
    # float32 here, exactly) and row_ids: [c] local chunk.
    rows = rows.astype(jnp.float32)

    def one_block(args):
      block_scores, block_ids, block_queries = args
      scores = jnp.dot(block_queries, rows.T, precision=lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)  # [qb, c]
      # -0.0 -> +0.0 so that zero scores tie by position (top_k orders -0.0 below +0.0); padding
      # rows never win.
      scores = jnp.where(scores == 0, 0.0, scores)
      scores = jnp.where(row_ids[None, :] >= 0, scores, -jnp.inf)
      # The chunk's own top k first, then a merge with the running top k over [qb, 2k]: the
      # best k of a union are the best k of the two lists' best k. Concatenating the running
      # list onto the whole [qb, c] block instead (one top_k over [qb, k + c]) copied the block
      # and materialised [qb, c] int32 ids, about 30% of a chunk's time on CPU
      # (benchmarks/README.md).
      chunk_best, chunk_positions = lax.top_k(scores, min(k, scores.shape[1]))
      candidates = jnp.concatenate([block_scores, chunk_best], axis=1)  # [qb, k + min(k, c)]
      candidate_ids = jnp.concatenate([block_ids, row_ids[chunk_positions]], axis=1)
      # Running candidates (earlier rows) come first, so equal scores keep the lower position.
      best, positions = lax.top_k(candidates, k)
      return best, jnp.take_along_axis(candidate_ids, positions, axis=1)

    best, best_ids = lax.map(one_block, (top_scores[0], top_ids[0], queries))
    return best[None], best_ids[None]

  state_spec = P(axes, None, None, None)
  step = jax.jit(
      jax.shard_map(local_step, mesh=mesh,
                    in_specs=(state_spec, state_spec, P(), P(axes, None), P(axes)),
                    out_specs=(state_spec, state_spec)),
      donate_argnums=(0, 1))

  # Replicated results: every process (multi-host meshes included) reads them locally.
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def finish(top_scores, top_ids):
    # [devices, nb, qb, k] -> [nb * qb, devices * k], then an explicit (score desc, id asc) sort.
    num_devices, nb, qb, _ = top_scores.shape
    scores = jnp.transpose(top_scores, (1, 2, 0, 3)).reshape(nb * qb, num_devices * k)
    ids = jnp.transpose(top_ids, (1, 2, 0, 3)).reshape(nb * qb, num_devices * k)
    negated, ids = lax.sort((-scores, ids), dimension=1, num_keys=2)
    return -negated[:, :k], ids[:, :k]

  return step, finish


def _as_chunks(corpus, rows_per_chunk: int) -> Iterable[np.ndarray | jax.Array]:
  """Splits an array [N, d] or an iterable of shards [n_i, d] into blocks of <= rows_per_chunk."""
  shards = [corpus] if hasattr(corpus, "shape") else corpus
  for shard in shards:
    if shard.ndim != 2:
      raise ValueError(f"Corpus shards must be [n, d] matrices; got shape {shard.shape}.")
    for start in range(0, shard.shape[0], rows_per_chunk):
      yield shard[start:start + rows_per_chunk]


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary (CPU `device_put` aliases
  such arrays instead of copying them)."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(size + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + size].view(dtype).reshape(shape)


def _padded_chunks(corpus, chunk_size: int, num_devices: int, dim: int, *, staging: bool = False):
  """Yields (rows [chunk_size * num_devices, d], n, offset): the corpus's chunks, zero-padded.

  Every chunk has the same shape, the last one (or a shard's tail) padded: one compiled step,
  and a score that does not depend on where its row falls. The CPU dot's bits do depend on the
  product's width (a 1,696- or 100-column product rounds some columns differently from the same
  columns of a 16,384-column one), so padding to a smaller width would make a search over part of
  a corpus (`merge_top_k`) differ from one over all of it.

  rows are numpy or jax, float32 or bfloat16 (a bfloat16 corpus stays bfloat16: half the transfer,
  widened exactly on the device); n is the count of real rows, offset the position of the first.
  With `staging` (one CPU device), numpy rows that a CPU `device_put` would copy (unaligned,
  another dtype, or padded) are copied into one of two reused 64-byte-aligned buffers instead, and
  aligned rows (memmaps of `.npy` files) are passed as they are: `device_put` then aliases them
  rather than copying each chunk into fresh memory. Two buffers suffice because the caller has
  finished with chunk i - 2 when it asks for chunk i.
  """
  buffers = {}  # dtype -> two staging buffers, used alternately.
  offset = 0
  width = chunk_size * num_devices
  for index, rows in enumerate(_as_chunks(corpus, width)):
    if rows.shape[1] != dim:
      raise ValueError(f"Corpus rows have dimension {rows.shape[1]}; queries have {dim}.")
    n = rows.shape[0]
    if offset + n >= 2**31:
      raise ValueError("Corpora of 2**31 rows or more are not supported (int32 row ids).")
    # No host copy of float32 or bfloat16 rows (memmaps included) unless they need padding or
    # staging; device_put makes the only one.
    row_dtype = rows.dtype if rows.dtype == jnp.bfloat16 else np.dtype(np.float32)
    if staging and not isinstance(rows, jax.Array):
      if (n < width or rows.dtype != row_dtype or not rows.flags.c_contiguous
          or rows.ctypes.data % 64):
        if row_dtype not in buffers:
          buffers[row_dtype] = [_aligned_empty((width, dim), row_dtype) for _ in range(2)]
        buffer = buffers[row_dtype][index % 2]
        buffer[:n] = rows
        buffer[n:] = 0
        rows = buffer
    else:
      xp = jnp if isinstance(rows, jax.Array) else np
      rows = xp.asarray(rows, dtype=row_dtype)
      if n < width:
        rows = xp.concatenate([rows, xp.zeros((width - n, dim), row_dtype)])
    yield rows, n, offset
    offset += n


def _group_size(chunk_size: int) -> int:
  """Columns per group maximum: 16 (a 16x smaller array to scan), or the largest power of two
  below it that divides the chunk."""
  return next(g for g in (16, 8, 4, 2, 1) if chunk_size % g == 0)


@functools.lru_cache(maxsize=None)
def _scores_and_group_maxima(group_size: int):
  """Jitted (queries [qb, d], rows [c, d]) -> (scores [qb, c], maxima [qb, c / g]).

  scores are the XLA path's products (same dot, precision and shapes, so the same bits); maxima
  are per-row maxima of groups of `group_size` consecutive columns, padding rows included (the
  host masks them: masking here wrote a second [qb, c] array, ~20% of a chunk's CPU time).
  """

  @jax.jit
  def scores_and_maxima(queries, rows):
    rows = rows.astype(jnp.float32)
    scores = jnp.dot(queries, rows.T, precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
    num_queries, num_columns = scores.shape
    maxima = scores.reshape(num_queries, num_columns // group_size, group_size).max(axis=2)
    return scores, maxima

  return scores_and_maxima


_PADDING_KEY = np.uint64(2**64 - 1)


def _sort_keys(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """uint64 keys whose ascending order is (score descending, position ascending).

  Args:
    scores: float32 [...], no NaN, no -0.0 (add +0.0 first: -0.0 + 0.0 = +0.0).
    positions: int [...] corpus positions, 0 <= p < 2**31.

  Returns:
    uint64 [...]: the order-preserving bits of -score in the high 32 bits, position in the low 32.
    The padding key (2**64 - 1) sorts after every real one.
  """
  bits = scores.view(np.uint32)
  # Float order as unsigned order: flip all bits of negatives, only the sign bit of the rest.
  ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
  return ((~ascending).astype(np.uint64) << np.uint64(32)) | positions.astype(np.uint64)


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(scores float32, positions int64) of `_sort_keys` keys; padding -> (-inf, -1)."""
  ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
  bits = np.where(ascending >> np.uint32(31), ascending & np.uint32(0x7FFFFFFF), ~ascending)
  padding = keys == _PADDING_KEY
  scores = np.where(padding, -np.inf, bits.view(np.float32)).astype(np.float32)
  positions = np.where(padding, -1, (keys & np.uint64(0xFFFFFFFF)).astype(np.int64))
  return scores, positions


def _merge_chunk(top_keys: np.ndarray, scores: np.ndarray, maxima: np.ndarray, offset: int,
                 num_valid: int) -> None:
  """Merges one chunk's scores into the running top k of its queries, in place.

  Args:
    top_keys: uint64 [qb, k] running best `_sort_keys` keys, ascending (= score descending,
      equal scores by lower position), padded with `_PADDING_KEY` while fewer than k.
    scores: float32 [qb, c] this chunk's scores (read only where needed).
    maxima: float32 [qb, c / g] maxima of groups of g consecutive columns, padding included.
    offset: corpus position of column 0; it exceeds every position in top_keys.
    num_valid: columns < num_valid are real rows; the rest is padding and never enters.
  """
  num_queries, k = top_keys.shape
  num_groups = maxima.shape[1]
  group_size = scores.shape[1] // num_groups
  if num_valid < scores.shape[1]:
    # A padded chunk: groups of padding only get -inf, and the group that straddles num_valid
    # the maximum of its real columns.
    maxima = maxima.copy()
    whole = num_valid // group_size
    maxima[:, whole:] = -np.inf
    if num_valid % group_size:
      maxima[:, whole] = scores[:, whole * group_size:num_valid].max(axis=1)
  # A chunk element can enter only if it beats the k-th score so far: strictly, since every
  # running entry has a lower position and wins a tie (-inf while fewer than k).
  threshold = _decode_keys(top_keys[:, -1])[0]
  selected = maxima > threshold[:, None]
  # ...and only if it is >= the chunk's k-th largest group maximum: k of its elements are at
  # least that large (they are in different groups), so anything smaller is not in the chunk's
  # top k. Needed while some query has fewer than k entries (the first chunk), skipped after.
  floor = None
  if num_groups > k and np.isneginf(threshold).any():
    floor = np.partition(maxima, num_groups - k, axis=1)[:, num_groups - k]
    selected &= maxima >= floor[:, None]
  flat_groups = np.flatnonzero(selected)  # Into [qb * num_groups].
  if flat_groups.size == 0:
    return
  rows = flat_groups // num_groups
  values = np.take(scores.reshape(-1, group_size), flat_groups, axis=0)  # [m, g], a row copy each.
  keep = values > threshold[rows, None]
  if floor is not None:
    keep &= values >= floor[rows, None]
  if num_valid < scores.shape[1]:
    keep &= (flat_groups % num_groups)[:, None] * group_size + np.arange(group_size) < num_valid
  hits = np.flatnonzero(keep)  # Into [m * g], row-major: candidates by query, then position.
  if hits.size == 0:
    return
  hit_groups = hits // group_size
  candidate_rows = rows[hit_groups]
  columns = (flat_groups[hit_groups] - candidate_rows * num_groups) * group_size
  columns += hits % group_size
  # -0.0 + 0.0 = +0.0: a zero score ties with +0.0 by position, and is returned as +0.0.
  candidate_keys = _sort_keys(values.reshape(-1)[hits] + np.float32(0), columns + offset)
  # One row of [running k | this query's candidates | padding] per query with candidates.
  counts = np.bincount(candidate_rows, minlength=num_queries)
  touched = np.flatnonzero(counts)
  dense_rows = (np.cumsum(counts > 0) - 1)[candidate_rows]
  slots = np.arange(hits.size) - (np.cumsum(counts) - counts)[candidate_rows]
  merged = np.full((touched.size, k + int(counts.max())), _PADDING_KEY, np.uint64)
  merged[:, :k] = top_keys[touched]
  merged[dense_rows, k + slots] = candidate_keys
  merged.sort(axis=1)  # Keys are unique (positions are), so any sort gives the one order.
  top_keys[touched] = merged[:, :k]


def _host_top_k_search(padded_queries: np.ndarray, block: int, chunks, device, k: int,
                       group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Top k of [Q', d] padded queries (Q' a multiple of block) over `_padded_chunks` on one device.

  The product of the next (chunk, query block) is dispatched before the host merges the current
  one, so the device's threads multiply while numpy selects.

  Returns:
    (scores float32 [Q', k], ids int64 [Q', k]) in the order `exact_search` documents.
  """
  num_padded, _ = padded_queries.shape
  top_keys = np.full((num_padded, k), _PADDING_KEY, np.uint64)
  query_blocks = [jax.device_put(padded_queries[start:start + block], device)
                  for start in range(0, num_padded, block)]
  step = _scores_and_group_maxima(group_size)
  # Queries are independent, so slices of a block's rows merge on separate threads (numpy releases
  # the GIL in its array loops): on 2 cores a merge alone ran 1.3-1.5x faster with 2 threads, and on
  # many cores, where the product of a chunk is short, it keeps the merge from becoming the step.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  num_threads = max(1, min(cores or 1, _MAX_MERGE_THREADS, block // 128))
  bounds = np.linspace(0, block, num_threads + 1).astype(int)

  def merge(pool, pending):
    (scores, maxima), start, offset, n = pending
    # np.asarray of a CPU result does not copy; each slice of top_keys is a view, merged in place.
    scores, maxima = np.asarray(scores), np.asarray(maxima)
    if np.isnan(maxima).any():  # a NaN product poisons its group's maximum: one cheap check
      query = start + int(np.flatnonzero(np.isnan(maxima).any(axis=1))[0])
      raise ValueError(f"NaN score for query {query} against corpus rows {offset}.."
                       f"{offset + n - 1}: the query or corpus embeddings contain NaN (a diverged "
                       "model or a damaged embedding file); no ranking is defined.")
    list(pool.map(lambda lo, hi: _merge_chunk(top_keys[start + lo:start + hi], scores[lo:hi],
                                              maxima[lo:hi], offset, n),
                  bounds[:-1], bounds[1:]))

  pending = None
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for rows, n, offset in chunks:
      rows = jax.device_put(rows, device)
      for index, queries in enumerate(query_blocks):
        # At most one product in flight beyond the one being merged (bounded memory for streams).
        result = step(queries, rows)
        if pending is not None:
          merge(pool, pending)
        pending = (result, index * block, offset, n)
    if pending is not None:
      merge(pool, pending)
  return _decode_keys(top_keys)


def exact_search(queries, corpus, k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
                 mesh: Mesh | None = None,
                 host_top_k: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k of the inner products of queries with the corpus rows.

  Args:
    queries: [Q, d] query embeddings (numpy or jax).
    corpus: [N, d] float32 or bfloat16 document embeddings (numpy, a np.load(..., mmap_mode="r") memmap, or jax), or an
      iterable of such [n_i, d] shards that is read once, in order (e.g. shards streamed from disk);
      row positions count across the shards.
    k: results per query; may exceed `chunk_size` and even N (then the tail is padded).
    chunk_size: corpus rows scored per device per step ([query_block_size, chunk_size] scores).
    query_block_size: queries scored at once on a device (bounds the score block's memory).
    mesh: devices to shard the corpus over (all axes of the mesh); default one device.
    host_top_k: keep the running top-k in numpy on the host (the device only multiplies and
      takes group maxima) instead of XLA's `top_k` on the devices. Needs a one-device mesh.
      Default (None): on for a one-device CPU mesh, where XLA's CPU TopK runs on one thread and
      dominates the search; off otherwise (GPU/TPU, several devices). Same results either way.

  Returns:
    scores: float32 [Q, k], descending per query; -inf where fewer than k rows exist.
    indices: int64 [Q, k] corpus row positions; ties in score ordered by lower position first;
      -1 where fewer than k rows exist.
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  mesh = _default_mesh() if mesh is None else mesh
  num_devices = mesh.devices.size
  if host_top_k is None:
    host_top_k = num_devices == 1 and mesh.devices.flat[0].platform == "cpu"
  elif host_top_k and num_devices != 1:
    raise ValueError(f"host_top_k=True needs a one-device mesh; this one has {num_devices} "
                     "devices (leave host_top_k unset to use them all).")
  queries = np.asarray(queries, dtype=np.float32)
  if queries.ndim != 2:
    raise ValueError(f"queries must be [Q, d]; got shape {queries.shape}.")
  num_queries, dim = queries.shape
  block = max(1, min(query_block_size, num_queries))
  num_blocks = -(-num_queries // block)
  padded_queries = np.zeros((num_blocks * block, dim), np.float32)
  padded_queries[:num_queries] = queries

  if host_top_k:
    group_size = _group_size(chunk_size)
    chunks = _padded_chunks(corpus, chunk_size, 1, dim, staging=True)
    scores, ids = _host_top_k_search(padded_queries, block, chunks, mesh.devices.flat[0], k,
                                     group_size)
    return scores[:num_queries], ids[:num_queries]

  step, finish = _search_functions(mesh, k)
  axes = tuple(mesh.axis_names)
  state_sharding = NamedSharding(mesh, P(axes, None, None, None))
  state_shape = (num_devices, num_blocks, block, k)
  top_scores = jax.device_put(np.full(state_shape, -np.inf, np.float32), state_sharding)
  top_ids = jax.device_put(np.full(state_shape, -1, np.int32), state_sharding)
  queries_on_mesh = jax.device_put(padded_queries.reshape(num_blocks, block, dim),
                                   NamedSharding(mesh, P()))
  row_sharding = NamedSharding(mesh, P(axes, None))
  id_sharding = NamedSharding(mesh, P(axes))

  for rows, n, offset in _padded_chunks(corpus, chunk_size, num_devices, dim):
    row_ids = np.full(rows.shape[0], -1, np.int32)
    row_ids[:n] = np.arange(offset, offset + n, dtype=np.int32)
    rows = jax.device_put(rows, row_sharding)  # overlaps the previous step
    # At most this chunk and the running step in flight: without the wait, dispatch runs ahead
    # and every chunk of a streamed corpus can be queued on the devices at once.
    top_scores.block_until_ready()
    top_scores, top_ids = step(top_scores, top_ids, queries_on_mesh, rows,
                               jax.device_put(row_ids, id_sharding))
  scores, ids = finish(top_scores, top_ids)
  scores = np.asarray(scores.addressable_data(0))[:num_queries]
  ids = np.asarray(ids.addressable_data(0))[:num_queries].astype(np.int64)
  ids[~np.isfinite(scores)] = -1
  return scores, ids


def merge_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The best k of several `exact_search` results over disjoint rows, in `exact_search`'s order.

  Args:
    scores: float32 [H, Q, k'] per-part results (-inf: padding).
    indices: int64 [H, Q, k'] their global row positions (-1: padding).
    k: results kept per query.

  Returns:
    (scores [Q, k], indices [Q, k]): descending score, equal scores by lower position, as one
    search over all rows gives; padding (-inf, -1) where fewer than k rows exist.
  """
  num_parts, num_queries, width = scores.shape
  scores = np.transpose(scores, (1, 0, 2)).reshape(num_queries, num_parts * width)
  indices = np.transpose(indices, (1, 0, 2)).reshape(num_queries, num_parts * width)
  # Padding sorts last: position +inf among equal (-inf) scores.
  positions = np.where(indices < 0, np.iinfo(np.int64).max, indices)
  order = np.lexsort((positions, -scores), axis=1)[:, :k]
  scores = np.take_along_axis(scores, order, axis=1)
  indices = np.take_along_axis(indices, order, axis=1)
  indices[~np.isfinite(scores)] = -1
  return scores, indices
