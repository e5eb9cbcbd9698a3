"""Encoding texts into embeddings with a trained encoder, in memory or streamed to disk.

Generic over an `encode_fn(tokens: int32 [b, L]) -> float [b, P]` (usually jitted), so that the
evaluation never depends on model internals; `dual_encoder_encode_fns` builds the two functions
of a `samtone_jax.models.dual_encoder.DualEncoder`.

Tokenisation is the training data's own (`tasks.preprocessors.tokenize_texts`): the vocabulary's
ids cut to `length - 1`, EOS (id 1) appended, padded with 0 to `length`.

Batches are data-parallel over the mesh's `data` axis (padded to a multiple of its size). Two
ways to spread the texts over the processes of a multi-host run:

  replicated (queries)  every process tokenises the whole batch and gets every embedding back.
  per_process (corpus)  process p tokenises and encodes only its contiguous slice of the rows,
                        `process_rows(n, p, H)`, feeding its share of each global batch, and gets
                        back only its own embeddings: host memory and tokenisation are corpus / H.

Embeddings are stored as float32 or bfloat16 (`EMBEDDING_DTYPES`, gin EVAL_EMBEDDING_DTYPE); the
search accumulates in float32 either way. A corpus whose embeddings do not fit in memory is
written as shards: `embeddings-00000.npy` ([n_i, P]; bfloat16 is stored as its uint16 bit pattern,
since .npy has no bfloat16) with `ids-00000.json` (the n_i document ids) and `manifest.json`
(shard sizes, the process that wrote each shard, the dtype). With per_process, each process writes
the shards of its own slice; `load_embedding_shards` memory-maps all of them, or one process's.
The directory may be remote (gs://, through `io_utils`); remote shards are read into memory, since
a memmap needs a local file.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import ml_dtypes
import numpy as np
import seqio
import tensorflow as tf
import tqdm

from samtone_jax import errors
from samtone_jax import io_utils
from samtone_jax import partitioning
from samtone_jax.tasks import preprocessors

EncodeFn = Callable[[jax.Array | np.ndarray], jax.Array]

_MANIFEST = "manifest.json"
_RESUME_KEY = "resume_key.json"
# Stored embedding dtypes by their gin name (EVAL_EMBEDDING_DTYPE).
EMBEDDING_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32),
                                         "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def embedding_dtype(name: str, binding: str = "EVAL_EMBEDDING_DTYPE") -> np.dtype:
  """The numpy dtype of a stored-embedding dtype name; ConfigError naming `binding` otherwise."""
  if name not in EMBEDDING_DTYPES:
    raise errors.ConfigError(f"{binding}={name!r}; expected one of {sorted(EMBEDDING_DTYPES)}.")
  return EMBEDDING_DTYPES[name]


def _dtype_name(dtype) -> str:
  for name, value in EMBEDDING_DTYPES.items():
    if np.dtype(dtype) == value:
      return name
  raise ValueError(f"Embeddings are stored as {sorted(EMBEDDING_DTYPES)}, not {dtype}.")


def process_rows(num_rows: int, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
  """[begin, end) of the contiguous rows process `process_index` of `process_count` encodes.

  Slices differ by at most one row and cover 0..num_rows in process order. Defaults: this process.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return num_rows * index // count, num_rows * (index + 1) // count


def tokenize(texts: Sequence[str], vocabulary: seqio.Vocabulary, length: int) -> np.ndarray:
  """int32 [n, L] token ids of `texts`, identical to a training batch's (one tokeniser for both).

  See `tasks.preprocessors.tokenize_texts`: ids cut to L - 1, then EOS, then zeros.
  """
  return preprocessors.tokenize_texts(texts, vocabulary, length)


def _global_batch(tokens: np.ndarray, mesh: jax.sharding.Mesh | None):
  """The host batch as a jax.Array sharded over `data` (works on one or many processes)."""
  if mesh is None:
    return tokens
  sharding = partitioning.data_sharding(mesh, tokens.ndim)
  return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


def _to_host(embeddings: jax.Array) -> np.ndarray:
  if isinstance(embeddings, jax.Array) and not embeddings.is_fully_addressable:
    embeddings = multihost_utils.process_allgather(embeddings, tiled=True)
  return np.asarray(jax.device_get(embeddings), dtype=np.float32)


