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

Several processes (`merge_top_k`): each searches its own rows on its own devices and the [Q, k]
candidates of all processes are merged by the same (score desc, position asc) order.
"""

from collections.abc import Iterable
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from samtone_jax import partitioning

DEFAULT_CHUNK_SIZE = 16384
DEFAULT_QUERY_BLOCK_SIZE = 1024


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


def exact_search(queries, corpus, k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
                 mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
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

  Returns:
    scores: float32 [Q, k], descending per query; -inf where fewer than k rows exist.
    indices: int64 [Q, k] corpus row positions; ties in score ordered by lower position first;
      -1 where fewer than k rows exist.
  """
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  mesh = _default_mesh() if mesh is None else mesh
  num_devices = mesh.devices.size
  queries = np.asarray(queries, dtype=np.float32)
  if queries.ndim != 2:
    raise ValueError(f"queries must be [Q, d]; got shape {queries.shape}.")
  num_queries, dim = queries.shape
  block = max(1, min(query_block_size, num_queries))
  num_blocks = -(-num_queries // block)
  padded_queries = np.zeros((num_blocks * block, dim), np.float32)
  padded_queries[:num_queries] = queries

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

  rows_per_chunk = chunk_size * num_devices
  offset = 0
  for rows in _as_chunks(corpus, rows_per_chunk):
    if rows.shape[1] != dim:
      raise ValueError(f"Corpus rows have dimension {rows.shape[1]}; queries have {dim}.")
    n = rows.shape[0]
    if offset + n >= 2**31:
      raise ValueError("Corpora of 2**31 rows or more are not supported (int32 row ids).")
    row_ids = np.full(rows_per_chunk, -1, np.int32)
    row_ids[:n] = np.arange(offset, offset + n, dtype=np.int32)
    # No host copy of float32 or bfloat16 rows (memmaps included); device_put makes the only one,
    # and bfloat16 rows become float32 on the device (half the transfer, the same products).
    xp = jnp if isinstance(rows, jax.Array) else np
    row_dtype = rows.dtype if rows.dtype == jnp.bfloat16 else np.float32
    rows = xp.asarray(rows, dtype=row_dtype)
    if n < rows_per_chunk:  # Pad the last chunk so that one compiled step serves every chunk.
      rows = xp.concatenate([rows, xp.zeros((rows_per_chunk - n, dim), row_dtype)])
    rows = jax.device_put(rows, row_sharding)  # overlaps the previous step
    # At most this chunk and the running step in flight: without the wait, dispatch runs ahead
    # and every chunk of a streamed corpus can be queued on the devices at once.
    top_scores.block_until_ready()
    top_scores, top_ids = step(top_scores, top_ids, queries_on_mesh, rows,
                               jax.device_put(row_ids, id_sharding))
    offset += n
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
