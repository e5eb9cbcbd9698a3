"""Encoding texts into embeddings with a trained encoder, in memory or streamed to disk.

Generic over an `encode_fn(tokens: int32 [b, L]) -> float [b, P]` (usually jitted), so that the
evaluation never depends on model internals; `dual_encoder_encode_fns` builds the two functions
of a `samtone_jax.models.dual_encoder.DualEncoder`.

Tokenisation is the training data's own (`tasks.preprocessors.tokenize_texts`): the vocabulary's
ids cut to `length - 1`, EOS (id 1) appended, padded with 0 to `length`.

Batches are data-parallel over the mesh's `data` axis (padded to a multiple of its size). A corpus
whose embeddings do not fit in memory is written as shards: `embeddings-00000.npy` (float32
[n_i, P]) with `ids-00000.json` (the n_i document ids) and `manifest.json`; `load_embedding_shards`
memory-maps them for `search.exact_search`, which reads them shard by shard. The directory may be
remote (gs://, through `io_utils`); remote shards are read into memory, since a memmap needs a
local file.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tqdm

from samtone_jax import io_utils
from samtone_jax import partitioning
from samtone_jax.tasks import preprocessors

EncodeFn = Callable[[jax.Array | np.ndarray], jax.Array]

_MANIFEST = "manifest.json"
_RESUME_KEY = "resume_key.json"


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


def iter_encoded_batches(texts: Sequence[str], encode_fn: EncodeFn, vocabulary: seqio.Vocabulary,
                         length: int, *, batch_size: int = 256,
                         mesh: jax.sharding.Mesh | None = None,
                         description: str = "encoding") -> Iterator[np.ndarray]:
  """Yields float32 [b_i, P] embeddings of consecutive batches of `texts` (sum b_i = n).

  Every call of `encode_fn` gets the same shape [B, L], B = `batch_size` rounded up to a multiple
  of the mesh's data axis (the last batch is padded with empty rows, dropped here), so it compiles
  once. Batch i + 1 is tokenised and dispatched before batch i is fetched, overlapping host and
  device work.
  """
  data_size = 1 if mesh is None else mesh.shape[partitioning.DATA_AXIS]
  batch_size = -(-batch_size // data_size) * data_size
  pending = None
  with tqdm.tqdm(total=len(texts), desc=description, unit="text", leave=False) as progress:
    for start in range(0, len(texts), batch_size):
      batch = texts[start:start + batch_size]
      tokens = np.zeros((batch_size, length), np.int32)
      tokens[:len(batch)] = tokenize(batch, vocabulary, length)
      dispatched = (encode_fn(_global_batch(tokens, mesh)), len(batch))
      if pending is not None:
        yield _to_host(pending[0])[:pending[1]]
        progress.update(pending[1])
      pending = dispatched
    if pending is not None:
      yield _to_host(pending[0])[:pending[1]]
      progress.update(pending[1])


def encode_texts(texts: Sequence[str], encode_fn: EncodeFn, vocabulary: seqio.Vocabulary,
                 length: int, *, batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                 description: str = "encoding") -> np.ndarray:
  """Embeds `texts` in memory.

  Args:
    texts: n strings.
    encode_fn: tokens int32 [B, L] -> [B, P].
    vocabulary, length: tokenisation (see `tokenize`).
    batch_size: texts per call (rounded up to a multiple of the mesh's data axis).
    mesh: the mesh `encode_fn` runs on; batches are sharded over its data axis. None: the batch is
      passed as a numpy array.

  Returns:
    float32 [n, P].
  """
  if not texts:
    raise ValueError("No texts to encode.")
  out, filled = None, 0  # One [n, P] array filled batch by batch: no list of copies to concatenate.
  for embeddings in iter_encoded_batches(texts, encode_fn, vocabulary, length,
                                         batch_size=batch_size, mesh=mesh,
                                         description=description):
    if out is None:
      out = np.empty((len(texts), embeddings.shape[1]), np.float32)
    out[filled:filled + len(embeddings)] = embeddings
    filled += len(embeddings)
  return out


def _resumable_shards(output_dir: str, ids: Sequence[str], shard_size: int,
                      resume_key: Mapping[str, Any]) -> int:
  """How many leading full shards of an earlier `encode_to_shards` with the same key and ids can
  be kept (0 when there are none); raises if the directory holds another encoding."""
  key_path = os.path.join(output_dir, _RESUME_KEY)
  if not io_utils.exists(key_path):
    return 0
  with io_utils.open_file(key_path) as f:
    stored = json.load(f)
  if stored != json.loads(json.dumps(dict(resume_key))):
    raise ValueError(f"{output_dir} holds embeddings of another encoding ({key_path}: {stored}; "
                     f"this one: {dict(resume_key)}); delete it or choose another directory.")
  shard = 0
  while (shard + 1) * shard_size <= len(ids):
    ids_path = os.path.join(output_dir, f"ids-{shard:05d}.json")
    if not io_utils.exists(ids_path):  # written after its embeddings: the shard is complete
      break
    with io_utils.open_file(ids_path) as f:
      if json.load(f) != list(ids[shard * shard_size:(shard + 1) * shard_size]):
        raise ValueError(f"{ids_path} lists other documents than this corpus's rows "
                         f"{shard * shard_size}..; delete {output_dir} or choose another.")
    shard += 1
  return shard


def encode_to_shards(ids: Sequence[str], texts: Sequence[str], encode_fn: EncodeFn,
                     vocabulary: seqio.Vocabulary, length: int, output_dir: str, *,
                     shard_size: int = 1_000_000, batch_size: int = 256,
                     mesh: jax.sharding.Mesh | None = None,
                     description: str = "encoding",
                     resume_key: Mapping[str, Any] | None = None) -> list[str]:
  """Embeds a corpus into `.npy` shards of at most `shard_size` rows, never holding more than one.

  Only process 0 writes files (every process computes the same embeddings). Each file is written
  under a temporary name and renamed, the ids file after its embeddings, so a shard whose ids
  file exists is complete.

  Args:
    ids: n document ids, written next to the embeddings.
    texts: the n documents.
    encode_fn, vocabulary, length, batch_size, mesh: as for `encode_texts`.
    output_dir: created if missing; holds embeddings-XXXXX.npy, ids-XXXXX.json, manifest.json.
    shard_size: rows per shard (a multiple of the batch size is best; any value works).
    resume_key: JSON-serialisable facts that make two encodings equal (checkpoint, lengths, ...).
      Given, it is stored in the directory, and a later call with the same key and ids keeps the
      complete full shards an interrupted call left and encodes only the rest; a directory with
      another key raises. None: everything is encoded.

  Returns:
    The paths of the embedding shards, in order.
  """
  if len(ids) != len(texts):
    raise ValueError(f"{len(ids)} ids but {len(texts)} texts.")
  writer = jax.process_index() == 0
  if writer:
    io_utils.makedirs(output_dir)  # local or gs:// (a directory every host sees)
  done = 0
  if resume_key is not None:
    done = _resumable_shards(output_dir, ids, shard_size, resume_key)
    if writer:
      with io_utils.open_file(os.path.join(output_dir, _RESUME_KEY), "w") as f:
        json.dump(dict(resume_key), f, sort_keys=True)
  paths = [os.path.join(output_dir, f"embeddings-{shard:05d}.npy") for shard in range(done)]
  shard_sizes, buffer, buffered, dim = [shard_size] * done, [], 0, None
  if done:
    dim = int(io_utils.load_npy(paths[-1]).shape[1])
    print(f"{description}: resuming after {done * shard_size} documents already in "
          f"{output_dir}", flush=True)

  def flush(rows: np.ndarray):
    shard = len(paths)
    path = os.path.join(output_dir, f"embeddings-{shard:05d}.npy")
    begin = sum(shard_sizes)
    if writer:
      io_utils.save_npy(path + ".tmp", rows)
      io_utils.rename(path + ".tmp", path)
      ids_path = os.path.join(output_dir, f"ids-{shard:05d}.json")
      with io_utils.open_file(ids_path + ".tmp", "w") as f:
        json.dump(list(ids[begin:begin + len(rows)]), f)
      io_utils.rename(ids_path + ".tmp", ids_path)
    paths.append(path)
    shard_sizes.append(len(rows))

  for embeddings in iter_encoded_batches(texts[done * shard_size:], encode_fn, vocabulary, length,
                                         batch_size=batch_size, mesh=mesh,
                                         description=description):
    dim = embeddings.shape[1]
    buffer.append(embeddings)
    buffered += len(embeddings)
    while buffered >= shard_size:
      rows = np.concatenate(buffer)
      flush(rows[:shard_size])
      # A copy of the (small) remainder: a view would keep the whole written shard alive.
      buffer, buffered = [rows[shard_size:].copy()], buffered - shard_size
  if buffered:
    flush(np.concatenate(buffer))
  if writer:
    with io_utils.open_file(os.path.join(output_dir, _MANIFEST), "w") as f:
      json.dump({"num_documents": len(ids), "dim": dim, "shard_sizes": shard_sizes}, f)
  if jax.process_count() > 1:  # Readers on other hosts wait for the files (shared file system).
    multihost_utils.sync_global_devices(f"encode_to_shards:{output_dir}")
  return paths


def load_embedding_shards(directory: str) -> tuple[list[str], list[np.ndarray]]:
  """Loads shards written by `encode_to_shards`: memory-mapped from a local directory; from a
  remote one (gs://) each shard is read whole into memory (a memmap needs a local file).

  Returns:
    (ids, shards): the n document ids in order, and the [n_i, P] float32 arrays (read-only memmaps
    for a local directory; sum n_i = n).
  """
  manifest_path = os.path.join(directory, _MANIFEST)
  if not io_utils.exists(manifest_path):
    raise FileNotFoundError(f"{manifest_path} is missing; write the shards with encode_to_shards.")
  with io_utils.open_file(manifest_path) as f:
    manifest = json.load(f)
  ids, shards = [], []
  for shard, size in enumerate(manifest["shard_sizes"]):
    embeddings = io_utils.load_npy(os.path.join(directory, f"embeddings-{shard:05d}.npy"))
    ids_path = os.path.join(directory, f"ids-{shard:05d}.json")
    with io_utils.open_file(ids_path) as f:
      shard_ids = json.load(f)
    if embeddings.shape[0] != size or len(shard_ids) != size:
      raise ValueError(f"{ids_path}: shard {shard} has {embeddings.shape[0]} rows and "
                       f"{len(shard_ids)} ids; {manifest_path} says {size}.")
    ids.extend(shard_ids)
    shards.append(embeddings)
  return ids, shards


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