class RowRange(Sequence):
  """Rows begin..end-1 of a sequence, without reading them: slicing this reads that slice of
  `rows` only (a corpus read from disk on indexing stays unread until a batch needs it)."""

  def __init__(self, rows: Sequence[Any], begin: int, end: int):
    self._rows, self._begin, self._end = rows, begin, max(begin, end)

  def __len__(self) -> int:
    return self._end - self._begin

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, step = index.indices(len(self))
      if step != 1:
        raise ValueError("RowRange supports contiguous slices only.")
      return self._rows[self._begin + start:self._begin + max(start, stop)]
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return self._rows[self._begin + index % len(self)]


def _data_size(mesh: jax.sharding.Mesh | None) -> int:
  return 1 if mesh is None else mesh.shape[partitioning.DATA_AXIS]


def _local_batches(texts: Sequence[str], batch_size: int, mesh: jax.sharding.Mesh | None,
                   per_process: bool) -> tuple[int, int]:
  """(rows this process feeds per call, number of calls every process makes)."""
  batch_size = -(-batch_size // _data_size(mesh)) * _data_size(mesh)
  count = jax.process_count() if per_process else 1
  if count == 1:
    return batch_size, -(-len(texts) // batch_size)
  if mesh is None:
    raise ValueError("Per-process encoding on several processes needs the mesh.")
  if batch_size % count:
    raise ValueError(f"The mesh's data axis ({_data_size(mesh)}) is not split evenly over "
                     f"{count} processes; per-process encoding needs it to be.")
  local = batch_size // count
  # Every process makes the same number of calls (a collective program); short slices pad.
  calls = multihost_utils.process_allgather(np.array(-(-len(texts) // local), np.int64))
  return local, int(np.max(calls))


def iter_encoded_batches(texts: Sequence[str], encode_fn: EncodeFn, vocabulary: seqio.Vocabulary,
                         length: int, *, batch_size: int = 256,
                         mesh: jax.sharding.Mesh | None = None,
                         description: str = "encoding",
                         per_process: bool = False) -> Iterator[np.ndarray]:
  """Yields float32 [b_i, P] embeddings of consecutive batches of `texts` (sum b_i = n).

  Every call of `encode_fn` gets the same shape [B, L], B = `batch_size` rounded up to a multiple
  of the mesh's data axis (the last batch is padded with empty rows, dropped here), so it compiles
  once. Batch i + 1 is tokenised and dispatched before batch i is fetched, overlapping host and
  device work.

  Args:
    per_process: `texts` are this process's own rows (see the module docstring): each call takes
      B / process_count of them from each process and only this process's embeddings come back.
      Every process must call with per_process=True (with any number of texts, even none); a
      process whose slice is exhausted feeds padding and gets [0, P] arrays. False: every
      process passes the same texts and gets every embedding.
  """
  local_batch, num_calls = _local_batches(texts, batch_size, mesh, per_process)
  distributed = per_process and jax.process_count() > 1
  row_spec = P(partitioning.DATA_AXIS, None)

  def dispatch(tokens):
    if distributed:
      return encode_fn(multihost_utils.host_local_array_to_global_array(tokens, mesh, row_spec))
    return encode_fn(_global_batch(tokens, mesh))

  def fetch(embeddings):
    if distributed:
      embeddings = multihost_utils.global_array_to_host_local_array(embeddings, mesh, row_spec)
      return np.asarray(embeddings, dtype=np.float32)
    return _to_host(embeddings)

  pending = None
  with tqdm.tqdm(total=len(texts), desc=description, unit="text", leave=False) as progress:
    for call in range(num_calls):
      batch = texts[call * local_batch:(call + 1) * local_batch]
      tokens = np.zeros((local_batch, length), np.int32)
      if len(batch):
        tokens[:len(batch)] = tokenize(batch, vocabulary, length)
      dispatched = (dispatch(tokens), len(batch))
      if pending is not None:
        yield fetch(pending[0])[:pending[1]]
        progress.update(pending[1])
      pending = dispatched
    if pending is not None:
      yield fetch(pending[0])[:pending[1]]
      progress.update(pending[1])


def encode_texts(texts: Sequence[str], encode_fn: EncodeFn, vocabulary: seqio.Vocabulary,
                 length: int, *, batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                 description: str = "encoding", dtype: Any = np.float32,
                 per_process: bool = False) -> np.ndarray:
  """Embeds `texts` in memory, into one preallocated array (no second copy of the embeddings).

  Args:
    texts: n strings (with per_process: this process's rows, possibly none).
    encode_fn: tokens int32 [B, L] -> [B, P].
    vocabulary, length: tokenisation (see `tokenize`).
    batch_size: texts per call (rounded up to a multiple of the mesh's data axis).
    mesh: the mesh `encode_fn` runs on; batches are sharded over its data axis. None: the batch is
      passed as a numpy array.
    dtype: the returned array's dtype (float32 or bfloat16: `EMBEDDING_DTYPES`).
    per_process: see `iter_encoded_batches`.

  Returns:
    [n, P] of `dtype`.
  """
  if not len(texts) and not per_process:
    raise ValueError("No texts to encode.")
  out, filled = None, 0
  for embeddings in iter_encoded_batches(texts, encode_fn, vocabulary, length,
                                         batch_size=batch_size, mesh=mesh,
                                         description=description, per_process=per_process):
    if out is None:
      out = np.empty((len(texts), embeddings.shape[1]), dtype)
    out[filled:filled + len(embeddings)] = embeddings
    filled += len(embeddings)
  return out


def _shard_plan(num_rows: int, shard_size: int, process_count: int
                ) -> list[tuple[int, int, int]]:
  """(process, begin row, end row) of every shard, in row order: each process's slice
  (`process_rows`) cut into shards of at most `shard_size` rows."""
  plan = []
  for process in range(process_count):
    begin, end = process_rows(num_rows, process, process_count)
    plan += [(process, start, min(start + shard_size, end))
             for start in range(begin, end, shard_size)]
  return plan


def _shard_paths(directory: str, shard: int) -> tuple[str, str]:
  return (os.path.join(directory, f"embeddings-{shard:05d}.npy"),
          os.path.join(directory, f"ids-{shard:05d}.json"))


def _resumable_shards(output_dir: str, ids: Sequence[str], shards: Sequence[int],
                      plan: Sequence[tuple[int, int, int]],
                      resume_key: Mapping[str, Any]) -> int:
  """How many of `shards` (this process's, in order) an earlier `encode_to_shards` with the same
  key and ids completed (0 when none); raises if the directory holds another encoding."""
  key_path = os.path.join(output_dir, _RESUME_KEY)
  if not io_utils.exists(key_path):
    return 0
  with io_utils.open_file(key_path) as f:
    stored = json.load(f)
  if stored != json.loads(json.dumps(dict(resume_key))):
    raise ValueError(f"{output_dir} holds embeddings of another encoding ({key_path}: {stored}; "
                     f"this one: {dict(resume_key)}); delete it or choose another directory.")
  done = 0
  for shard in shards:
    _, ids_path = _shard_paths(output_dir, shard)
    if not io_utils.exists(ids_path):  # written after its embeddings: the shard is complete
      break
    _, begin, end = plan[shard]
    with io_utils.open_file(ids_path) as f:
      if json.load(f) != list(ids[begin:end]):
        raise ValueError(f"{ids_path} lists other documents than this corpus's rows "
                         f"{begin}..{end}; delete {output_dir} or choose another.")
    done += 1
  return done


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def encode_to_shards(ids: Sequence[str], texts: Sequence[str], encode_fn: EncodeFn,
                     vocabulary: seqio.Vocabulary, length: int, output_dir: str, *,
                     shard_size: int = 1_000_000, batch_size: int = 256,
                     mesh: jax.sharding.Mesh | None = None,
                     description: str = "encoding",
                     resume_key: Mapping[str, Any] | None = None,
                     dtype: Any = np.float32, per_process: bool = False) -> list[str]:
  """Embeds a corpus into `.npy` shards of at most `shard_size` rows, streamed batch by batch.

  Each file is written under a temporary name and renamed, the ids file after its embeddings, so
  a shard whose ids file exists is complete; `manifest.json` is written last (once every process
  is done; by every writing process, so that a host-local directory has one), so a directory
  with a manifest is complete.

  Args:
    ids: n document ids, written next to the embeddings.
    texts: the n documents (any sequence; only the slices this process encodes are read).
    encode_fn, vocabulary, length, batch_size, mesh: as for `encode_texts`.
    output_dir: created if missing; holds embeddings-XXXXX.npy, ids-XXXXX.json, manifest.json.
      With several processes it must be one directory every process sees (gs://, NFS) for
      `load_embedding_shards` of the whole corpus; a directory local to each host is enough for
      `retrieval.retrieve`, which searches each process's own shards on that process.
    shard_size: rows per shard (a multiple of the batch size is best; any value works).
    resume_key: JSON-serialisable facts that make two encodings equal (checkpoint, lengths, ...).
      Given, it is stored in the directory, and a later call with the same key and ids keeps the
      complete shards an interrupted call left and encodes only the rest; a directory with
      another key raises. None: everything is encoded.
    dtype: stored dtype, float32 or bfloat16 (`EMBEDDING_DTYPES`).
    per_process: each process encodes and writes only the shards of its slice of the rows
      (`process_rows`; host memory and work are corpus / process count). False: every process
      encodes everything and process 0 writes (the layout of a single process).

  Returns:
    The paths of all embedding shards (every process's), in row order.
  """
  if len(ids) != len(texts):
    raise ValueError(f"{len(ids)} ids but {len(texts)} texts.")
  if not len(ids):
    raise ValueError("No texts to encode.")
  dtype_name = _dtype_name(dtype)
  process_count = jax.process_count() if per_process else 1
  me = jax.process_index() if per_process else 0
  writer = per_process or jax.process_index() == 0
  plan = _shard_plan(len(ids), shard_size, process_count)
  mine = [shard for shard, (process, _, _) in enumerate(plan) if process == me]
  manifest_path = os.path.join(output_dir, _MANIFEST)
  if writer:
    io_utils.makedirs(output_dir)  # local or gs:// (a directory every host sees)
  done = 0
  if resume_key is not None:
    done = _resumable_shards(output_dir, ids, mine, plan, resume_key)
  _sync("encode_to_shards:start")  # everyone has read the old key (names must match)
  if writer:  # the manifest is rewritten at the end: a stale one must not survive
    try:
      tf.io.gfile.remove(manifest_path)
    except tf.errors.NotFoundError:  # none, or another process of a shared directory was first
      pass
  if jax.process_index() == 0:
    if resume_key is not None:
      with io_utils.open_file(os.path.join(output_dir, _RESUME_KEY), "w") as f:
        json.dump(dict(resume_key), f, sort_keys=True)
  if done:
    print(f"{description}: resuming after {done} shards already in {output_dir}", flush=True)
  todo = mine[done:]
  begin = plan[todo[0]][1] if todo else (plan[mine[-1]][2] if mine else 0)
  end = plan[mine[-1]][2] if mine else 0

  # Each shard streams to its file batch by batch: the .npy header is written first (the shard's
  # rows are known from the plan), so no shard-sized buffer is ever held.
  shard_iter = iter(todo)
  shard, out, written, dim = next(shard_iter, None), None, 0, None
  stored_dtype = np.dtype(np.uint16) if dtype_name == "bfloat16" else np.dtype(dtype)
  for embeddings in iter_encoded_batches(RowRange(texts, begin, end), encode_fn, vocabulary,
                                         length, batch_size=batch_size, mesh=mesh,
                                         description=description, per_process=per_process):
    dim = embeddings.shape[1]
    consumed = 0
    while consumed < len(embeddings):
      _, shard_begin, shard_end = plan[shard]
      path, ids_path = _shard_paths(output_dir, shard)
      if out is None and writer:
        out = io_utils.open_file(path + ".tmp", "wb")
        np.lib.format.write_array_header_1_0(out, {
            "descr": np.lib.format.dtype_to_descr(stored_dtype), "fortran_order": False,
            "shape": (shard_end - shard_begin, dim)})
      take = min(shard_end - shard_begin - written, len(embeddings) - consumed)
      if writer:
        rows = np.ascontiguousarray(embeddings[consumed:consumed + take], dtype=dtype)
        out.write(rows.view(stored_dtype).tobytes())
      written, consumed = written + take, consumed + take
      if written == shard_end - shard_begin:
        if writer:
          out.close()
          io_utils.rename(path + ".tmp", path)
          with io_utils.open_file(ids_path + ".tmp", "w") as f:
            json.dump(list(ids[shard_begin:shard_end]), f)
          io_utils.rename(ids_path + ".tmp", ids_path)
        shard, out, written = next(shard_iter, None), None, 0
  if done and dim is None:  # everything was already there
    dim = int(_load_npy(_shard_paths(output_dir, mine[-1])[0], None).shape[1])
  _sync("encode_to_shards:written")
  if writer:
    # Every writing process writes the (same) manifest, so that a directory local to each host
    # describes that host's shards too; on a shared directory the last rename wins, unchanged.
    if dim is None:
      dim = int(_load_npy(_shard_paths(output_dir, 0)[0], None).shape[1])
    temporary = f"{manifest_path}.tmp{jax.process_index()}"
    with io_utils.open_file(temporary, "w") as f:
      json.dump({"num_documents": len(ids), "dim": dim, "dtype": dtype_name,
                 "process_count": process_count,
                 "shard_sizes": [end - begin for _, begin, end in plan],
                 "shard_processes": [process for process, _, _ in plan]}, f)
    io_utils.rename(temporary, manifest_path)
  _sync("encode_to_shards:done")  # readers on other hosts wait for the manifest
  return [_shard_paths(output_dir, shard)[0] for shard in range(len(plan))]


def _load_npy(path: str, directory: str | None) -> np.ndarray:
  """One shard's array; EmbeddingShardError naming the file if it is missing or damaged."""
  again = f"; delete {directory} and encode again" if directory else ""
  if not io_utils.exists(path):
    raise errors.EmbeddingShardError(f"{path} is missing{again}.")
  try:
    return io_utils.load_npy(path)
  except (ValueError, OSError, EOFError) as e:
    raise errors.EmbeddingShardError(f"{path} is truncated or not a .npy file ({e}){again}.")


def load_embedding_shards(directory: str, *, process_index: int | None = None,
                          read_ids: bool = True) -> tuple[list[str], list[np.ndarray]]:
  """Loads shards written by `encode_to_shards`: memory-mapped from a local directory; from a
  remote one (gs://) each shard is read whole into memory (a memmap needs a local file).

  Args:
    directory: the output_dir of `encode_to_shards`.
    process_index: only the shards this process wrote (per_process encoding); None: all.
    read_ids: False: the ids files are checked to exist but not read (ids is then empty).

  Returns:
    (ids, shards): the document ids in order, and the [n_i, P] float32 or bfloat16 arrays
    (read-only memmaps for a local directory).

  Raises:
    EmbeddingShardError: naming the manifest, a missing or truncated shard, or a shard whose size
      or dtype disagrees with the manifest.
  """
  manifest_path = os.path.join(directory, _MANIFEST)
  if not io_utils.exists(manifest_path):
    raise errors.EmbeddingShardError(
        f"{manifest_path} is missing: {directory} holds no complete encoding (an interrupted "
        "encode_to_shards leaves none); encode again.")
  with io_utils.open_file(manifest_path) as f:
    manifest = json.load(f)
  dtype_name = manifest.get("dtype", "float32")
  dtype = embedding_dtype(dtype_name, manifest_path)
  processes = manifest.get("shard_processes", [0] * len(manifest["shard_sizes"]))
  ids, shards = [], []
  for shard, (size, process) in enumerate(zip(manifest["shard_sizes"], processes)):
    if process_index is not None and process != process_index:
      continue
    path, ids_path = _shard_paths(directory, shard)
    embeddings = _load_npy(path, directory)
    if embeddings.dtype == np.uint16 and dtype_name == "bfloat16":
      embeddings = embeddings.view(dtype)
    if embeddings.dtype != dtype or embeddings.ndim != 2 or embeddings.shape[0] != size:
      raise errors.EmbeddingShardError(
          f"{path}: {embeddings.dtype} {embeddings.shape}; {manifest_path} says {size} rows of "
          f"{dtype_name}. Delete {directory} and encode again.")
    if not io_utils.exists(ids_path):
      raise errors.EmbeddingShardError(f"{ids_path} is missing; delete {directory} and encode "
                                       "again.")
    if not read_ids:
      shards.append(embeddings)
      continue
    with io_utils.open_file(ids_path) as f:
      try:
        shard_ids = json.load(f)
      except json.JSONDecodeError as e:
        raise errors.EmbeddingShardError(f"{ids_path} is truncated or not JSON ({e}); delete "
                                         f"{directory} and encode again.") from None
    if len(shard_ids) != size:
      raise errors.EmbeddingShardError(f"{ids_path}: {len(shard_ids)} ids; {manifest_path} says "
                                       f"{size}. Delete {directory} and encode again.")
    ids.extend(shard_ids)
    shards.append(embeddings)
  return ids, shards


def iter_embedding_shards(directory: str, *, process_index: int | None = None,
                          block_rows: int = 16384) -> Iterator[np.ndarray]:
  """The rows of `load_embedding_shards`, checked first, then read block by block.

  For a search that streams the corpus: each [<= block_rows, P] block is read from its file into
  a fresh array (no memory map, whose touched pages would stay resident while it is mapped, and
  no whole remote shard in memory), so the process holds about one block whatever the corpus
  size. Raises the same errors as `load_embedding_shards` before the first block is yielded.

  Args:
    directory: the output_dir of `encode_to_shards`.
    process_index: only this process's shards; None: all.
    block_rows: rows per yielded array (a multiple of the search's rows per step is best).
  """
  _, shards = load_embedding_shards(directory, process_index=process_index, read_ids=False)
  dtype = shards[0].dtype if shards else np.dtype(np.float32)
  del shards  # the check's memory maps are closed before reading
  with io_utils.open_file(os.path.join(directory, _MANIFEST)) as f:
    manifest = json.load(f)
  processes = manifest.get("shard_processes", [0] * len(manifest["shard_sizes"]))
  for shard, (size, process) in enumerate(zip(manifest["shard_sizes"], processes)):
    if process_index is not None and process != process_index:
      continue
    path = _shard_paths(directory, shard)[0]
    local = io_utils.is_local(path)
    with (open(path.removeprefix("file://"), "rb") if local  # pylint: disable=consider-using-with
          else io_utils.open_file(path, "rb")) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, stored = read_header(f)
      row_bytes = int(np.prod(shape[1:])) * stored.itemsize
      for begin in range(0, size, block_rows):
        rows = min(block_rows, size - begin)
        data = f.read(rows * row_bytes)
        if len(data) != rows * row_bytes:
          raise errors.EmbeddingShardError(f"{path} is truncated at row {begin}; delete "
                                           f"{directory} and encode again.")
        yield np.frombuffer(data, stored).reshape(rows, *shape[1:]).view(dtype)


def dual_encoder_encode_fns(model, params, mesh: jax.sharding.Mesh | None = None
                            ) -> tuple[EncodeFn, EncodeFn]:
  """(encode_queries_fn, encode_documents_fn) of a DualEncoder, jitted, deterministic.

  Args:
    model: a `samtone_jax.models.dual_encoder.DualEncoder`.
    params: its parameters (the 'params' collection), already placed/sharded on `mesh`.
    mesh: the mesh the parameters live on; the functions run under its logical axis rules and
      return embeddings sharded over `data`. None: default device placement.

  Returns:
    Two functions tokens int32 [B, L] -> float32 [B, P].
  """

  def build(method) -> EncodeFn:
    def apply(variables_params, tokens):
      return model.apply({"params": variables_params}, tokens, method=method)

    out_shardings = None if mesh is None else partitioning.data_sharding(mesh, 2)
    jitted = jax.jit(apply, out_shardings=out_shardings)

    def encode_fn(tokens):
      if mesh is None:
        return jitted(params, tokens)
      with partitioning.mesh_context(mesh):
        return jitted(params, tokens)

    return encode_fn

  return build(model.encode_queries), build(model.encode_documents)
